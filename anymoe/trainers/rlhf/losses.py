"""Every RLHF loss in one place: policy (PPO/GRPO clip), value, KL, DPO/IPO, Bradley-Terry.

Legend: B sequences, R response tokens (the positions a loss counts, ``mask_BR``), E experts.

The functions are pure: tensors in, a scalar loss and a dict of float statistics out. The
trainers (ppo.py, grpo.py, dpo.py, rm.py) only decide which of them to call with what.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from anymoe.core.config import ConfigError

LossAgg = Literal["token-mean", "seq-mean", "dr-grpo"]
KLKind = Literal["k1", "k2", "k3"]
DPOType = Literal["sigmoid", "ipo"]


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (0 where the mask is empty)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked positions (batch statistics, as in REINFORCE++)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def aggregate(loss_BR: Tensor, mask_BR: Tensor, agg: LossAgg, max_len: int | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar.

    token-mean: sum over all response tokens / their count (DAPO; long answers weigh more).
    seq-mean:   mean over tokens of each sequence, then mean over sequences (the GRPO paper).
    dr-grpo:    sum over tokens / (B * max_len), a constant normaliser (Dr. GRPO, Liu et al.
                2025) so neither length nor group std biases the gradient.
    """
    mask = mask_BR.to(loss_BR.dtype)
    if agg == "token-mean":
        return (loss_BR * mask).sum() / mask.sum().clamp(min=1)
    if agg == "seq-mean":
        per_seq = (loss_BR * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.mean()
    if agg == "dr-grpo":
        norm = max_len if max_len is not None else loss_BR.shape[-1]
        return (loss_BR * mask).sum() / (loss_BR.shape[0] * norm)
    raise ConfigError("loss_agg", f"unknown aggregation {agg!r}; use token-mean, seq-mean or dr-grpo")


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs (Schulman 2020).

    k1 = log(p/q) (unbiased, can be negative: the usual KL-in-reward term),
    k2 = 0.5 * log(p/q)^2, k3 = q/p - 1 - log(q/p) (unbiased and >= 0: GRPO's KL loss).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # Clamp before exp: a far-off token would otherwise give inf and a NaN gradient.
        neg = (-log_ratio).clamp(-20.0, 20.0)
        return torch.exp(neg) - 1 - neg
    raise ConfigError("kl.kind", f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def truncated_is_weight(train_logp: Tensor, rollout_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance weight min(pi_train / pi_rollout, cap), no gradient.

    The rollout engine (KV-cache generator, maybe other numerics or other routing) and the
    training forward give different probabilities for the same token; the sampled data are
    then off-policy for the training policy. Weighting each token's loss by the capped ratio
    corrects that bias with bounded variance (Yao et al. 2025, "truncated importance sampling").
    """
    return torch.exp(train_logp - rollout_logp).clamp(max=cap).detach()


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                clip_eps: float = 0.2, clip_eps_high: float | None = None, agg: LossAgg = "token-mean",
                max_len: int | None = None, is_weight: Tensor | None = None,
                dual_clip: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman 2017, eq. 7), token-level, all [B, R].

    loss_t = -min(r_t A_t, clip(r_t, 1-eps_lo, 1+eps_hi) A_t), r_t = exp(logp - old_logp).
    ``clip_eps_high`` gives DAPO's asymmetric clip; ``dual_clip`` bounds the loss for negative
    advantages (Ye et al. 2020); ``is_weight`` multiplies each token (truncated IS).
    """
    ratio = torch.exp(logp - old_logp)
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps, 1 + hi) * advantages
    loss = -torch.min(surr1, surr2)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -dual_clip * advantages), loss)
    if is_weight is not None:
        loss = loss * is_weight
    out = aggregate(loss, mask, agg, max_len)
    with torch.no_grad():
        clipped = (surr2 < surr1).to(logp.dtype)
        stats = {
            "clip_frac": masked_mean(clipped, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "ratio_max": ratio.masked_fill(mask == 0, float("-inf")).max().item() if mask.any() else 1.0,
            "approx_kl": masked_mean(kl_penalty(old_logp, logp, "k3"), mask).item(),
        }
    return out, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               clip_eps: float | None = 0.2, agg: LossAgg = "token-mean") -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = old + clip(V - old, +-eps)."""
    err = (values - returns) ** 2
    if clip_eps is not None:
        v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        err_clip = (v_clip - returns) ** 2
        loss = 0.5 * torch.max(err, err_clip)
        frac = masked_mean((err_clip > err).to(values.dtype), mask).item()
    else:
        loss, frac = 0.5 * err, 0.0
    return aggregate(loss, mask, agg), {"value_clip_frac": frac}


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last dim, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits_BLV: Tensor, targets_BL: Tensor) -> Tensor:
    """log p(target) under the softmax of ``logits`` (float32, memory-light gather)."""
    logits = logits_BLV.float()
    return logits.gather(-1, targets_BL.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float = 0.1, loss_type: DPOType = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7) on summed sequence log-probs, all [B].

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).
    sigmoid: -(1-eps) log sigma(beta h) - eps log sigma(-beta h): eps > 0 is conservative DPO
             (labels flipped with probability eps; Mitchell 2023).
    ipo:     (h - 1/(2 beta))^2 (Azar et al. 2023, eq. 17; beta is IPO's tau).
    Returns per-pair losses and the implicit rewards beta * (log pi - log ref) of each side.
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError("dpo.loss_type", f"unknown DPO loss {loss_type!r}; use sigmoid or ipo")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Reward-model loss -log sigma(r_w - r_l [- margin]) (Bradley-Terry; InstructGPT eq. 1), mean."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


__all__ = [
    "DPOType", "KLKind", "LossAgg", "aggregate", "bradley_terry_loss", "dpo_loss", "entropy_from_logits",
    "kl_penalty", "masked_mean", "masked_whiten", "policy_loss", "token_logprobs", "truncated_is_weight",
    "value_loss",
]
