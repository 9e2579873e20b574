"""`anymoe rlhf rm`: a reward model = MoE backbone + scalar head, trained with Bradley-Terry.

Legend: B pairs, S tokens. A step, per micro-batch of B pairs:
  1. forward chosen and rejected rows together ([2B, S], right-padded; causal, so no mask);
  2. read the head at each row's last real token -> r_chosen [B], r_rejected [B];
  3. loss = -log sigma(r_chosen - r_rejected [- margin]); accuracy = share with r_chosen > r_rejected.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anymoe.trainers.loop import StepOutput
from anymoe.trainers.optim import LRSchedule, build_optimized
from anymoe.trainers.profiling import phase
from anymoe.trainers.rlhf.base import RLHFTrainer, load_module_state
from anymoe.trainers.rlhf.data_parallel import DataParallel
from anymoe.trainers.rlhf.losses import bradley_terry_loss
from anymoe.trainers.rlhf.roles import RewardModel, ScalarHeadModel


def eval_pair_batches(bundle: Any, batch_size: int, dp: DataParallel):
    """This rank's share (round robin) of the held-out pairs in batches; the first 64 training
    pairs when there are none."""
    if len(bundle.eval):
        batches = bundle.eval_batches(batch_size)
    else:
        batches = iter([bundle.collate([bundle.train[i] for i in range(min(64, len(bundle.train)))])])
    yield from (batch for i, batch in enumerate(batches) if dp.owns(i))


def rank_micro_batches(batch: dict[str, Any], micro_batch: int, accum: int,
                       dp: DataParallel) -> Iterator[dict[str, Tensor]]:
    """This rank's ``accum`` micro-batches of a step's global batch of pairs (its contiguous slice)."""
    first = dp.rank * micro_batch * accum
    for i in range(accum):
        lo = first + i * micro_batch
        yield {k: v[lo:lo + micro_batch] for k, v in batch.items() if isinstance(v, Tensor)}


def pair_tensors(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """[2B, S] ids (chosen rows first), [2B, S] labels, [2B] index of each row's last real token."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).to(device)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]]).to(device)
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]).to(device)
    return ids, labels, mask.sum(1).long() - 1


class RMTrainer(RLHFTrainer):
    algo = "rm"

    def build(self) -> None:
        self.build_common()
        cfg = self.cfg
        backbone = self.new_model()
        self.load_policy_weights(backbone)
        self.model, self.optimizer = build_optimized(ScalarHeadModel(backbone).to(self.device), cfg.optim,
                                                     self.backend)
        self.rm = RewardModel(self.model, trainable=True)
        self.schedule = LRSchedule(cfg.optim, cfg.train.steps)
        self.accum = cfg.train.accumulation(self.dp.size)
        self.stream = self.bundle.train_stream(cfg.train.micro_batch * self.accum * self.dp.size)

    def scores(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Any]:
        ids, _, last = pair_tensors(batch, self.device)
        r, out = self.rm.score(ids, last)
        B = ids.shape[0] // 2
        return r[:B], r[B:], out

    def train_step(self, step: int) -> StepOutput:
        lr = self.schedule.apply(self.optimizer, step)
        batch = self.stream.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        total, correct, margin, n = 0.0, 0, 0.0, 0
        tokens = 0
        for part in rank_micro_batches(batch, self.cfg.train.micro_batch, self.accum, self.dp):
            rc, rr, out = self.scores(part)
            loss = bradley_terry_loss(rc, rr) + out.aux_loss
            rc, rr = rc.detach(), rr.detach()
            (loss / self.accum).backward()
            total += loss.item() / self.accum
            correct += int((rc > rr).sum())
            margin += float((rc - rr).sum())
            n += rc.shape[0]
            tokens += int(part["chosen_attention_mask"].sum() + part["rejected_attention_mask"].sum())
        self.dp.average_gradients(list(self.model.parameters()), took_part=True)
        total, correct, margin, n, tokens = self.dp.sum([total, correct, margin, n, tokens])
        total /= self.dp.size  # each rank's loss is already its mean over its micro-batches
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or 1e9))
        if not (math.isfinite(total) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutput(loss=float("nan"), skipped=True, reason="non-finite loss or gradient")
        with phase("optimizer"):
            self.optimizer.step()
        metrics = {"lr": lr, "accuracy": correct / max(n, 1), "margin": margin / max(n, 1), "grad_norm": norm}
        return StepOutput(loss=total, tokens=int(tokens), metrics=metrics)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        correct, n, loss_sum = 0, 0, 0.0
        for batch in eval_pair_batches(self.bundle, self.cfg.train.micro_batch, self.dp):
            valid = batch.get("row_valid", torch.ones(batch["chosen_input_ids"].shape[0], dtype=torch.bool))
            rc, rr, _ = self.scores(batch)
            v = valid.to(rc.device)
            correct += int(((rc > rr) & v).sum())
            loss_sum += float(torch.nn.functional.softplus(-(rc - rr))[v].sum())
            n += int(v.sum())
        self.model.train()
        correct, n, loss_sum = self.dp.sum([correct, n, loss_sum])
        return {"eval_accuracy": correct / max(n, 1), "eval_loss": loss_sum / max(n, 1), "eval_pairs": int(n)}

    def checkpoint_files(self) -> dict[str, Any]:
        if not self.dist.is_main:  # the replicas are equal: rank 0 writes them
            return {}
        return {"model.pt": self.model.state_dict(), "optim.pt": self.optimizer.state_dict()}

    def load_checkpoint(self, path: Path, restore_data: bool = True) -> None:
        self.model.load_state_dict(self.ckpt.load(path, "model.pt"))
        self.optimizer.load_state_dict(self.ckpt.load(path, "optim.pt"))

    def data_state(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def load_reward_model(trainer: RLHFTrainer, spec: str) -> RewardModel:
    """A frozen reward model from an `anymoe rlhf rm` run, for PPO/GRPO."""
    module = ScalarHeadModel(trainer.new_model(seed_offset=17)).to(trainer.device)
    path = load_module_state(module, spec, "rlhf.reward_model")
    trainer.message(f"reward model loaded from {path}")
    return RewardModel(module, trainable=False)


__all__ = ["RMTrainer", "eval_pair_batches", "load_reward_model", "pair_tensors", "rank_micro_batches"]
