"""Expert-parallel token dispatchers: all-to-all, all-gather and hierarchical all-to-all.

Experts are sharded over the EP group: EP rank r holds global experts [r E_l, (r+1) E_l),
E_l = E / ep. Every dispatcher implements ``TokenDispatcher`` (anymoe.core.dispatch) in
phases with a frozen record between dispatch and combine (no state on ``self``):

    dispatch:  hop(s) that move token rows to the ranks holding their experts
               -> local permute: pairs sorted by local expert          (rows for grouped mm)
    combine:   local weighted sum of a row's pairs on the expert rank
               -> the hop(s) in reverse, summing the partial outputs of each token

A *hop* over a group sends every row once to each member that holds at least one of its
experts, with the row's K expert ids (-1 where the expert is elsewhere) and combine weights
(0 there). Rows are deduplicated per destination: a token with 3 experts on one rank
crosses the wire once, not 3 times (a per-pair all-to-all would send it 3 times). The
combine weights travel with the rows, so each expert rank returns one already-weighted row
per token, and the reverse hop sums partial rows. Forward of a hop is gather + all_to_all;
its backward (autograd) is the reverse all_to_all + scatter-add, and vice versa.

- ``alltoall`` (AllToAllDispatcher): one deduplicated hop over the EP group (the fastest measured
  on 2x H200: 2.86 ms dispatch + combine on the bench shape).
- ``alltoall_oneread`` (anymoe.core.ep_alltoall): the same hop with every index built on the
  device and one host read of the split matrix per dispatch; fewer syncs, but more small kernels:
  4.48 ms on the same bench (bench/results/gpu_h200x2/final/), so not the default.
- ``hierarchical`` (HierarchicalDispatcher, Pangu Ultra's hierarchical EP communication):
  the EP group spans several nodes of ``node_size`` ranks. Hop 1 crosses nodes over
  ``ep_inter`` (peers at my position in their nodes), sending each token once per
  destination *node* — the duplicates a flat all-to-all would send over the slow link to
  several ranks of one node are removed; hop 2 fans out inside the node over ``ep_intra``
  to the ranks holding the experts. Combine runs it backwards (intra first, then inter),
  reducing inside the node before crossing nodes again.
- ``allgather`` (AllGatherDispatcher): every EP rank gathers all tokens of its EP group
  (uneven counts allowed), computes the pairs of its own experts, and a reduce-scatter
  sums the partial outputs back. No split exchange and no per-rank packing: best when a
  token reaches nearly every EP rank anyway (small EP, large K).

``auto`` (``resolve_dispatcher``): ep 1 -> local; an EP group spanning more than one node
-> hierarchical; otherwise allgather when an all-to-all would save less than 10% of the
bytes, i.e. when a token's expected share of the other EP ranks it must reach,
1 - (1 - 1/ep)^K (K experts drawn uniformly), is >= 0.9 (ep 2 with K >= 4; ep 4 with
K >= 9), else alltoall.

All three give the outputs and gradients of a single process holding all experts on the
concatenated batch (tests/core/test_ep_parity.py). Capacity (drops) is applied per rank
before dispatch, so with a capacity factor the drops follow each rank's batch; parity with
one process holds for dropless routing.

Legend: T tokens, D model dim, K top-k, E experts (global), E_l local experts, R rows into
a hop, Q rows out of a hop, N pairs sorted by local expert, P members of a hop's group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from anymoe.core import collectives as C
from anymoe.core.collectives import Group
from anymoe.core.dispatch import LocalDispatcher, TokenDispatcher, sort_by_expert
from anymoe.core.dispatch_fast import combine as fast_combine
from anymoe.core.dispatch_fast import dispatch_ops_for
from anymoe.core.ep_alltoall import A2AMeta, ShardedExperts
from anymoe.core.ep_alltoall import AllToAllDispatcher as OneReadAllToAllDispatcher

SideOut = TypeVar("SideOut")

# ---------------------------------------------------------------------------------------------
# Row movement without atomics: a gather and its adjoint, a gather-sum over a padded index.
# ---------------------------------------------------------------------------------------------


def _pad_row(t: Tensor) -> Tensor:
    """``t`` with one zero row appended: the target of index entries that mean "nothing"."""
    return torch.cat([t, t.new_zeros(1, t.shape[1])], dim=0)


class _ExpandRows(torch.autograd.Function):
    """out[s] = x[src[s]]; backward: dx[r] = sum_j g[pos[r, j]] (pos = len(src): nothing)."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, src_S: Tensor, pos_RJ: Tensor) -> Tensor:
        ctx.save_for_backward(src_S, pos_RJ)
        return dispatch_ops_for(x_RD).gather_rows(x_RD, src_S)

    @staticmethod
    def backward(ctx, g_SD: Tensor):
        src_S, pos_RJ = ctx.saved_tensors
        g = _pad_row(g_SD.contiguous())
        return dispatch_ops_for(g).gather_sum(g, pos_RJ), None, None


