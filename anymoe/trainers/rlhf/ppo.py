"""`anymoe rlhf ppo` (and the base of `anymoe rlhf grpo`): on-policy RL of an MoE policy.

Roles: actor (trained), reference (frozen copy of the initial policy), critic (PPO with GAE:
an MoE backbone + value head, initialised from the policy) and the reward: a trained reward
model (``rlhf.reward_model``) or verifiable reward callables (``rlhf.rewards``).

One loop step = one RL iteration (PolicyTrainer.step): sample ``prompts_per_step`` prompts,
roll out ``samples_per_prompt`` responses each with the KV-cache generator, score, compute
advantages, run ``policy.epochs`` passes of clipped policy (+ value) updates, log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from anymoe.trainers.loop import StepOutput
from anymoe.trainers.rlhf.advantages import NEEDS_CRITIC
from anymoe.trainers.rlhf.base import RLHFTrainer
from anymoe.trainers.rlhf.model_io import generate_rl
from anymoe.trainers.rlhf.policy_trainer import PolicyTrainer
from anymoe.trainers.rlhf.rewards import WeightedReward
from anymoe.trainers.rlhf.roles import Actor, Critic, Reference, ScalarHeadModel
from anymoe.trainers.rlhf.rollout import Rollout
from anymoe.trainers.rlhf.warmstart import format_pairs, sft_steps


def item_row(item: Any) -> dict[str, Any]:
    """A prompt item's JSONL row, with its reference answer under 'answer' (what rewards read)."""
    row = dict(item.row)
    if item.answer is not None:
        row["answer"] = item.answer
    return row


