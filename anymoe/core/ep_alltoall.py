"""The all-to-all expert-parallel dispatcher, built for one host sync per dispatch.

Same semantics as the generic hop in anymoe.core.ep_dispatch (deduplicated: a token crosses to
an EP rank once however many of its K experts live there, carrying its combine weights; the
expert rank returns one weighted partial row per token, the sender sums them), but every
index is computed on the device and the host reads one small matrix once:

1. sender, no sync: ``build_route_index`` (one int16 radix sort, searchsorted counts) gives
   the pairs per global expert and each pair's rank inside its expert block; ``to_TP``
   marks the EP ranks each token must reach.
2. one all_gather of ``[pairs per global expert (E) | rows to each rank (P)]`` from every
   rank -> the matrix ``M [P, E + P]``, read to the host once (the only sync). It gives the
   all-to-all splits *and* every receiver's sorted layout (local expert, then source rank,
   then the source's pair order), so the sender computes the final sorted slot of each of
   its pairs on the receiver: ``slot = sorted_pos + base[e] - start[e]``. The receiver
   never sorts; it scatters row numbers into its slots.
3. one all-to-all of the rows (gathered once, in destination order) and one of a small
   ``[S, 2K]`` float message (the masked weights and slots, -1 where the expert is elsewhere).
4. receiver: rows to slots with one gather; the sorted rows get one trailing zero row
   (counted into the last local expert, so experts see ``N + 1`` rows): every pair computed
   elsewhere points at it with weight 0, so combine is the fused weighted gather-sum
   (dispatch_fast ``combine``) with no copy of the expert output.
5. combine: weighted gather-sum, the return all-to-all, then a 0/1-weighted sum of each
   token's returned rows (a forward-only gather-sum; missing ranks point at a valid row of
   the same token with weight 0, so no padded copy of the returned rows either).

Every row move is an anymoe.core.ep_rows op (dispatch_fast kernels, device kernels via
``dispatch_ops_for``), each the adjoint of the other in backward, so backward adds no sync
either (splits come from the meta).

Legend: T tokens, D model dim, K top-k, E experts (global), E_l local experts, P EP ranks,
S rows sent, Q rows received, N pairs computed here (+1 pad row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from anymoe.core import collectives as C
from anymoe.core.collectives import Group
from anymoe.core.dispatch_fast import build_route_index
from anymoe.core.dispatch_fast import combine as fast_combine
from anymoe.core.ep_rows import PermuteRows, ReduceSent, SendRows, phase

SideOut = TypeVar("SideOut")


@dataclass(frozen=True)
class A2AMeta:
    """What combine (and backward) needs; the splits were read once, in dispatch."""

    group: Group
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    src_row_S: Tensor  # [S] token each sent row copies (destination order, then token order)
    pos_TP: Tensor  # [T, P] sent row of (token, rank); a valid row of the same token where not sent
    mask_TP: Tensor  # [T, P] 1 where the token was sent to the rank, else 0 (float32)
    pos_Q1K: Tensor  # [Q+1, K] sorted row of each received pair; N (the zero pad row) where elsewhere
    w_Q1K: Tensor  # [Q+1, K] received combine weights, 0 where the expert is elsewhere (last row: all 0)


class ShardedExperts:
    """E experts sharded over ``ep`` (a Group): this rank holds a contiguous slice.

    The base of every expert-parallel dispatcher (here and in anymoe.core.ep_dispatch).
    """

    def __init__(self, num_experts: int, ep: Group) -> None:
        if num_experts % ep.size:
            raise ValueError(f"{num_experts} experts cannot be split over {ep.size} EP ranks")
        self.num_experts = num_experts
        self.ep = ep
        self.ep_size = ep.size
        self.num_local_experts = num_experts // ep.size
        self.local_expert_offset = ep.index * self.num_local_experts


class AllToAllDispatcher(ShardedExperts):
    """One deduplicated all-to-all over the EP group, one host sync; see the module docstring."""

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor
                 ) -> tuple[Tensor, Tensor, A2AMeta]:
        E, El, P, me = self.num_experts, self.num_local_experts, self.ep_size, self.ep.index
        T, K = expert_ids_TK.shape
        dev = expert_ids_TK.device
        with phase("oneread_index"):
            # Everything up to the host read is queued on the device without waiting; after it only
            # the row moves and the receiver's scatter remain (few launches once the queue is drained).
            rank_TK = torch.div(expert_ids_TK, El, rounding_mode="floor")  # dropped (-1) -> -1: no rank
            here_TPK = rank_TK.unsqueeze(1) == torch.arange(P, device=dev).view(1, P, 1)
            to_TP = here_TPK.any(2)
            # Sort by global expert = by (destination rank, local expert), ties in token order. E + 1
            # "experts" so the dropped pairs (-1) fill the extra block and counts[:E] are exact.
            index = build_route_index(expert_ids_TK, E + 1)
            counts_E = index.counts_E[:E]
            to_i = to_TP.to(torch.int64)
            rows_P = to_i.sum(0)
            M_PX = C.all_gather(torch.cat([counts_E, rows_P]).unsqueeze(0), self.ep)  # [P, E + P]

            # Slot of each of my pairs in its receiver's sorted rows (local expert, source, pair order);
            # a pair whose expert is on another rank gets that rank's pad row N_p.
            pairs_PE = M_PX[:, :E]
            tot_PEl = pairs_PE.sum(0).view(P, El)
            expert_base_E = (tot_PEl.cumsum(1) - tot_PEl).reshape(E)
            shift_E = expert_base_E + pairs_PE[:me].sum(0) - (counts_E.cumsum(0) - counts_E)
            shift_TK = shift_E.index_select(0, expert_ids_TK.clamp_min(0).reshape(-1)).view(T, K)
            slot_TK = index.sorted_pos_TK + shift_TK
            pad_P1 = tot_PEl.sum(1).view(1, P, 1)
            # Send order: destination, then token. pos_TP = offset of rank p + tokens before t sent to p.
            pos_TP = (rows_P.cumsum(0) - rows_P) + to_i.cumsum(0) - to_i
            order = torch.zeros(T * P + 1, dtype=torch.int64, device=dev)  # unsent -> the dump slot T*P
            order.scatter_(0, torch.where(to_TP, pos_TP, T * P).reshape(-1), torch.arange(T * P, device=dev))
            src_row = torch.div(order, P, rounding_mode="floor")
            # Where a token is not sent to p, point at a row it was sent to (weight 0: adds nothing).
            any_pos_T = torch.where(to_TP, pos_TP, -1).amax(1, keepdim=True).clamp_min(0)
            pos_TP = torch.where(to_TP, pos_TP, any_pos_T)
            mask_TP = to_TP.to(torch.float32)
            # The small message: weights (masked to the destination) and slots, one float row per sent row.
            acc = torch.promote_types(weights_TK.dtype, torch.float32)
            if acc == torch.float32 and T * K * P >= 2**24:  # slots must stay exact in the float
                acc = torch.float64
            w_TPK = weights_TK.to(acc).unsqueeze(1) * here_TPK.to(acc)
            slot_TPK = torch.where(here_TPK, slot_TK.unsqueeze(1), pad_P1).to(acc)
            msg = torch.cat([w_TPK, slot_TPK], dim=2).view(T * P, 2 * K).index_select(0, order[:T * P])
            local_E = pairs_PE[:, me * El:(me + 1) * El].sum(0)
            local_E[-1:] += 1  # the pad row

            # The only host read: every rank's pairs per expert and rows per destination.
            M = M_PX.tolist()
        send_splits = M[me][E:]
        recv_splits = [M[s][E + me] for s in range(P)]
        S, Q = sum(send_splits), sum(recv_splits)
        N = sum(M[s][e] for s in range(P) for e in range(me * El, (me + 1) * El))
        src_row_S = src_row[:S]
        with phase("hop_send"):
            recv_QK2 = C.all_to_all(msg[:S], self.ep, recv_splits, send_splits)
            x_SD = SendRows.apply(x_TD, src_row_S, pos_TP, mask_TP)
            x_QD = C.all_to_all(x_SD, self.ep, recv_splits, send_splits)

        # Receiver: rows to their slots; the extra row N is the zero pad, counted into the last expert.
        # One extra combine row reads only the pad row, so combine's backward always writes the pad
        # row's gradient (0) instead of leaving it uninitialised.
        with phase("local_gather"):
            pos_Q1K = torch.cat([recv_QK2[:, K:].detach(), recv_QK2.new_full((1, K), N)]).to(torch.int64)
            w_Q1K = torch.cat([recv_QK2[:, :K], recv_QK2.new_zeros(1, K)]).to(weights_TK.dtype)
            src_N1 = torch.zeros(N + 1, dtype=torch.int64, device=dev)
            row_QK = torch.div(torch.arange(Q * K, device=dev), K, rounding_mode="floor")
            src_N1.scatter_(0, pos_Q1K[:Q].reshape(-1), row_QK)
            x_ND = PermuteRows.apply(x_QD, src_N1, pos_Q1K[:Q], True)
        meta = A2AMeta(self.ep, send_splits, recv_splits, src_row_S, pos_TP, mask_TP, pos_Q1K, w_Q1K)
        return x_ND, local_E, meta

    def combine(self, y_ND: Tensor, meta: A2AMeta) -> Tensor:
        with phase("local_combine"):
            y_QD = fast_combine(y_ND, meta.pos_Q1K, meta.w_Q1K)[:-1]
        with phase("return"):
            y_SD = C.all_to_all(y_QD, meta.group, meta.send_splits, meta.recv_splits)
        with phase("reduce"):
            return ReduceSent.apply(y_SD, meta.src_row_S, meta.pos_TP, meta.mask_TP)

    def combine_overlapped(self, y_ND: Tensor, meta: A2AMeta, side: Callable[[], SideOut]
                           ) -> tuple[Tensor, SideOut]:
        """``combine``, with ``side()`` (e.g. the shared experts) computed while the return
        all-to-all is in flight. Same results and gradients as combine, then side."""
        with phase("local_combine"):
            y_QD = fast_combine(y_ND, meta.pos_Q1K, meta.w_Q1K)[:-1]
        with phase("return"):
            pending = C.all_to_all_start(y_QD, meta.group, meta.send_splits, meta.recv_splits)
        side_out = side()
        with phase("reduce"):
            return ReduceSent.apply(pending.wait(), meta.src_row_S, meta.pos_TP, meta.mask_TP), side_out


__all__ = ["A2AMeta", "AllToAllDispatcher"]