class _ReduceRows(torch.autograd.Function):
    """out[r] = sum_j y[pos[r, j]] (fp32 accumulation); backward: dy[s] = g[src[s]]."""

    @staticmethod
    def forward(ctx, y_SD: Tensor, src_S: Tensor, pos_RJ: Tensor) -> Tensor:
        ctx.save_for_backward(src_S, pos_RJ)
        y = _pad_row(y_SD.contiguous())
        return dispatch_ops_for(y).gather_sum(y, pos_RJ)

    @staticmethod
    def backward(ctx, g_RD: Tensor):
        src_S, pos_RJ = ctx.saved_tensors
        return dispatch_ops_for(g_RD).gather_rows(g_RD.contiguous(), src_S), None, None


def _inverse_index(src_S: Tensor, slot_S: Tensor, rows: int, slots: int) -> Tensor:
    """pos[r, j] = s where (src[s], slot[s]) = (r, j), else len(src) (the pad row)."""
    S = src_S.numel()
    pos = torch.full((rows * slots,), S, dtype=torch.int64, device=src_S.device)
    pos.scatter_(0, src_S * slots + slot_S, torch.arange(S, device=src_S.device))  # unique targets
    return pos.view(rows, slots)


# ---------------------------------------------------------------------------------------------
# Phases shared by every dispatcher.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HopMeta:
    group: Group
    src_row_S: Tensor  # [S] int64: input row each sent row copies (sorted by destination)
    pos_RP: Tensor  # [R, P] int64: sent row of (row, member), S where the row is not sent there
    send_splits: list[int]  # rows sent to each member
    recv_splits: list[int]  # rows received from each member


def hop(x_RD: Tensor, ids_RK: Tensor, w_RK: Tensor, dest_RK: Tensor, group: Group
        ) -> tuple[Tensor, Tensor, Tensor, HopMeta]:
    """Send each row once to every member ``dest_RK`` names (-1: nowhere).

    Returns the received rows, their ids and weights (masked to the receiver: -1 / 0 where
    the expert lives elsewhere) and the record ``hop_back`` needs.
    """
    R, K = ids_RK.shape
    P = group.size
    to_RP = (dest_RK.unsqueeze(-1) == torch.arange(P, device=dest_RK.device)).any(1)
    dest_S, src_row_S = to_RP.t().nonzero(as_tuple=True)  # sorted by destination, then row
    pos_RP = _inverse_index(src_row_S, dest_S, R, P)
    send_splits_P = to_RP.sum(0)
    here_SK = dest_RK.index_select(0, src_row_S) == dest_S.unsqueeze(1)
    send_ids_SK = torch.where(here_SK, ids_RK.index_select(0, src_row_S), -1)
    send_w_SK = w_RK.index_select(0, src_row_S) * here_SK.to(w_RK.dtype)
    recv_splits_P = C.exchange_splits(send_splits_P, group)
    send_splits, recv_splits = send_splits_P.tolist(), recv_splits_P.tolist()
    # Weights and ids travel in one small message (ids are exact in float32 below 2^24).
    acc = torch.promote_types(w_RK.dtype, torch.float32)
    meta_SK2 = torch.cat([send_w_SK.to(acc), send_ids_SK.to(acc)], dim=1)
    recv_meta = C.all_to_all(meta_SK2, group, recv_splits, send_splits)
    x_SD = _ExpandRows.apply(x_RD, src_row_S, pos_RP)
    x_QD = C.all_to_all(x_SD, group, recv_splits, send_splits)
    w_QK = recv_meta[:, :K].to(w_RK.dtype)
    ids_QK = recv_meta[:, K:].detach().round().to(ids_RK.dtype)
    return x_QD, ids_QK, w_QK, HopMeta(group, src_row_S, pos_RP, send_splits, recv_splits)


def hop_back(y_QD: Tensor, meta: HopMeta) -> Tensor:
    """Partial outputs back to the rows they came from, summed per row (fp32 accumulation)."""
    y_SD = C.all_to_all(y_QD, meta.group, meta.send_splits, meta.recv_splits)
    return _ReduceRows.apply(y_SD, meta.src_row_S, meta.pos_RP)


@dataclass(frozen=True)
class LocalMeta:
    pos_RK: Tensor  # [R, K] sorted row of pair (r, k); N (the pad row) for pairs not computed here
    w_RK: Tensor  # [R, K] combine weights, 0 for pairs not computed here


