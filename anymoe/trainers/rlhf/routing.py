"""MoE-specific RL pieces: routing agreement, routing-consistency KL, expert load, router freezing.

Legend: T tokens, K top-k, E experts, N MoE layers.

Why this matters for RL on MoE: the rollout forward (KV-cache decoding, maybe other numerics)
and the training forward over the same tokens can pick different experts for a token whose
router scores are nearly tied. The two forwards then compute different functions and the
importance ratio pi_train / pi_rollout drifts from 1 for reasons unrelated to learning.
Routing replay (R3) records the rollout's choices and feeds them to the training forward
(``replay_ids``); ``routing_agreement`` measures how often the two would agree without it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def routing_agreement(a_TK: Tensor, b_TK: Tensor, mask_T: Tensor | None = None) -> dict[str, float]:
    """How far two routings of the same tokens agree.

    exact:   fraction of tokens whose set of K experts is identical;
    overlap: mean |set_a & set_b| / K over tokens.
    Worked example, K=2: a=[[0,1],[2,3]], b=[[1,0],[2,0]] -> exact 0.5, overlap (2/2 + 1/2)/2 = 0.75.
    """
    assert a_TK.shape == b_TK.shape, f"routings differ in shape: {tuple(a_TK.shape)} vs {tuple(b_TK.shape)}"
    K = a_TK.shape[-1]
    same_set = (a_TK.sort(-1).values == b_TK.sort(-1).values).all(-1).float()
    overlap = (a_TK.unsqueeze(-1) == b_TK.unsqueeze(-2)).any(-1).float().sum(-1) / K
    if mask_T is None:
        mask_T = torch.ones_like(same_set)
    mask = mask_T.float()
    n = mask.sum().clamp(min=1)
    return {"exact": ((same_set * mask).sum() / n).item(), "overlap": ((overlap * mask).sum() / n).item()}


def layered_agreement(a_NTK: list[Tensor], b_NTK: list[Tensor],
                      mask_T: Tensor | None = None) -> dict[str, float]:
    """routing_agreement per layer (``layer{i}``) and the mean over layers (``exact``, ``overlap``)."""
    out: dict[str, float] = {}
    exact, overlap = [], []
    for i, (a, b) in enumerate(zip(a_NTK, b_NTK)):
        agr = routing_agreement(a, b, mask_T)
        out[f"layer{i}"] = agr["exact"]
        exact.append(agr["exact"])
        overlap.append(agr["overlap"])
    out["exact"] = sum(exact) / max(len(exact), 1)
    out["overlap"] = sum(overlap) / max(len(overlap), 1)
    return out


def router_kl(policy_probs_TE: Tensor, ref_probs_TE: Tensor, mask_T: Tensor | None = None,
              eps: float = 1e-9) -> Tensor:
    """Routing-consistency term: mean over tokens of KL(policy router || reference router).

    Computed in float32 on the full E-way router distributions (not just the chosen experts),
    so it pulls the whole routing distribution, not only the top-k, back toward the reference.
    Gradient flows into the policy's router only (the reference is detached).
    """
    p = policy_probs_TE.float().clamp(min=eps)
    q = ref_probs_TE.detach().float().clamp(min=eps)
    kl_T = (p * (p.log() - q.log())).sum(-1)
    if mask_T is None:
        return kl_T.mean()
    m = mask_T.float()
    return (kl_T * m).sum() / m.sum().clamp(min=1)


def expert_load(ids_TK: Tensor, num_experts: int, mask_T: Tensor | None = None) -> Tensor:
    """Fraction of (token, slot) assignments each expert got: float [E], sums to 1."""
    ids = ids_TK if mask_T is None else ids_TK[mask_T.bool()]
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts).float()
    return counts / counts.sum().clamp(min=1)


def router_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters of every router in ``model`` (modules named ``router`` or ``*.router.*``)."""
    return [(n, p) for n, p in model.named_parameters() if ".router." in f".{n}" or n.startswith("router.")]


def freeze_routers(model: nn.Module) -> int:
    """Stop gradients into every router (RL keeps the pretrained routing); returns how many tensors."""
    params = router_parameters(model)
    for _n, p in params:
        p.requires_grad_(False)
    return len(params)


__all__ = ["expert_load", "freeze_routers", "layered_agreement", "router_kl", "router_parameters",
           "routing_agreement"]
