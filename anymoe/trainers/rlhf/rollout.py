"""Rollout: sample responses, score them, and turn them into Experience records.

Legend: B sequences (= prompts x G samples), P prompt tokens, R response tokens, L = P + R,
N MoE layers, K top-k, E experts.

Phases of ``make_experience`` (each a named function below):
  1. generate      KV-cache sampling; records the rollout's log-probs and expert choices;
  2. score         decode responses, reward callables (or a reward model) -> scores [B];
  3. evaluate      training-forward log-probs (with routing replay if on), reference
                   log-probs and router distributions, critic values, routing agreement;
  4. advantages    token rewards (score on the last token, optional KL penalty) -> the
                   configured estimator.
Prompts are bucketed by token length so a record needs no attention mask.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from anymoe.trainers.rlhf.advantages import AdvantageInputs, get_advantage
from anymoe.trainers.rlhf.algo_config import AlgoSection
from anymoe.trainers.rlhf.experience import Experience
from anymoe.trainers.rlhf.losses import kl_penalty, masked_mean, masked_whiten
from anymoe.trainers.rlhf.model_io import generate_rl
from anymoe.trainers.rlhf.roles import Actor, Critic, Reference, RewardModel
from anymoe.trainers.rlhf.routing import layered_agreement


class Tokenizer(Protocol):
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


Rows = Sequence[Mapping[str, Any]]
ScoreFn = Callable[[Sequence[str], Sequence[str], Rows], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class RolloutStats:
    """What one rollout measured, beyond what the Experience records carry."""

    agreement: dict[str, float] = field(default_factory=dict)  # rollout vs natural training routing
    rollout_train_logp_gap: float = 0.0  # mean |log pi_train - log pi_rollout| over response tokens


@dataclass
class Rollout:
    """Everything make_experience needs; built once per trainer."""

    actor: Actor
    tokenizer: Tokenizer
    cfg: AlgoSection
    reward_fn: ScoreFn | None = None
    reward_model: RewardModel | None = None
    reference: Reference | None = None
    critic: Critic | None = None
    generator: torch.Generator | None = None
    device: torch.device = torch.device("cpu")
    _engine: nn.Module | None = field(default=None, init=False, repr=False)

    def encode_prompt(self, text: str) -> list[int]:
        """The prompt's tokens, no special tokens (the SFT datasets' convention, so an SFT model fits)."""
        return self.tokenizer.encode(text)

    # ---- 1. generate ----
    def sampler(self) -> nn.Module:
        """The module that samples: the policy itself, or a bf16 copy synced to it before each rollout
        (what an inference engine does; its other numerics are what routing replay and TIS correct)."""
        if self.cfg.rollout.dtype == "fp32":
            return self.actor.module
        if self._engine is None:
            self._engine = copy.deepcopy(self.actor.module).to(torch.bfloat16)
        else:
            self._engine.load_state_dict(self.actor.module.state_dict())  # weight sync, cast on copy
        return self._engine

    def generate(self, prompt_BP: Tensor):
        r = self.cfg.rollout
        module = self.sampler()
        module.eval()
        try:
            return generate_rl(module, prompt_BP, r.max_new_tokens, eos_id=self.tokenizer.eos_id,
                               pad_id=self.tokenizer.pad_id, temperature=r.temperature, top_k=r.top_k,
                               generator=self.generator)
        finally:
            module.train()

    def response_mask(self, tokens_BR: Tensor) -> Tensor:
        """1 up to and including the first end token; 0 after it."""
        is_eos = (tokens_BR == self.tokenizer.eos_id).long()
        after = torch.cumsum(is_eos, 1) - is_eos  # end tokens strictly before this position
        return (after == 0).float()

    # ---- 2. score ----
    def score(self, prompts: Sequence[str], seq_BL: Tensor, prompt_len: int, mask_BR: Tensor,
              rows: Rows) -> tuple[Tensor, dict[str, Tensor], list[str]]:
        texts = []
        for b in range(seq_BL.shape[0]):
            ids = seq_BL[b, prompt_len:][mask_BR[b].bool()].tolist()
            if ids and ids[-1] == self.tokenizer.eos_id:
                ids = ids[:-1]
            texts.append(self.tokenizer.decode(ids))
        if self.reward_model is not None:
            # Read the head where `anymoe rlhf rm` read it: the last response token before the end
            # token (the preference rows hold prompt + response without the end token).
            n_B = mask_BR.sum(1).long()
            last_tok = seq_BL.gather(1, (prompt_len + n_B - 1).clamp(min=0).view(-1, 1)).squeeze(1)
            last_B = prompt_len + n_B - 1 - (last_tok == self.tokenizer.eos_id).long()
            with torch.no_grad():
                scores, _ = self.reward_model.score(seq_BL, last_B)
            return scores.float().cpu(), {"reward_model": scores.float().cpu()}, texts
        assert self.reward_fn is not None, "a rollout needs reward callables or a reward model"
        scores, parts = self.reward_fn(prompts, texts, rows)
        return scores, parts, texts

    # ---- 3. evaluate ----
    @torch.no_grad()
    def evaluate(self, exp: Experience, micro_batch: int) -> RolloutStats:
        """Fill old/ref log-probs, reference router probs and values, chunk by chunk.

        old_logp is computed on the same consecutive micro-batches the first update epoch
        uses, so with routing replay the first ratio is exactly 1, bit for bit. The critic
        replays the rollout routing too (its value forward and its update see one expert path).
        """
        moe = self.cfg.moe
        replay = moe.routing_replay
        P, L = exp.prompt_len, exp.sequences_BL.shape[1]
        old, ref, vals, ref_router = [], [], [], []
        natural, rollout_ids = [], []
        for start in range(0, exp.batch_size, micro_batch):
            mb = exp.select(slice(start, start + micro_batch))
            replay_ids = mb.routing_NTK if replay else None
            logp, _, out = self.actor.logprobs(mb.sequences_BL, P, replay_ids)
            old.append(logp)
            natural_ids = out.expert_ids_NTK
            if replay and start == 0:  # one extra forward shows what routing would be without replay
                natural_ids = self.actor.logprobs(mb.sequences_BL, P)[2].expert_ids_NTK
            if start == 0:
                natural, rollout_ids = natural_ids, mb.routing_NTK
            if self.reference is not None:
                # The reference routes with its own router: the KL terms compare the policy with
                # the reference model as it is, not with the reference forced onto the policy's experts.
                rlogp, _, rout = self.reference.logprobs(mb.sequences_BL, P)
                ref.append(rlogp)
                if moe.router_kl_coef > 0:
                    ref_router.append(rout.router_probs_NTE)
            if self.critic is not None:
                vals.append(self.critic.values(mb.sequences_BL, P, replay_ids).float())
        exp.old_logp_BR = torch.cat(old)
        if ref:
            exp.ref_logp_BR = torch.cat(ref)
        if ref_router:
            exp.ref_router_NTE = [torch.cat([chunk[n] for chunk in ref_router])
                                  for n in range(len(ref_router[0]))]
        if vals:
            exp.values_BR = torch.cat(vals)
        # Agreement over the first chunk's real tokens (prompt + response up to the end token).
        n_rows = natural[0].shape[0] // L if natural else 0
        tok_mask = torch.cat([torch.ones(n_rows, P, device=exp.mask_BR.device), exp.mask_BR[:n_rows]], 1)
        stats = RolloutStats()
        if natural and rollout_ids:
            stats.agreement = layered_agreement(rollout_ids, natural, tok_mask.reshape(-1))
        gap = (exp.old_logp_BR - exp.rollout_logp_BR).abs()
        stats.rollout_train_logp_gap = masked_mean(gap, exp.mask_BR).item()
        return stats

    # ---- 4. advantages ----
    def advantages(self, exp: Experience) -> None:
        pol = self.cfg.policy
        token_rewards = torch.zeros_like(exp.mask_BR)
        last = exp.mask_BR.sum(1).long().clamp(min=1) - 1
        token_rewards[torch.arange(exp.batch_size, device=last.device), last] = exp.scores_B.to(token_rewards)
        if pol.kl_in_reward and pol.kl_coef > 0 and exp.ref_logp_BR is not None:
            token_rewards = token_rewards - pol.kl_coef * kl_penalty(exp.old_logp_BR, exp.ref_logp_BR, "k1") \
                * exp.mask_BR
        exp.token_rewards_BR = token_rewards
        inp = AdvantageInputs(token_rewards, exp.mask_BR, exp.values_BR,
                              group_size=self.cfg.rollout.samples_per_prompt, gamma=pol.gamma, lam=pol.lam,
                              norm_std=pol.norm_std)
        exp.advantages_BR, exp.returns_BR = get_advantage(pol.advantage, "rlhf.policy.advantage")(inp)
        if pol.whiten_advantages:
            exp.advantages_BR = masked_whiten(exp.advantages_BR, exp.mask_BR)

    # ---- all phases ----
    def record(self, prompt_BP: Tensor, gen: Any, prompts: Sequence[str], rows: Rows
               ) -> tuple[Experience, RolloutStats]:
        """Phases 2-4 for one generated batch (prompts of one length, groups contiguous)."""
        P = prompt_BP.shape[1]
        seq = torch.cat([prompt_BP, gen.tokens_BR], 1)
        mask = self.response_mask(gen.tokens_BR)
        scores, parts, texts = self.score(prompts, seq, P, mask, rows)
        zeros = torch.zeros_like(mask)
        exp = Experience(seq, P, mask, rollout_logp_BR=gen.logp_BR.float() * mask, old_logp_BR=zeros,
                         scores_B=scores.to(self.device), token_rewards_BR=zeros, advantages_BR=zeros,
                         returns_BR=zeros, routing_NTK=gen.routing_NTK, texts=texts,
                         reward_parts={k: v.to(self.device) for k, v in parts.items()})
        stats = self.evaluate(exp, self.cfg.policy.micro_batch)
        self.advantages(exp)
        return exp.check(), stats

    def make_experience(self, rows: Rows, prompts: Sequence[str]) -> tuple[list[Experience], RolloutStats]:
        """One record per prompt length; each prompt sampled ``samples_per_prompt`` times."""
        G = self.cfg.rollout.samples_per_prompt
        buckets: dict[int, list[int]] = {}
        encoded = [self.encode_prompt(p) for p in prompts]
        for i, ids in enumerate(encoded):
            buckets.setdefault(len(ids), []).append(i)
        records, all_stats = [], []
        for _P, idx in sorted(buckets.items()):
            order = [i for i in idx for _ in range(G)]  # the G samples of a prompt sit together
            prompt_BP = torch.tensor([encoded[i] for i in order], dtype=torch.long, device=self.device)
            gen = self.generate(prompt_BP)
            exp, stats = self.record(prompt_BP, gen, [prompts[i] for i in order], [rows[i] for i in order])
            records.append(exp)
            all_stats.append((exp.batch_size, stats))
        return records, _merge_stats(all_stats)


def _merge_stats(weighted: list[tuple[int, RolloutStats]]) -> RolloutStats:
    total = sum(n for n, _ in weighted) or 1
    out = RolloutStats()
    keys = set().union(*(s.agreement for _, s in weighted)) if weighted else set()
    out.agreement = {k: sum(n * s.agreement.get(k, 0.0) for n, s in weighted) / total for k in sorted(keys)}
    out.rollout_train_logp_gap = sum(n * s.rollout_train_logp_gap for n, s in weighted) / total
    return out


__all__ = ["Rollout", "RolloutStats", "ScoreFn", "Tokenizer"]