class PPOTrainer(RLHFTrainer):
    algo = "ppo"

    def build(self) -> None:
        self.build_common()
        cfg, r = self.cfg, self.cfg.rlhf
        policy = self.new_model()
        self.load_policy_weights(policy)
        if r.warm_start_steps:
            self.warm_start(policy)
        self.actor = Actor(policy)
        self.reference = Reference(policy)
        self.critic = None
        if r.policy.advantage in NEEDS_CRITIC:
            head = ScalarHeadModel(self.new_model(seed_offset=1)).to(self.device)
            head.backbone.load_state_dict(policy.state_dict())  # the usual PPO start: critic = policy
            self.critic = Critic(head)
        reward_fn, reward_model = None, None
        if r.reward_model:
            from anymoe.trainers.rlhf.rm import load_reward_model

            reward_model = load_reward_model(self, r.reward_model)
        else:
            reward_fn = WeightedReward.from_config(r.rewards, "rlhf.rewards")
        # Sampling: a stream per rank (rank 0's is the one-process stream).
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 7 + 7919 * self.dp.rank)
        self.rollout = Rollout(self.actor, self.tokenizer, r, reward_fn=reward_fn, reward_model=reward_model,
                               reference=self.reference, critic=self.critic, generator=self.generator,
                               device=self.device)
        self.engine = PolicyTrainer(self.rollout, cfg.optim, self.backend, cfg.train.steps, dp=self.dp)
        self.stream = self.bundle.train_stream(r.rollout.prompts_per_step)
        params = sum(p.numel() for p in policy.parameters())
        self.message(f"{self.algo}: backend {self.backend.name}, policy {params / 1e6:.2f}M parameters, "
                     f"advantage {r.policy.advantage}, critic {'yes' if self.critic else 'no'}, "
                     f"routing replay "
                     f"{'on' if r.moe.routing_replay else 'off'}, reward "
                     f"{'model' if reward_model else ' + '.join(f'{t.weight}*{t.name}' for t in r.rewards)}")

    def warm_start(self, policy: torch.nn.Module) -> None:
        r = self.cfg.rlhf
        rows = [item_row(self.bundle.train[i]) for i in range(len(self.bundle.train))]
        if not all("answer" in row for row in rows):
            self.message("warm start skipped: the prompts carry no answers to take the format from")
            return
        pairs = format_pairs([{"prompt": self.bundle.train[i].prompt, **rows[i]} for i in range(len(rows))],
                             "prompt", "answer", self.cfg.train.seed)
        losses = sft_steps(policy, self.tokenizer, pairs, r.warm_start_steps, lr=r.warm_start_lr,
                           seed=self.cfg.train.seed)
        self.message(f"format warm start: {r.warm_start_steps} SFT steps, "
                     f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    def train_step(self, step: int) -> StepOutput:
        before = {}
        if step == 0 and (self.cfg.eval.every or self.cfg.eval.at_end):
            # The start of the curve: the held-out score before any update (logged with step 1).
            before = {f"{k}_before": v for k, v in self.evaluate().items()}
            if before:
                self.message("before RL: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
        items = self.dp.shard(self.stream.next_batch()["items"])  # every rank draws the step's prompts
        self.engine.step_count = step  # the lr schedule follows the loop's step (resume-safe)
        row = self.engine.step([item_row(it) for it in items], [it.prompt for it in items])
        row.update(before)
        row.pop("step", None)
        loss = row.pop("loss")
        if row.get("nonfinite", 0) > 0:
            bad = int(row["nonfinite"])
            return StepOutput(loss=float("nan"), skipped=True, metrics=row,
                              reason=f"{bad} micro-step(s) with a non-finite loss or gradient")
        tokens = int(row.get("response_len", 0) * len(items) * self.dp.size
                     * self.cfg.rlhf.rollout.samples_per_prompt)
        return StepOutput(loss=loss, tokens=tokens, metrics=row)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy answers to the first ``eval_prompts`` held-out prompts, scored by the same reward."""
        n = min(self.cfg.rlhf.eval_prompts, len(self.bundle.eval))
        if n == 0:
            return {}
        items = [self.bundle.eval[i] for i in range(n) if self.dp.owns(i)]  # each rank a share
        scores, exact = [torch.zeros(0)], []
        by_len: dict[int, list[Any]] = {}
        for it in items:
            by_len.setdefault(len(it.prompt_ids), []).append(it)
        self.actor.module.eval()
        for group in by_len.values():
            prompt = torch.tensor([list(it.prompt_ids) for it in group], device=self.device)
            gen = generate_rl(self.actor.module, prompt, self.cfg.rlhf.rollout.max_new_tokens,
                              eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, temperature=0.0)
            seq = torch.cat([prompt, gen.tokens_BR], 1)
            mask = self.rollout.response_mask(gen.tokens_BR)
            s, _parts, texts = self.rollout.score([it.prompt for it in group], seq, prompt.shape[1], mask,
                                                  [item_row(it) for it in group])
            scores.append(s.float().cpu())
            exact += [float(t.strip() == (it.answer or "").strip()) for t, it in zip(texts, group)]
        self.actor.module.train()
        total, right, count = self.dp.sum([torch.cat(scores).sum().item(), sum(exact), len(exact)])
        return {"eval_reward": total / count, "eval_exact": right / count}

    def _rl_state_file(self, rank: int) -> str:
        """The sampling and shuffling generators of a rank (rank 0 keeps the one-process name)."""
        return "rl_state.pt" if rank == 0 else f"rl_state_rank{rank:05d}.pt"

    def checkpoint_files(self) -> dict[str, Any]:
        rl_state = {self._rl_state_file(self.dp.rank): {"generator": self.generator.get_state(),
                                                        "shuffle": self.engine.shuffle.get_state()}}
        if not self.dist.is_main:  # the replicas are equal: rank 0 writes the models
            return rl_state
        files = {"model.pt": self.actor.module.state_dict(), "optim.pt": self.engine.optimizer.state_dict(),
                 "reference.pt": self.reference.module.state_dict(), **rl_state}
        if self.critic is not None:
            files["critic.pt"] = self.critic.module.state_dict()
            files["critic_optim.pt"] = self.engine.critic_optimizer.state_dict()
        return files

    def load_checkpoint(self, path: Path, restore_data: bool = True) -> None:
        load = self.ckpt.load
        self.actor.module.load_state_dict(load(path, "model.pt"))
        self.engine.optimizer.load_state_dict(load(path, "optim.pt"))
        self.reference.module.load_state_dict(load(path, "reference.pt"))
        own = self._rl_state_file(self.dp.rank)
        state = load(path, own if (path / own).is_file() else "rl_state.pt")  # else: a smaller world's
        self.engine.shuffle.set_state(state["shuffle"])
        if own == "rl_state.pt" or (path / own).is_file():
            self.generator.set_state(state["generator"])
        else:  # a rank the saving world lacked: its own stream, not a copy of rank 0's
            step = int(self.ckpt.manifest(path)["step"])
            self.generator.manual_seed(self.cfg.train.seed + 7 + 7919 * self.dp.rank + 104729 * step)
        if self.critic is not None:
            self.critic.module.load_state_dict(load(path, "critic.pt"))
            self.engine.critic_optimizer.load_state_dict(load(path, "critic_optim.pt"))

    def data_state(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


__all__ = ["PPOTrainer", "item_row"]
