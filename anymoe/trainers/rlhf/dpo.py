"""`anymoe rlhf dpo`: Direct Preference Optimisation (and IPO, conservative DPO) on MoE policies.

Legend: B pairs, S tokens, V vocabulary. A step, per micro-batch of B pairs:
  1. policy forward of chosen and rejected rows together ([2B, S]); summed log-probs of the
     response tokens (labels != -100) -> log pi(y_w), log pi(y_l);
  2. the same under the frozen reference (no grad), routed by its own router (routing replay
     is a rollout -> training device for PPO/GRPO; DPO has no rollout);
  3. loss = dpo_loss(...) (losses.py), + router KL to the reference if asked, + aux (z-loss);
  4. metrics: implicit rewards beta * log(pi/ref), their margin and the preference accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from anymoe.trainers.loop import StepOutput
from anymoe.trainers.optim import LRSchedule, build_optimized
from anymoe.trainers.profiling import phase
from anymoe.trainers.rlhf.base import RLHFTrainer
from anymoe.trainers.rlhf.losses import dpo_loss, token_logprobs
from anymoe.trainers.rlhf.model_io import ForwardOut, forward_rl
from anymoe.trainers.rlhf.rm import eval_pair_batches, pair_tensors, rank_micro_batches
from anymoe.trainers.rlhf.roles import Reference
from anymoe.trainers.rlhf.routing import router_kl

IGNORE = -100


def sequence_logps(model: nn.Module, ids_BS: Tensor, labels_BS: Tensor,
                   replay_NTK: list[Tensor] | None = None) -> tuple[Tensor, ForwardOut]:
    """sum over response tokens of log p(label_t | ids_<=t) [B] (labels already shifted, -100 = none)."""
    out = forward_rl(model, ids_BS, replay_NTK)
    mask = labels_BS != IGNORE
    logp = token_logprobs(out.logits_BLV, labels_BS.clamp(min=0))
    return (logp * mask).sum(-1), out


class DPOTrainer(RLHFTrainer):
    algo = "dpo"

    def build(self) -> None:
        self.build_common()
        cfg = self.cfg
        self.model = self.new_model()
        self.load_policy_weights(self.model)
        self.reference = Reference(self.model)
        self.model, self.optimizer = build_optimized(self.model, cfg.optim, self.backend)
        self.schedule = LRSchedule(cfg.optim, cfg.train.steps)
        self.accum = cfg.train.accumulation(self.dp.size)
        self.stream = self.bundle.train_stream(cfg.train.micro_batch * self.accum * self.dp.size)

    def pair_terms(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-pair losses, implicit rewards and the extra loss terms of one micro-batch."""
        d, moe = self.cfg.rlhf.dpo, self.cfg.rlhf.moe
        ids, labels, _ = pair_tensors(batch, self.device)
        B = ids.shape[0] // 2
        logp, out = sequence_logps(self.model, ids, labels)
        with torch.no_grad():
            ref_logp, ref_out = sequence_logps(self.reference.module, ids, labels)
        losses, rc, rr = dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], beta=d.beta,
                                  loss_type=d.loss_type, label_smoothing=d.label_smoothing)
        extra = out.aux_loss
        terms = {"losses": losses, "chosen": rc, "rejected": rr}
        if moe.router_kl_coef > 0:
            tok = (labels != IGNORE).reshape(-1).float()
            rkl = sum(router_kl(p, q, tok) for p, q in zip(out.router_probs_NTE, ref_out.router_probs_NTE))
            rkl = rkl / max(len(out.router_probs_NTE), 1)
            extra = extra + moe.router_kl_coef * rkl
            terms["router_kl"] = rkl.detach()
        terms["extra"] = extra
        return terms

    def train_step(self, step: int) -> StepOutput:
        lr = self.schedule.apply(self.optimizer, step)
        batch = self.stream.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        keys = ("loss", "margin", "accuracy", "chosen_reward", "rejected_reward", "router_kl")
        sums = dict.fromkeys(keys, 0.0)
        n, tokens = 0, 0
        for part in rank_micro_batches(batch, self.cfg.train.micro_batch, self.accum, self.dp):
            t = self.pair_terms(part)
            loss = t["losses"].mean() + t["extra"]
            (loss / self.accum).backward()
            b = t["losses"].shape[0]
            sums["loss"] += loss.item() * b
            sums["margin"] += float((t["chosen"] - t["rejected"]).sum())
            sums["accuracy"] += float((t["chosen"] > t["rejected"]).float().sum())
            sums["chosen_reward"] += float(t["chosen"].sum())
            sums["rejected_reward"] += float(t["rejected"].sum())
            sums["router_kl"] += float(t.get("router_kl", torch.zeros(()))) * b
            n += b
            tokens += int(part["chosen_attention_mask"].sum() + part["rejected_attention_mask"].sum())
        self.dp.average_gradients(list(self.model.parameters()), took_part=True)
        *totals, n, tokens = self.dp.sum([*(sums[k] for k in keys), n, tokens])
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or 1e9))
        avg = {k: v / max(n, 1) for k, v in zip(keys, totals)}
        if not (math.isfinite(avg["loss"]) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutput(loss=float("nan"), skipped=True, reason="non-finite loss or gradient")
        with phase("optimizer"):
            self.optimizer.step()
        loss = avg.pop("loss")
        return StepOutput(loss=loss, tokens=int(tokens), metrics={"lr": lr, "grad_norm": norm, **avg})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        margin, acc, n = 0.0, 0.0, 0
        for batch in eval_pair_batches(self.bundle, self.cfg.train.micro_batch, self.dp):
            t = self.pair_terms({k: v for k, v in batch.items() if isinstance(v, Tensor)})
            valid = batch.get("row_valid", torch.ones_like(t["chosen"], dtype=torch.bool))
            valid = valid.to(t["chosen"].device)
            margin += float((t["chosen"] - t["rejected"])[valid].sum())
            acc += float((t["chosen"] > t["rejected"])[valid].float().sum())
            n += int(valid.sum())
        self.model.train()
        margin, acc, n = self.dp.sum([margin, acc, n])
        return {"eval_margin": margin / max(n, 1), "eval_accuracy": acc / max(n, 1)}

    def checkpoint_files(self) -> dict[str, Any]:
        if not self.dist.is_main:  # the replicas are equal: rank 0 writes them
            return {}
        return {"model.pt": self.model.state_dict(), "optim.pt": self.optimizer.state_dict(),
                "reference.pt": self.reference.module.state_dict()}

    def load_checkpoint(self, path: Path, restore_data: bool = True) -> None:
        self.model.load_state_dict(self.ckpt.load(path, "model.pt"))
        self.optimizer.load_state_dict(self.ckpt.load(path, "optim.pt"))
        self.reference.module.load_state_dict(self.ckpt.load(path, "reference.pt"))

    def data_state(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


__all__ = ["DPOTrainer", "sequence_logps"]
