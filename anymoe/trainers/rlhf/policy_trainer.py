"""One on-policy RL step for PPO, GRPO, REINFORCE++ and RLOO: rollout, update, measure.

Legend: B sequences, R response tokens, N MoE layers, E experts.

The algorithms differ only in configuration: the advantage estimator (gae needs the
critic), where the KL to the reference goes (reward or loss) and the loss aggregation.
A step is three named phases::

    experiences, rollout_stats = rollout.make_experience(rows, prompts)
    update_stats = update(experiences)          # epochs x micro-batches of policy (+ critic) steps
    row = measure(experiences, rollout_stats, update_stats)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from anymoe.trainers.metrics import load_stats
from anymoe.trainers.optim import LRSchedule, OptimConfig, build_optimized
from anymoe.trainers.profiling import phase
from anymoe.trainers.rlhf.data_parallel import DataParallel
from anymoe.trainers.rlhf.experience import Experience
from anymoe.trainers.rlhf.losses import (
    aggregate,
    kl_penalty,
    masked_mean,
    policy_loss,
    truncated_is_weight,
    value_loss,
)
from anymoe.trainers.rlhf.roles import Actor, Critic
from anymoe.trainers.rlhf.rollout import Rollout, RolloutStats
from anymoe.trainers.rlhf.routing import freeze_routers, router_kl


def _moe_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if callable(getattr(m, "update_bias", None))]


class PolicyTrainer:
    """Owns the optimisers; ``step(rows, prompts)`` runs one RL iteration and returns a metrics row."""

    def __init__(self, rollout: Rollout, optim: OptimConfig, backend: Any, total_steps: int,
                 critic_optim: OptimConfig | None = None, dp: DataParallel | None = None) -> None:
        self.rollout = rollout
        self.dp = dp or DataParallel()
        self.cfg = rollout.cfg
        self.actor: Actor = rollout.actor
        self.critic: Critic | None = rollout.critic
        if self.cfg.moe.freeze_router:
            freeze_routers(self.actor.module)
        # The actor object is shared with the rollout, so the optimised module reaches both.
        self.actor.module, self.optimizer = build_optimized(self.actor.module, optim, backend)
        self.schedule = LRSchedule(optim, total_steps)
        self.critic_optimizer = None
        if self.critic is not None:
            c_optim = critic_optim or OptimConfig(lr=self.cfg.critic.lr, min_lr=0.0, schedule="constant",
                                                  warmup_steps=0)
            self.critic.module, self.critic_optimizer = build_optimized(self.critic.module, c_optim, backend)
        self.grad_clip = optim.grad_clip
        self.shuffle = torch.Generator().manual_seed(1234)
        self.step_count = 0

    # ---- phase 2: update ----
    def update(self, experiences: list[Experience]) -> dict[str, float]:
        pol = self.cfg.policy
        lr = self.schedule.apply(self.optimizer, self.step_count)
        sums: dict[str, list[float]] = defaultdict(list)
        first = True
        for epoch in range(pol.epochs):
            # Epoch 0 walks the same consecutive chunks old_logp was computed on (ratio == 1 exactly).
            mbs = [mb for exp in experiences
                   for mb in exp.micro_batches(pol.micro_batch, self.shuffle if epoch > 0 else None)]
            for i in range(self.dp.max(len(mbs))):  # a rank out of micro-batches joins with none
                mb = mbs[i] if i < len(mbs) else None
                stats = self.policy_step(mb)
                if first and "ratio_max_dev" in stats:
                    sums["first_ratio_max_dev"].append(stats["ratio_max_dev"])
                    first = False
                if self.critic is not None:
                    stats.update(self.critic_step(mb))
                for k, v in stats.items():
                    sums[k].append(v)
        out = {k: sum(v) / len(v) for k, v in sums.items()}
        out["nonfinite"] = float(sum(sums.get("nonfinite", [])))
        out["lr"] = lr
        return out

    def policy_step(self, mb: Experience | None) -> dict[str, float]:
        """One optimiser step of the policy on one micro-batch (None: this rank has none left and
        joins the data-parallel gradient average with zeros)."""
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        loss = None
        # token-mean terms over the union of the ranks' micro-batches, not each rank's own tokens
        share = self.dp.token_share(float(mb.mask_BR.sum()) if mb is not None else 0.0, mb is not None)
        if mb is not None:
            loss, stats, after = self._policy_loss(mb, share)
            loss.backward()
        params = list(self.actor.parameters())
        self.dp.average_gradients(params, took_part=mb is not None)
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))
        if mb is not None:
            stats["grad_norm"] = float(norm)
        if self.dp.any(loss is not None and not bool(torch.isfinite(loss))) or not torch.isfinite(norm):
            # A non-finite loss or gradient on any rank: no update (the loop counts the step as skipped).
            self.optimizer.zero_grad(set_to_none=True)
            if mb is not None:
                stats["nonfinite"] = 1.0
            return stats
        self.optimizer.step()
        if self.cfg.moe.update_bias:
            for layer in _moe_layers(self.actor.module):
                layer.update_bias(self.dp.group)  # loads summed over the ranks: every replica moves alike
        if mb is not None:
            stats.update(after())
        return stats

    def _policy_loss(self, mb: Experience, share: float = 1.0
                     ) -> tuple[Tensor, dict[str, float], Callable[[], dict[str, float]]]:
        """The policy loss of one micro-batch, its named terms, and the statistics to read after the step.

        ``share`` (``DataParallel.token_share``) rescales the token-mean terms so that the ranks'
        averaged gradient is that of the mean over every rank's tokens (1 in one process)."""
        pol, moe = self.cfg.policy, self.cfg.moe
        token_mean = pol.loss_agg == "token-mean"
        replay = mb.routing_NTK if moe.routing_replay else None
        logp, entropy, out = self.actor.logprobs(mb.sequences_BL, mb.prompt_len, replay, entropy=True)
        is_weight = None
        if moe.tis_cap > 0:
            is_weight = truncated_is_weight(mb.old_logp_BR, mb.rollout_logp_BR, moe.tis_cap)
        pg, stats = policy_loss(logp, mb.old_logp_BR, mb.advantages_BR, mb.mask_BR, clip_eps=pol.clip_eps,
                                clip_eps_high=pol.clip_eps_high or None, agg=pol.loss_agg,
                                max_len=self.cfg.rollout.max_new_tokens, is_weight=is_weight)
        loss = pg * share if token_mean and share != 1.0 else pg
        if pol.kl_coef > 0 and not pol.kl_in_reward and mb.ref_logp_BR is not None:
            kl = aggregate(kl_penalty(logp, mb.ref_logp_BR, pol.kl_kind), mb.mask_BR, pol.loss_agg,
                           self.cfg.rollout.max_new_tokens)
            loss = loss + pol.kl_coef * (kl * share if token_mean and share != 1.0 else kl)
            stats["kl_loss"] = kl.item()
        ent = masked_mean(entropy, mb.mask_BR)
        if pol.entropy_coef > 0:
            loss = loss - pol.entropy_coef * (ent * share if share != 1.0 else ent)  # always a token mean
        if moe.router_kl_coef > 0 and mb.ref_router_NTE is not None:
            tok_mask = self._token_mask(mb)
            rkl = sum(router_kl(p, q, tok_mask) for p, q in zip(out.router_probs_NTE, mb.ref_router_NTE))
            rkl = rkl / max(len(mb.ref_router_NTE), 1)
            loss = loss + moe.router_kl_coef * rkl
            stats["router_kl"] = rkl.item()
        loss = loss + out.aux_loss

        def after() -> dict[str, float]:
            with torch.no_grad():
                ratio = torch.exp(logp - mb.old_logp_BR)
                dev = ((ratio - 1).abs() * mb.mask_BR).max().item()
            return {"policy_loss": pg.item(), "entropy": ent.item(), "aux_loss": float(out.aux_loss.detach()),
                    "ratio_max_dev": dev}

        return loss, stats, after

    def critic_step(self, mb: Experience | None) -> dict[str, float]:
        assert self.critic is not None and self.critic_optimizer is not None
        self.critic_optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        vloss = None
        share = self.dp.token_share(float(mb.mask_BR.sum()) if mb is not None else 0.0, mb is not None)
        if mb is not None:
            assert mb.values_BR is not None
            replay = mb.routing_NTK if self.cfg.moe.routing_replay else None
            values = self.critic.values(mb.sequences_BL, mb.prompt_len, replay)
            vloss, stats = value_loss(values, mb.values_BR, mb.returns_BR, mb.mask_BR,
                                      clip_eps=self.cfg.critic.value_clip or None)
            # a token mean: weighted by this rank's share of the micro-step's tokens, as the policy's
            (self.cfg.critic.coef * (vloss * share if share != 1.0 else vloss)).backward()
            stats["value_loss"] = vloss.item()
        params = list(self.critic.parameters())
        self.dp.average_gradients(params, took_part=mb is not None)
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))
        if not self.dp.any(vloss is not None and not bool(torch.isfinite(vloss))) and torch.isfinite(norm):
            self.critic_optimizer.step()
        elif mb is not None:
            stats["nonfinite"] = 1.0
        return stats

    @staticmethod
    def _token_mask(mb: Experience) -> Tensor:
        B = mb.batch_size
        return torch.cat([torch.ones(B, mb.prompt_len, device=mb.mask_BR.device), mb.mask_BR], 1).reshape(-1)

    # ---- phase 3: measure ----
    def measure(self, experiences: list[Experience], rstats: RolloutStats,
                upd: Mapping[str, float]) -> dict[str, Any]:
        upd = self.dp.mean(dict(upd))  # every rank's update statistics, averaged
        scores = self.dp.gather(torch.cat([e.scores_B.float().cpu() for e in experiences]))
        lengths = self.dp.gather(torch.cat([e.mask_BR.sum(1).float().cpu() for e in experiences]))
        row: dict[str, Any] = {
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std().item() if scores.numel() > 1 else 0.0,
            "response_len": lengths.mean().item(), "loss": upd.get("policy_loss", 0.0),
        }
        parts: dict[str, list[Tensor]] = defaultdict(list)
        for e in experiences:
            for k, v in e.reward_parts.items():
                parts[k].append(v.float().cpu())
        for k, v in sorted(parts.items()):  # the same keys on every rank (the same reward terms)
            row[f"reward/{k}"] = self.dp.gather(torch.cat(v)).mean().item()
        kls = [(masked_mean(kl_penalty(e.old_logp_BR, e.ref_logp_BR, "k1"), e.mask_BR).item(), e.batch_size)
               for e in experiences if e.ref_logp_BR is not None]
        if kls:
            kl_sum, kl_n = self.dp.sum([sum(k * n for k, n in kls), sum(n for _, n in kls)])
            row["kl"] = kl_sum / kl_n
        row.update({k: v for k, v in upd.items() if k != "policy_loss"})
        row.update(self.dp.mean({"routing_agreement": rstats.agreement.get("exact", 1.0),
                                 "routing_overlap": rstats.agreement.get("overlap", 1.0),
                                 "rollout_train_logp_gap": rstats.rollout_train_logp_gap}))
        row["layers"] = self._expert_load(experiences)
        return row

    def _expert_load(self, experiences: list[Experience]) -> list[dict[str, Any]]:
        layers: list[dict[str, Any]] = []
        if not experiences or not experiences[0].routing_NTK:
            return layers
        E = 1 + max(int(t.max()) for e in experiences for t in e.routing_NTK)
        E = self.dp.max(max(E, self._num_experts()))  # the same bins on every rank
        for n in range(len(experiences[0].routing_NTK)):
            counts = sum(torch.bincount(e.routing_NTK[n].reshape(-1).cpu(), minlength=E).float()
                         for e in experiences)
            layers.append(load_stats(torch.tensor(self.dp.sum(counts.tolist()))))
        return layers

    def _num_experts(self) -> int:
        """The model's expert count where its config states it (0 if it does not)."""
        moe = getattr(getattr(self.actor.module, "cfg", None), "moe", None)
        return int(getattr(moe, "num_experts", 0) or 0)

    # ---- the whole step ----
    def step(self, rows: Sequence[Mapping[str, Any]], prompts: Sequence[str]) -> dict[str, Any]:
        with phase("rollout"):  # generation, rewards, reference and old log-probs, advantages
            experiences, rstats = self.rollout.make_experience(rows, prompts)
        with phase("update"):
            upd = self.update(experiences)
        with phase("statistics"):
            row = self.measure(experiences, rstats, upd)
        self.step_count += 1
        row["step"] = self.step_count
        return row


__all__ = ["PolicyTrainer"]