def local_permute(x_RD: Tensor, ids_RK: Tensor, w_RK: Tensor, offset: int, num_local: int
                  ) -> tuple[Tensor, Tensor, LocalMeta]:
    """Pairs whose expert is in [offset, offset + num_local), sorted by local expert.

    -> (rows [N, D], rows per local expert [E_l], record). One host read (N) sizes the rows.
    """
    R, K = ids_RK.shape
    mine_RK = (ids_RK >= offset) & (ids_RK < offset + num_local)
    local_RK = torch.where(mine_RK, ids_RK - offset, -1)
    perm, counts_E, sorted_pos_RK = sort_by_expert(local_RK, num_local)
    N = int(counts_E.sum())
    pos_RK = torch.where(mine_RK, sorted_pos_RK, N)
    x_ND = _ExpandRows.apply(x_RD, torch.div(perm[:N], K, rounding_mode="floor"), pos_RK)
    return x_ND, counts_E, LocalMeta(pos_RK, w_RK * mine_RK.to(w_RK.dtype))


def local_combine(y_ND: Tensor, meta: LocalMeta) -> Tensor:
    """One row per input row: sum_k w[r, k] y[pair (r, k)]; pairs computed elsewhere add 0.

    The fast-op weighted gather-sum (fp32 accumulation); pairs not here read the zero pad
    row with weight 0, so they add nothing and get no gradient.
    """
    return fast_combine(_pad_row(y_ND), meta.pos_RK, meta.w_RK)


# ---------------------------------------------------------------------------------------------
# Dispatchers.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EPMeta:
    """What combine needs: the hops taken (in order) and the local sort."""

    hops: tuple[HopMeta, ...]
    local: LocalMeta


class _ShardedExperts(ShardedExperts):
    """Experts sharded over ``ep`` plus the rank lookup the hop dispatchers need."""

    def _rank_of(self, ids_TK: Tensor) -> Tensor:
        """EP rank holding each pair's expert; -1 for dropped pairs."""
        return torch.where(ids_TK >= 0, torch.div(ids_TK, self.num_local_experts, rounding_mode="floor"), -1)


class _HopDispatcher(_ShardedExperts):
    """Combine for dispatchers built from generic hops (hierarchical): the hops in reverse."""

    def combine(self, y_ND: Tensor, meta: EPMeta) -> Tensor:
        y = local_combine(y_ND, meta.local)
        for h in reversed(meta.hops):
            y = hop_back(y, h)
        return y

    def combine_overlapped(self, y_ND: Tensor, meta: EPMeta, side: Callable[[], SideOut]
                           ) -> tuple[Tensor, SideOut]:
        """``combine``, with ``side()`` (e.g. the shared experts) computed while the first
        return all-to-all is in flight. Same results and gradients as combine, then side."""
        y = local_combine(y_ND, meta.local)
        first, *rest = reversed(meta.hops)
        pending = C.all_to_all_start(y, first.group, first.send_splits, first.recv_splits)
        side_out = side()
        y = _ReduceRows.apply(pending.wait(), first.src_row_S, first.pos_RP)
        for h in rest:
            y = hop_back(y, h)
        return y, side_out


class AllToAllDispatcher(_HopDispatcher):
    """One deduplicated hop over the EP group; see the module docstring."""

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor
                 ) -> tuple[Tensor, Tensor, EPMeta]:
        x_QD, ids_QK, w_QK, h = hop(x_TD, expert_ids_TK, weights_TK, self._rank_of(expert_ids_TK), self.ep)
        x_ND, counts_E, local = local_permute(x_QD, ids_QK, w_QK, self.local_expert_offset,
                                              self.num_local_experts)
        return x_ND, counts_E, EPMeta((h,), local)


class HierarchicalDispatcher(_HopDispatcher):
    """Across nodes once per destination node (``inter``), then inside the node (``intra``)."""

    def __init__(self, num_experts: int, ep: Group, intra: Group, inter: Group) -> None:
        super().__init__(num_experts, ep)
        assert intra.size * inter.size == ep.size, (intra.size, inter.size, ep.size)
        self.intra, self.inter = intra, inter

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor
                 ) -> tuple[Tensor, Tensor, EPMeta]:
        rank_TK = self._rank_of(expert_ids_TK)
        node_size = self.intra.size
        hops = []
        x, ids, w = x_TD, expert_ids_TK, weights_TK
        if self.inter.size > 1:  # EP rank g sits on node g // node_size at position g % node_size
            node_TK = torch.where(rank_TK >= 0, torch.div(rank_TK, node_size, rounding_mode="floor"), -1)
            x, ids, w, h1 = hop(x, ids, w, node_TK, self.inter)
            hops.append(h1)
            rank_TK = self._rank_of(ids)
        pos_TK = torch.where(rank_TK >= 0, rank_TK % node_size, -1)
        x, ids, w, h2 = hop(x, ids, w, pos_TK, self.intra)
        hops.append(h2)
        x_ND, counts_E, local = local_permute(x, ids, w, self.local_expert_offset, self.num_local_experts)
        return x_ND, counts_E, EPMeta(tuple(hops), local)


