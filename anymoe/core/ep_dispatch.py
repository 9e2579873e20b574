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
its backward (autograd) is the reverse all_to_all + gather-sum, and vice versa.

Costs, per dispatch + combine (what bench/ep_dispatch.py's breakdown measures):

- One host read per hop: a member's [rows, pairs] go to every member in the split exchange,
  so one read gives the send and receive splits *and* N, the pairs the local permute sorts
  (no ``nonzero``, no separate read of N). The send order comes from cumsums and one scatter.
- The local permute sorts int16 keys (2 radix passes instead of 8 for int64) while the rows
  are still in flight (the rows' all-to-all is started, the sort runs, then it is waited for).
- No padded copies: the sorted rows carry one trailing zero row N, counted into the last local
  expert (experts see N + 1 rows) that every pair computed elsewhere points at with weight 0,
  and a token's partial rows are summed with a 0/1-weighted gather-sum whose missing members
  point at a row the token was sent to (anymoe.core.ep_rows). Every row move is a dispatch_fast
  op (device kernels via ``dispatch_ops_for``).

- ``alltoall`` (AllToAllDispatcher): one deduplicated hop over the EP group (the fastest measured
  on 2x H200 before these changes: 2.86 ms dispatch + combine on the bench shape).
- ``alltoall_oneread`` (anymoe.core.ep_alltoall): the same hop with the receiver's sorted layout
  computed by the senders from an all-gathered per-expert count matrix (no sort on the receiver);
  more small kernels: 4.48 ms on the same bench (bench/results/gpu_h200x2/final/), not the default.
- ``hierarchical`` (HierarchicalDispatcher, Pangu Ultra's hierarchical EP communication):
  the EP group spans several nodes of ``node_size`` ranks. Hop 1 crosses nodes over
  ``ep_inter`` (peers at my position in their nodes), sending each token once per
  destination *node* — the duplicates a flat all-to-all would send over the slow link to
  several ranks of one node are removed; hop 2 fans out inside the node over ``ep_intra``
  to the ranks holding the experts. Combine runs it backwards (intra first, then inter),
  reducing inside the node before crossing nodes again. A hop over a group of one is skipped.
- ``allgather`` (AllGatherDispatcher): every EP rank gathers all tokens of its EP group
  (uneven counts allowed), computes the pairs of its own experts, and a reduce-scatter (in the
  rows' dtype) sums the partial outputs back. One small all-gather of [tokens, pairs per EP
  rank] read once, one of the ids and weights together, one of the rows (sorted meanwhile).
  No split exchange and no per-rank packing: best when a token reaches nearly every EP rank
  anyway (small EP, large K).

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
a hop, Q rows out of a hop, S rows sent, N pairs sorted by local expert, P members of a hop's group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from anymoe.core import collectives as C
from anymoe.core.collectives import Group
from anymoe.core.dispatch import LocalDispatcher, TokenDispatcher
from anymoe.core.dispatch_fast import combine as fast_combine
from anymoe.core.ep_alltoall import A2AMeta, ShardedExperts
from anymoe.core.ep_alltoall import AllToAllDispatcher as OneReadAllToAllDispatcher
from anymoe.core.ep_rows import PermuteRows, ReduceSent, SendRows, phase

SideOut = TypeVar("SideOut")

# ---------------------------------------------------------------------------------------------
# Phases shared by every dispatcher.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HopMeta:
    group: Group
    src_row_S: Tensor  # [S] int64: input row each sent row copies (sorted by destination, then row)
    pos_RP: Tensor  # [R, P] int64: sent row of (row, member); a row sent elsewhere (mask 0) if not sent there
    mask_RP: Tensor  # [R, P] float32: 1 where the row was sent to the member
    send_splits: list[int]  # rows sent to each member
    recv_splits: list[int]  # rows received from each member
    pairs_in: int  # pairs received (ids not -1): after the last hop, the N of the local permute


def hop(x_RD: Tensor, ids_RK: Tensor, w_RK: Tensor, dest_RK: Tensor, group: Group
        ) -> tuple[C.PendingAllToAll, Tensor, Tensor, HopMeta]:
    """Send each row once to every member ``dest_RK`` names (-1: nowhere).

    Returns the received rows *in flight* (``.wait()`` for them: index work that needs only the
    ids can run first), their ids and weights (masked to the receiver: -1 / 0 where the expert
    lives elsewhere) and the record ``hop_back`` needs. One host read.

    Worked example, P = 2, rows r0 dest [0, 1], r1 [1, -1], r2 [0, 0]: to (member, row) =
    [[1, 0, 1], [1, 1, 0]]; send order = member, then row = a running count over ``to``:
    (0, r0) -> 0, (0, r2) -> 1, (1, r0) -> 2, (1, r1) -> 3, so src_row = [0, 2, 0, 1] and
    pos (row, member) = [[0, 2], [3*, 3], [1, 1*]] (* mask 0: a row the token was sent to, so
    its 0/1-weighted sum reads nothing else).
    """
    R, K = ids_RK.shape
    P = group.size
    dev = ids_RK.device
    with phase("hop_index"):
        here_PRK = dest_RK.unsqueeze(0) == torch.arange(P, device=dev).view(P, 1, 1)
        to_PR = here_PRK.any(2)
        # Each member learns the rows *and* the pairs it receives from one exchange.
        sent_P2 = torch.stack([to_PR.sum(1), here_PRK.sum((1, 2))], dim=1)
        recv_P2 = C.exchange_splits(sent_P2, group)
        # Send order: member, then row; the running count of sent (member, row) gives each its slot
        # (meaningful where sent: the other entries are replaced below).
        pos_PR = to_PR.view(-1).cumsum(0).view(P, R) - 1
        flat = torch.arange(P * R, device=dev)
        # order[pos[p, r]] = p * R + r; pairs not sent land in distinct slots past P * R (no
        # colliding writes), and only order[:S] is read.
        order = torch.empty(2 * P * R, dtype=torch.int64, device=dev)
        order.scatter_(0, torch.where(to_PR.view(-1), pos_PR.view(-1), flat + P * R), flat)
        # [row, member] for the 0/1-weighted sums; a member not sent to points at a sent slot.
        any_1R = torch.where(to_PR, pos_PR, -1).amax(0, keepdim=True).clamp_min(0)
        pos_RP = torch.where(to_PR, pos_PR, any_1R).t().contiguous()
        mask_RP = to_PR.t().to(torch.float32, memory_format=torch.contiguous_format)
        # Weights (0 elsewhere) and ids (-1 elsewhere) travel in one small message; ids are exact
        # in the float below 2^24.
        acc = torch.promote_types(w_RK.dtype, torch.float32)
        meta_PRK2 = torch.cat([torch.where(here_PRK, w_RK.to(acc), 0.0),
                               torch.where(here_PRK, ids_RK.to(acc), -1.0)], dim=2)
        counts = torch.cat([sent_P2, recv_P2]).tolist()  # the only host read
    send_splits = [c[0] for c in counts[:P]]
    recv_splits = [c[0] for c in counts[P:]]
    with phase("hop_send"):
        sent_S = order[:sum(send_splits)]
        meta_Q2K = C.all_to_all(meta_PRK2.view(P * R, 2 * K).index_select(0, sent_S), group,
                                recv_splits, send_splits)
        src_row_S = sent_S % R if R else sent_S
        x_SD = SendRows.apply(x_RD, src_row_S, pos_RP, mask_RP)
        rows = C.all_to_all_start(x_SD, group, recv_splits, send_splits)
        w_QK = meta_Q2K[:, :K].to(w_RK.dtype)
        ids_QK = meta_Q2K[:, K:].detach().to(ids_RK.dtype)
    meta = HopMeta(group, src_row_S, pos_RP, mask_RP, send_splits, recv_splits, sum(c[1] for c in counts[P:]))
    return rows, ids_QK, w_QK, meta


def hop_back(y_QD: Tensor, meta: HopMeta) -> Tensor:
    """Partial outputs back to the rows they came from, summed per row (fp32 accumulation)."""
    with phase("return"):
        y_SD = C.all_to_all(y_QD, meta.group, meta.send_splits, meta.recv_splits)
    with phase("reduce"):
        return ReduceSent.apply(y_SD, meta.src_row_S, meta.pos_RP, meta.mask_RP)


@dataclass(frozen=True)
class LocalMeta:
    pos_RK: Tensor  # [R, K] sorted row of pair (r, k); N (the zero pad row) for pairs not computed here
    w_RK: Tensor  # [R, K] combine weights, 0 for pairs not computed here


@dataclass(frozen=True)
class LocalIndex:
    """The local permute's index, built from the ids alone (before the rows arrive)."""

    src_N: Tensor  # [N (+1)] row each sorted row copies (the pad row's entry is any row: zeroed)
    pad: bool  # whether the sorted rows end with the zero pad row (some pair is computed elsewhere)
    counts_E: Tensor  # [E_l] rows per local expert, the pad row counted into the last
    meta: LocalMeta


def local_index(ids_RK: Tensor, w_RK: Tensor, offset: int, num_local: int, pairs: int | None = None,
                masked: bool = False) -> LocalIndex:
    """Sort the pairs whose expert is in [offset, offset + num_local) by local expert.

    ``pairs``: how many there are (N), when the caller learned it with its split exchange;
    otherwise one host read. ``masked``: the ids are already -1 and the weights 0 wherever the
    expert is not here (a hop's output), so neither is masked again. Worked example in
    tests/core/test_ep_dispatch.py.
    """
    R, K = ids_RK.shape
    dev = ids_RK.device
    with phase("local_index"):
        mine_RK = ids_RK >= 0 if masked else (ids_RK >= offset) & (ids_RK < offset + num_local)
        key_M = torch.where(mine_RK, ids_RK - offset, num_local).reshape(-1)  # elsewhere sorts last
        if num_local < 2**15 - 1:  # a radix sort makes one pass per key byte: 2 for int16, 8 for int64
            key_M = key_M.to(torch.int16)
        sorted_M, perm_M = torch.sort(key_M, stable=True)
        starts_E1 = torch.searchsorted(sorted_M, torch.arange(num_local + 1, device=dev, dtype=key_M.dtype))
        N = int(starts_E1[-1]) if pairs is None else pairs
        pad = N < R * K
        counts_E = starts_E1.diff()
        if pad:
            counts_E[-1:].add_(1)
        sorted_pos_M = torch.empty_like(perm_M).scatter_(0, perm_M, torch.arange(R * K, device=dev))
        pos_RK = torch.where(mine_RK, sorted_pos_M.view(R, K), N)
        src_N = torch.div(perm_M[:N + 1] if pad else perm_M, K, rounding_mode="floor")
        # A weight the hop zeroed gets a gradient here (pad row output), zeroed again by the hop's mask.
        w_RK = w_RK if masked else w_RK * mine_RK.to(w_RK.dtype)
        return LocalIndex(src_N, pad, counts_E, LocalMeta(pos_RK, w_RK))


def local_gather(x_RD: Tensor, index: LocalIndex) -> Tensor:
    """The sorted rows [N (+1 zero pad row), D]."""
    with phase("local_gather"):
        return PermuteRows.apply(x_RD, index.src_N, index.meta.pos_RK, index.pad)


def local_permute(x_RD: Tensor, ids_RK: Tensor, w_RK: Tensor, offset: int, num_local: int,
                  pairs: int | None = None) -> tuple[Tensor, Tensor, LocalMeta]:
    """-> (rows sorted by local expert [N (+1), D], rows per local expert [E_l], record)."""
    index = local_index(ids_RK, w_RK, offset, num_local, pairs)
    return local_gather(x_RD, index), index.counts_E, index.meta


def local_combine(y_ND: Tensor, meta: LocalMeta) -> Tensor:
    """One row per input row: sum_k w[r, k] y[pair (r, k)]; pairs computed elsewhere add 0.

    The fast-op weighted gather-sum (fp32 accumulation); pairs not here read the zero pad
    row with weight 0, so they add nothing and get no gradient.
    """
    with phase("local_combine"):
        if meta.pos_RK.shape[0] == 0:
            return y_ND[:0]
        return fast_combine(y_ND, meta.pos_RK, meta.w_RK)


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
        """EP rank holding each pair's expert; -1 for dropped pairs (-1 // E_l = -1)."""
        return torch.div(ids_TK, self.num_local_experts, rounding_mode="floor")


class _HopDispatcher(_ShardedExperts):
    """Combine for dispatchers built from hops (alltoall, hierarchical): the hops in reverse."""

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
        if not meta.hops:
            return y, side()
        first, *rest = reversed(meta.hops)
        with phase("return"):
            pending = C.all_to_all_start(y, first.group, first.send_splits, first.recv_splits)
        side_out = side()
        with phase("reduce"):
            y = ReduceSent.apply(pending.wait(), first.src_row_S, first.pos_RP, first.mask_RP)
        for h in rest:
            y = hop_back(y, h)
        return y, side_out


class AllToAllDispatcher(_HopDispatcher):
    """One deduplicated hop over the EP group; see the module docstring."""

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor
                 ) -> tuple[Tensor, Tensor, EPMeta]:
        rows, ids_QK, w_QK, h = hop(x_TD, expert_ids_TK, weights_TK, self._rank_of(expert_ids_TK), self.ep)
        # The sort needs only the ids: it runs while the rows are in flight.
        index = local_index(ids_QK, w_QK, self.local_expert_offset, self.num_local_experts, h.pairs_in,
                            masked=True)
        return local_gather(rows.wait(), index), index.counts_E, EPMeta((h,), index.meta)


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
        hops: list[HopMeta] = []
        x, ids, w = x_TD, expert_ids_TK, weights_TK
        rows = None
        if self.inter.size > 1:  # EP rank g sits on node g // node_size at position g % node_size
            node_TK = torch.where(rank_TK >= 0, torch.div(rank_TK, node_size, rounding_mode="floor"), -1)
            rows, ids, w, h1 = hop(x, ids, w, node_TK, self.inter)
            hops.append(h1)
            rank_TK = self._rank_of(ids)
        if self.intra.size > 1:  # a hop over a group of one would only copy the rows
            if rows is not None:  # no second collective while the first is in flight
                x = rows.wait()
            pos_TK = torch.where(rank_TK >= 0, rank_TK % node_size, -1)
            rows, ids, w, h2 = hop(x, ids, w, pos_TK, self.intra)
            hops.append(h2)
        index = local_index(ids, w, self.local_expert_offset, self.num_local_experts,
                            hops[-1].pairs_in if hops else None, masked=bool(hops))
        x_ND = local_gather(rows.wait() if rows is not None else x, index)
        return x_ND, index.counts_E, EPMeta(tuple(hops), index.meta)


@dataclass(frozen=True)
class GatherMeta:
    sizes: list[int]  # tokens of each EP rank
    local: LocalMeta


class AllGatherDispatcher(_ShardedExperts):
    """Gather every EP rank's tokens, compute own experts' pairs, reduce-scatter the partial sums."""

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor
                 ) -> tuple[Tensor, Tensor, GatherMeta]:
        K = expert_ids_TK.shape[1]
        P, me = self.ep_size, self.ep.index
        with phase("gather_index"):
            # [dropped pairs | pairs to each EP rank] from every rank: its tokens are the row's sum / K.
            to_TKX = self._rank_of(expert_ids_TK).unsqueeze(2) == torch.arange(-1, P, device=x_TD.device)
            M = C.all_gather(to_TKX.sum((0, 1)).unsqueeze(0), self.ep).tolist()  # the only host read
        sizes = [sum(m) // K for m in M]
        with phase("gather"):
            # Ids and weights in one message (ids exact in the float below 2^24); the rows are
            # gathered while this rank sorts its pairs.
            acc = torch.promote_types(weights_TK.dtype, torch.float32)
            meta_AK2 = C.all_gather(torch.cat([weights_TK.to(acc), expert_ids_TK.to(acc)], dim=1), self.ep,
                                    sizes=sizes)
            rows = C.all_gather_start(x_TD, self.ep, sizes=sizes)
            w_AK = meta_AK2[:, :K].to(weights_TK.dtype)
            ids_AK = meta_AK2[:, K:].detach().to(expert_ids_TK.dtype)
        index = local_index(ids_AK, w_AK, self.local_expert_offset, self.num_local_experts,
                            sum(m[1 + me] for m in M))
        return local_gather(rows.wait(), index), index.counts_E, GatherMeta(sizes, index.meta)

    def combine(self, y_ND: Tensor, meta: GatherMeta) -> Tensor:
        y_AD = local_combine(y_ND, meta.local)
        with phase("reduce_scatter"):  # in the rows' dtype: each token's partials are already weighted sums
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
    "EPMeta", "GatherMeta", "HierarchicalDispatcher", "HopMeta", "LocalIndex", "LocalMeta",
    "build_dispatcher", "combine_with", "hop", "hop_back", "local_combine", "local_gather", "local_index",
    "local_permute", "register_dispatcher", "resolve_dispatcher",
]
