"""Advantage estimators behind one registry: GAE, GRPO (group-normalised), REINFORCE++, RLOO.

Legend: B sequences, R response positions, G samples per prompt (``group_size``).

Every estimator has the same signature, so a config names one and the trainer never
branches on it::

    advantages_BR, returns_BR = ADVANTAGES[name](AdvantageInputs(...))

``token_rewards_BR`` holds the reward each response token receives: the sequence score on
its last token, plus any per-token KL penalty. Group estimators (grpo, rloo) need the G
samples of one prompt next to each other in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from anymoe.core.config import ConfigError
from anymoe.trainers.rlhf.losses import masked_whiten


@dataclass(frozen=True)
class AdvantageInputs:
    token_rewards_BR: Tensor
    mask_BR: Tensor
    values_BR: Tensor | None = None  # critic values; GAE only
    group_size: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    norm_std: bool = True  # GRPO divides by the group std; Dr. GRPO (False) does not
    eps: float = 1e-6


Estimator = Callable[[AdvantageInputs], tuple[Tensor, Tensor]]
ADVANTAGES: dict[str, Estimator] = {}
NEEDS_CRITIC = {"gae"}


def register_advantage(name: str) -> Callable[[Estimator], Estimator]:
    """Add an estimator under ``name``; registering a name twice is a bug."""

    def add(fn: Estimator) -> Estimator:
        if name in ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGES[name] = fn
        return fn

    return add


def get_advantage(name: str, field: str = "advantage") -> Estimator:
    if name not in ADVANTAGES:
        raise ConfigError(field, f"unknown advantage estimator {name!r}; choose from {', '.join(ADVANTAGES)}")
    return ADVANTAGES[name]


def discounted_returns(rewards_BR: Tensor, mask_BR: Tensor, gamma: float) -> Tensor:
    """G_t = sum_{s >= t} gamma^(s-t) r_s over the masked positions (one backward scan)."""
    rewards = rewards_BR * mask_BR
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running * mask_BR[:, t]
        out[:, t] = running
    return out * mask_BR


def sequence_scores(inp: AdvantageInputs) -> Tensor:
    """One scalar per sequence: the sum of its token rewards."""
    return (inp.token_rewards_BR * inp.mask_BR).sum(-1)


def _groups(scores_B: Tensor, group_size: int) -> Tensor:
    if group_size < 2 or scores_B.shape[0] % group_size:
        raise ConfigError("group_size", f"group estimators need group_size >= 2 dividing the batch "
                          f"({scores_B.shape[0]} sequences, group_size={group_size})")
    return scores_B.view(-1, group_size)


@register_advantage("gae")
def gae(inp: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16).

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns = A + V.
    Positions past a sequence's end have V = 0 and contribute nothing.
    """
    if inp.values_BR is None:
        raise ConfigError("advantage", "gae needs critic values; use ppo with a critic, "
                          "or grpo/rloo/reinforce_pp")
    mask = inp.mask_BR.to(inp.token_rewards_BR.dtype)
    values = inp.values_BR.detach() * mask
    rewards = inp.token_rewards_BR * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    R = rewards.shape[1]
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + inp.gamma * next_v - values[:, t]
        last = (delta + inp.gamma * inp.lam * last) * mask[:, t]
        adv[:, t] = last
    returns = adv + values
    return adv, returns


@register_advantage("grpo")
def grpo(inp: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Group-normalised advantage (Shao et al. 2024, DeepSeekMath sec. 4.1.2).

    A_i = (r_i - mean_g r) / (std_g r + eps), the same for every token of sample i;
    ``norm_std=False`` is Dr. GRPO's unbiased version A_i = r_i - mean_g r. std is unbiased (n-1).
    """
    scores = _groups(sequence_scores(inp), inp.group_size)
    adv = scores - scores.mean(-1, keepdim=True)
    if inp.norm_std:
        adv = adv / (scores.std(-1, keepdim=True) + inp.eps)
    adv_BR = adv.reshape(-1, 1) * inp.mask_BR
    return adv_BR, adv_BR


@register_advantage("rloo")
def rloo(inp: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j."""
    scores = _groups(sequence_scores(inp), inp.group_size)
    G = inp.group_size
    baseline = (scores.sum(-1, keepdim=True) - scores) / (G - 1)
    adv_BR = (scores - baseline).reshape(-1, 1) * inp.mask_BR
    return adv_BR, adv_BR


@register_advantage("reinforce_pp")
def reinforce_pp(inp: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): discounted token returns, whitened over the whole batch.

    No critic, no group: the per-token KL penalty lives in ``token_rewards_BR`` and the batch
    normalisation is the only baseline.
    """
    mask = inp.mask_BR.to(inp.token_rewards_BR.dtype)
    returns = discounted_returns(inp.token_rewards_BR, mask, inp.gamma)
    return masked_whiten(returns, mask), returns


__all__ = ["ADVANTAGES", "AdvantageInputs", "NEEDS_CRITIC", "discounted_returns", "gae", "get_advantage",
           "grpo", "register_advantage", "reinforce_pp", "rloo", "sequence_scores"]
