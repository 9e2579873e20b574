"""Token dispatch: bring each (token, slot) pair to its expert, and the results back.

The MoE layer calls a ``TokenDispatcher`` in two phases with a frozen record between them
(no state on ``self``): ``dispatch`` sorts rows by local expert (and, for expert
parallelism, exchanges them between ranks), the experts run a grouped matmul on the
sorted rows, and ``combine`` returns every token's weighted sum over its K slots.
``LocalDispatcher`` (one rank, all experts local) is the default; the expert-parallel
all-to-all / all-gather dispatchers in anymoe.core.ep_dispatch implement the same protocol.

Dropped pairs: capacity is applied *before* dispatch as a mask on the routing
(``apply_capacity``): a dropped pair has expert id -1 and combine weight 0, so every
dispatcher sees the same drops. A dispatcher must give a dropped pair zero contribution;
the local one keeps the shapes static (no host sync) by sending dropped rows, zeroed, to
the end of the last expert's block, where SwiGLU of a zero row is exactly zero.

Worked example (local, E=3), T=3, K=2, ids = [[2, 0], [0, 1], [2, 1]]:
flat ids [2, 0, 0, 1, 2, 1]; stable sort -> perm_N = [1, 2, 3, 5, 0, 4];
src_token_N = perm_N // K = [0, 1, 1, 2, 0, 2]; counts_E = [2, 2, 2];
sorted_pos_TK (inverse of perm) = [[4, 0], [1, 2], [5, 3]].

Legend: T tokens, D model dim, E (local) experts, K top-k, N = T*K sorted rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs from dispatch. EP dispatchers subclass it with their own fields."""

    weights_TK: Tensor  # [T, K] combine weights (0 for dropped pairs), differentiable
    sorted_pos_TK: Tensor  # [T, K] row of pair (t, k) in the sorted rows
    src_token_N: Tensor  # [N] token each sorted row copies


@runtime_checkable
class TokenDispatcher(Protocol):
    """Phase interface every dispatcher implements (local, all-to-all, all-gather, ...)."""

    num_local_experts: int
    local_expert_offset: int

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor
                 ) -> tuple[Tensor, Tensor, DispatchMeta]:
        """-> (rows sorted by local expert [N, D], rows per local expert [E_local] int64, meta).

        ``expert_ids_TK`` are global expert ids; -1 marks a dropped pair (weight 0).
        """
        ...

    def combine(self, y_ND: Tensor, meta: DispatchMeta) -> Tensor:
        """Expert outputs back to token order: out[t] = sum_k weights[t, k] * y[pair (t, k)], [T, D]."""
        ...


def sort_by_expert(expert_ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(perm_N, counts_E, sorted_pos_TK) for a stable sort of the pairs by expert; ids < 0 last.

    ``counts_E`` counts only ids in [0, E); no host sync (sort, scatter_add, scatter).
    """
    T, K = expert_ids_TK.shape
    flat = expert_ids_TK.reshape(-1)
    key = torch.where(flat < 0, num_experts, flat)
    _, perm = torch.sort(key, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    sorted_pos = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    return perm, counts[:num_experts], sorted_pos.view(T, K)


def weighted_unpermute(y_ND: Tensor, sorted_pos_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """out[t] = sum_k w[t, k] y[sorted_pos[t, k]], summed in at least float32, in y's dtype."""
    T, K = sorted_pos_TK.shape
    acc = torch.promote_types(y_ND.dtype, torch.float32)
    y_TKD = y_ND.index_select(0, sorted_pos_TK.reshape(-1)).view(T, K, -1)
    out = torch.einsum("tkd,tk->td", y_TKD.to(acc), weights_TK.to(acc))
    return out.to(y_ND.dtype)


class LocalDispatcher:
    """All E experts on this rank: permute by a stable sort, combine by a gather-sum."""

    def __init__(self, num_experts: int) -> None:
        self.num_local_experts = num_experts
        self.local_expert_offset = 0

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor
                 ) -> tuple[Tensor, Tensor, DispatchMeta]:
        E = self.num_local_experts
        K = expert_ids_TK.shape[1]
        perm_N, counts_E, sorted_pos_TK = sort_by_expert(expert_ids_TK, E)
        src_token_N = torch.div(perm_N, K, rounding_mode="floor")
        x_ND = x_TD.index_select(0, src_token_N)
        # Dropped rows (sorted last) ride on the last expert as zero rows: output exactly 0,
        # no gradient, and N stays T*K so nothing reads the drop count back to the host.
        kept_N = (expert_ids_TK.reshape(-1) >= 0).index_select(0, perm_N)
        x_ND = x_ND * kept_N.unsqueeze(1).to(x_ND.dtype)
        counts_E = counts_E.clone()
        counts_E[-1] += expert_ids_TK.numel() - counts_E.sum()
        return x_ND, counts_E, DispatchMeta(weights_TK, sorted_pos_TK, src_token_N)

    def combine(self, y_ND: Tensor, meta: DispatchMeta) -> Tensor:
        return weighted_unpermute(y_ND, meta.sorted_pos_TK, meta.weights_TK)


def capacity_per_expert(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """GShard/Switch expert capacity: ceil(factor * T * K / E) pairs per expert."""
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def apply_capacity(expert_ids_TK: Tensor, weights_TK: Tensor, priority_TK: Tensor, num_experts: int,
                   capacity: int, policy: Literal["probs", "position"] = "probs"
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Keep at most ``capacity`` pairs per expert -> (ids with -1 for dropped, weights with 0, dropped).

    ``probs``: an expert keeps its highest-priority pairs (priority = router score);
    ``position``: it keeps the earliest tokens (then lower slot k first). Dropped tokens keep
    the other slots' contribution and pass through the residual. No host sync (two stable
    sorts, no bincount).
    """
    T, K = expert_ids_TK.shape
    flat = expert_ids_TK.reshape(-1)
    if policy == "probs":
        # Sort by priority (descending), then stably by expert: within an expert, best first.
        order = torch.argsort(priority_TK.reshape(-1).detach(), descending=True, stable=True)
        by_expert = torch.argsort(flat.index_select(0, order), stable=True)
        perm = order.index_select(0, by_expert)
    else:
        perm = torch.argsort(flat, stable=True)  # token order within an expert
    sorted_ids = flat.index_select(0, perm)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, sorted_ids, torch.ones_like(sorted_ids))
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts.index_select(0, sorted_ids)
    rank = torch.empty_like(rank_sorted).scatter_(0, perm, rank_sorted).view(T, K)
    keep = rank < capacity
    ids = torch.where(keep, expert_ids_TK, -1)
    weights = weights_TK * keep.to(weights_TK.dtype)
    return ids, weights, (~keep).sum()