@dataclass(frozen=True)
class GatherMeta:
    sizes: list[int]  # tokens of each EP rank
    local: LocalMeta


class AllGatherDispatcher(_ShardedExperts):
    """Gather every EP rank's tokens, compute own experts' pairs, reduce-scatter the partial sums."""

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor
                 ) -> tuple[Tensor, Tensor, GatherMeta]:
        sizes = C.gather_sizes(x_TD.shape[0], self.ep, x_TD.device)
        x_AD = C.all_gather(x_TD, self.ep, sizes=sizes)
        ids_AK = C.all_gather(expert_ids_TK, self.ep, sizes=sizes)
        w_AK = C.all_gather(weights_TK, self.ep, sizes=sizes)
        x_ND, counts_E, local = local_permute(x_AD, ids_AK, w_AK, self.local_expert_offset,
                                              self.num_local_experts)
        return x_ND, counts_E, GatherMeta(sizes, local)

    def combine(self, y_ND: Tensor, meta: GatherMeta) -> Tensor:
        y_AD = local_combine(y_ND, meta.local)
        return C.reduce_scatter(y_AD, self.ep, sizes=meta.sizes)


def combine_with(dispatcher: TokenDispatcher, y_ND: Tensor, meta: Any, side: Callable[[], SideOut]
                 ) -> tuple[Tensor, SideOut]:
    """Combine and run ``side()``, overlapping the two where the dispatcher can (all-to-all
    kinds: side runs while the return all-to-all is in flight); otherwise one after the other."""
    overlapped = getattr(dispatcher, "combine_overlapped", None)
    if overlapped is not None:
        return overlapped(y_ND, meta, side)
    return dispatcher.combine(y_ND, meta), side()


# ---------------------------------------------------------------------------------------------
# Choice and construction.
# ---------------------------------------------------------------------------------------------


def resolve_dispatcher(name: str, ep: int, top_k: int, spans_nodes: bool) -> str:
    """The dispatcher ``auto`` stands for (module docstring); other names pass through."""
    if name != "auto":
        return name
    if ep == 1:
        return "local"
    if spans_nodes:
        return "hierarchical"
    reach = 1.0 - (1.0 - 1.0 / ep) ** top_k  # expected share of the other EP ranks a token reaches
    return "allgather" if reach >= 0.9 - 1e-12 else "alltoall"


DispatcherFactory = Callable[[int, Any], TokenDispatcher]
DISPATCHERS: dict[str, DispatcherFactory] = {}


def register_dispatcher(name: str) -> Callable[[DispatcherFactory], DispatcherFactory]:
    def add(factory: DispatcherFactory) -> DispatcherFactory:
        if name in DISPATCHERS:
            raise ValueError(f"dispatcher {name!r} is registered twice")
        DISPATCHERS[name] = factory
        return factory

    return add


register_dispatcher("local")(lambda num_experts, groups: LocalDispatcher(num_experts))
register_dispatcher("alltoall")(lambda num_experts, groups: AllToAllDispatcher(num_experts, groups.ep))
register_dispatcher("alltoall_oneread")(
    lambda num_experts, groups: OneReadAllToAllDispatcher(num_experts, groups.ep))
register_dispatcher("allgather")(lambda num_experts, groups: AllGatherDispatcher(num_experts, groups.ep))
register_dispatcher("hierarchical")(lambda num_experts, groups: HierarchicalDispatcher(
    num_experts, groups.ep, groups.ep_intra, groups.ep_inter))


def build_dispatcher(moe_cfg: Any, groups: Any, name: str | None = None) -> TokenDispatcher:
    """The dispatcher for an MoE config (``num_experts``, ``top_k``) on ``groups`` (ParallelGroups).

    ``name`` overrides ``groups.config.dispatcher``. One dispatcher serves every layer (it
    holds no state between calls).
    """
    choice = name or groups.config.dispatcher
    resolved = resolve_dispatcher(choice, groups.ep.size, moe_cfg.top_k, groups.ep_inter.size > 1)
    if resolved == "local" and groups.ep.size > 1:
        raise ValueError(f"the local dispatcher cannot serve ep={groups.ep.size}")
    if resolved not in DISPATCHERS:
        names = ", ".join(sorted(DISPATCHERS))
        raise ValueError(f"unknown dispatcher {resolved!r}; choose one of auto, {names}")
    return DISPATCHERS[resolved](moe_cfg.num_experts, groups)


__all__ = [
    "DISPATCHERS", "A2AMeta", "AllGatherDispatcher", "AllToAllDispatcher", "OneReadAllToAllDispatcher",
    "EPMeta", "HierarchicalDispatcher",
    "HopMeta",
    "build_dispatcher", "combine_with", "hop", "hop_back", "local_combine", "local_permute",
    "register_dispatcher", "resolve_dispatcher",
]
