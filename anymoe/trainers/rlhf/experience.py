"""The Experience record: one batch of rollouts and everything the losses need from it.

Legend: B sequences, L = P + R tokens per sequence (P prompt, R response), K top-k,
N MoE layers. Prompts in one record share the length P (the rollout buckets prompts by
length), responses are right-padded after their end token; causal attention means the pad
never changes a real token's output, so no attention mask is needed.

Log-prob and value tensors cover response positions only: entry [b, r] belongs to token
``sequences_BL[b, P + r]``, predicted from position ``P + r - 1``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

PER_TOKEN = ("routing_NTK", "ref_router_NTE")  # lists of per-token tensors, rows b*L .. b*L+L-1


@dataclass
class Experience:
    sequences_BL: Tensor                  # long [B, L]: prompt then response (right-padded)
    prompt_len: int                       # P
    mask_BR: Tensor                       # float [B, R]: 1 on real response tokens (end token included)
    rollout_logp_BR: Tensor               # float [B, R]: log-probs the generator sampled with
    old_logp_BR: Tensor                   # float [B, R]: training-forward log-probs before the update
    scores_B: Tensor                      # float [B]: reward of each whole response
    token_rewards_BR: Tensor              # float [B, R]: score on the last token (+ per-token KL term)
    advantages_BR: Tensor                 # float [B, R]
    returns_BR: Tensor                    # float [B, R]
    ref_logp_BR: Tensor | None = None     # float [B, R]: frozen reference policy
    values_BR: Tensor | None = None       # float [B, R]: critic values (PPO)
    routing_NTK: list[Tensor] | None = None  # N x long [B*L, K]: rollout expert choices (routing replay)
    ref_router_NTE: list[Tensor] | None = None  # N x float [B*L, E]: reference router probabilities
    reward_parts: dict[str, Tensor] = field(default_factory=dict)  # name -> float [B]
    texts: list[str] = field(default_factory=list)  # decoded responses, for logs

    @property
    def batch_size(self) -> int:
        return self.sequences_BL.shape[0]

    @property
    def response_len(self) -> int:
        return self.sequences_BL.shape[1] - self.prompt_len

    def check(self) -> Experience:
        """Assert the shape invariants above (an internal contract: a failure is a bug)."""
        B, L = self.sequences_BL.shape
        R = L - self.prompt_len
        assert R > 0, f"no response positions (L={L}, P={self.prompt_len})"
        for name in ("mask_BR", "rollout_logp_BR", "old_logp_BR", "token_rewards_BR", "advantages_BR",
                     "returns_BR", "ref_logp_BR", "values_BR"):
            t = getattr(self, name)
            assert t is None or tuple(t.shape) == (B, R), f"{name} has shape {tuple(t.shape)}, want {(B, R)}"
        assert tuple(self.scores_B.shape) == (B,), f"scores_B has shape {tuple(self.scores_B.shape)}"
        for name in PER_TOKEN:
            for i, t in enumerate(getattr(self, name) or []):
                assert t.shape[0] == B * L, f"{name}[{i}] covers {t.shape[0]} tokens, want {B * L}"
        return self

    def to(self, device: torch.device) -> Experience:
        def move(v):
            if isinstance(v, Tensor):
                return v.to(device)
            if isinstance(v, list) and v and isinstance(v[0], Tensor):
                return [t.to(device) for t in v]
            if isinstance(v, dict):
                return {k: move(t) for k, t in v.items()}
            return v

        moved = {f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **moved)

    def select(self, rows: Tensor | slice) -> Experience:
        """The sub-record of the given rows (routing ids are per token, so rows expand to tokens)."""
        B, L = self.sequences_BL.shape
        idx = torch.arange(B)[rows] if isinstance(rows, slice) else rows
        kwargs = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in PER_TOKEN and v is not None:
                tok = (idx.view(-1, 1) * L + torch.arange(L)).reshape(-1).to(v[0].device)
                v = [ids.index_select(0, tok) for ids in v]
            elif f.name == "texts":
                v = [v[i] for i in idx.tolist()] if v else []
            elif f.name == "reward_parts":
                v = {k: t[idx.to(t.device)] for k, t in v.items()}
            elif isinstance(v, Tensor):
                v = v[idx.to(v.device)]
            kwargs[f.name] = v
        return Experience(**kwargs)

    def micro_batches(self, size: int, generator: torch.Generator | None = None) -> list[Experience]:
        """Split into shuffled micro-batches of ``size`` rows (the last may be smaller)."""
        order = torch.randperm(self.batch_size, generator=generator) if generator is not None \
            else torch.arange(self.batch_size)
        return [self.select(order[i:i + size]) for i in range(0, self.batch_size, size)]


__all__ = ["Experience"]
