"""The fast local MoE path: sort once, gather once, fuse the weighting, sum back once.

Where a plain MoE spends its time outside the expert GEMMs (routing, gather, un-permute,
combine: a third of a DeepSeek-like layer, issue 9) this module does the minimum:

1. ``build_route_index``: one stable sort of the T*K expert ids gives the permutation;
   its inverse and the per-expert counts come from a second small sort and a
   ``searchsorted``. No host synchronisation, no atomics, so it runs under CUDA graphs
   and ``torch.compile``, and it is deterministic.
2. ``permute``: each sorted row copies one token row (a gather). Its backward is a
   gather-sum over the K sorted copies of each token, not an atomic scatter-add.
3. ``swiglu_weighted``: ``silu(gate) * up * w`` in one pass. Folding the combine weight
   into the expert activation (exact: w2 is linear) turns the combine into a plain sum,
   and the weight's gradient falls out of the same pass as a row dot product.
4. ``unpermute_sum``: each token sums its K rows (gather-sum, fp32 accumulation). Its
   backward is the gather of step 2: the two ops are each other's adjoints.

Every op has a pure-torch implementation here (any device) and may have a faster kernel
registered per device type by a backend (``register_dispatch_ops``; the CUDA backend
registers Triton kernels). Both are checked against a float64 loop reference.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R = T*K sorted rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from anymoe.core.dispatch import DispatchMeta
from anymoe.core.op_registry import OpRegistry

GroupedMM = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class RouteIndex:
    """Where each (token, slot) pair sits once rows are sorted by expert.

    Worked example, T=3, K=2, E=3, expert_ids_TK = [[2, 0], [0, 1], [2, 1]]:
    flat ids [2, 0, 0, 1, 2, 1]; stable sort -> perm_R = [1, 2, 3, 5, 0, 4]
    (sorted row r holds flat pair perm_R[r]); src_token_R = perm_R // K = [0, 1, 1, 2, 0, 2];
    counts_E = [2, 2, 2]; sorted_pos_TK = inverse of perm_R = [[4, 0], [1, 2], [5, 3]].
    """

    perm_R: Tensor  # [R] int64: flat pair index (t*K + k) held by sorted row r
    src_token_R: Tensor  # [R] int64: token row a sorted row copies (perm_R // K)
    sorted_pos_TK: Tensor  # [T, K] int64: sorted row of pair (t, k); inverse of perm_R
    counts_E: Tensor  # [E] int64: rows per expert, in sorted order


def build_route_index(expert_ids_TK: Tensor, num_experts: int) -> RouteIndex:
    """Sort the (token, slot) pairs by expert; stable, so ties keep token order.

    An id of -1 marks a dropped pair (over capacity): it sorts last and is counted into the
    last expert's block, so R stays T*K and no count is read back to the host; its combine
    weight is 0, so it contributes nothing.
    """
    T, K = expert_ids_TK.shape
    flat_R = expert_ids_TK.reshape(-1)
    flat_R = torch.where(flat_R < 0, num_experts, flat_R)
    # Narrow keys: a radix sort makes one pass per key byte, so int16 ids sort in 2 passes
    # where int64 takes 8 (the sort was a third of the index-building time on the GPU).
    if num_experts < 2**15 - 1:
        flat_R = flat_R.to(torch.int16)
    ids_sorted_R, perm_R = torch.sort(flat_R, stable=True)
    # Inverse permutation: perm is a permutation, so a plain scatter (unique indices, hence
    # deterministic) instead of a second sort.
    rows_R = torch.arange(perm_R.numel(), device=perm_R.device)
    sorted_pos_R = torch.empty_like(perm_R).scatter_(0, perm_R, rows_R)
    # counts from the sorted ids: where each expert's run starts, no bincount (bincount on
    # some devices reads the max back to the host). The last block runs to the end.
    starts_E = torch.searchsorted(
        ids_sorted_R, torch.arange(num_experts, device=flat_R.device, dtype=ids_sorted_R.dtype)
    )
    ends_E = torch.cat([starts_E[1:], starts_E.new_full((1,), flat_R.numel())])
    counts_E = (ends_E - starts_E).to(torch.int64)
    return RouteIndex(
        perm_R=perm_R,
        src_token_R=torch.div(perm_R, K, rounding_mode="floor"),
        sorted_pos_TK=sorted_pos_R.view(T, K),
        counts_E=counts_E,
    )


class DispatchOps:
    """The memory-bound kernels of the fast path (and the router's top-k, the expert histogram),
    in plain torch.

    A backend subclasses this with device kernels and registers it for its device type.
    Shapes: topk_ids(scores [T, E], K) -> [T, K] int64; expert_counts(ids [N], E) -> [E] int64;
    gather_rows(x [N, D], idx [R]) -> [R, D];
    gather_sum(y [R, D], idx [T, K]) -> [T, D]; swiglu_fwd(h [R, 2F], w [R] or None) -> [R, F];
    swiglu_bwd(h, w, g [R, F]) -> (dh [R, 2F], dw [R] fp32 or None);
    combine_fwd(y [R, D], idx [T, K], w [T, K]) -> [T, D];
    combine_bwd(y, idx, w, g [T, D]) -> (dy [R, D], dw [T, K]). Half types accumulate in fp32.
    """

    name = "torch"

    def topk_ids(self, scores_TE: Tensor, k: int) -> Tensor:
        """Indices of the k largest scores of each row, [T, k] int64; selection only (no gradient).

        Contract (every implementation): each row holds k distinct indices in [0, E), in
        descending score order; where a row's values are distinct, its index set is torch.topk's.
        NaN ranks above every finite score (torch.topk's convention; torch also ranks it above
        +inf, a kernel may rank the two equal), so NaN scores are picked first. -inf scores
        (experts masked out, as group-limited routing does) are picked only when a row has
        fewer than k others, and still give distinct valid indices. Ties: a kernel puts the
        lower index first; this torch default keeps torch.topk's tie order, which is not
        specified (the CPU does not order ties by index).
        """
        return scores_TE.topk(k, dim=-1).indices

    def expert_counts(self, ids_N: Tensor, num_experts: int) -> Tensor:
        """Pairs per expert, [E] int64; ids outside [0, E) (dropped, -1) are not counted."""
        flat = torch.where((ids_N < 0) | (ids_N >= num_experts), num_experts, ids_N)
        counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids_N.device)
        return counts.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts]

    def gather_rows(self, x_ND: Tensor, idx_R: Tensor) -> Tensor:
        return x_ND.index_select(0, idx_R)

    def gather_sum(self, y_RD: Tensor, idx_TK: Tensor) -> Tensor:
        T, K = idx_TK.shape
        rows = y_RD.index_select(0, idx_TK.reshape(-1)).view(T, K, -1)
        return rows.sum(dim=1, dtype=_acc(y_RD)).to(y_RD.dtype)

    def swiglu_fwd(self, h_R2F: Tensor, w_R: Tensor | None) -> Tensor:
        acc = _acc(h_R2F)
        gate, up = h_R2F.to(acc).chunk(2, dim=-1)
        out = F.silu(gate) * up
        return (out if w_R is None else out * w_R.to(acc).unsqueeze(-1)).to(h_R2F.dtype)

    def swiglu_bwd(self, h_R2F: Tensor, w_R: Tensor | None, g_RF: Tensor) -> tuple[Tensor, Tensor | None]:
        acc = _acc(h_R2F)
        gate, up = h_R2F.to(acc).chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        g = g_RF.to(acc)
        dw = None if w_R is None else (g * silu * up).sum(dim=-1)
        gw = g if w_R is None else g * w_R.to(acc).unsqueeze(-1)
        d_up = gw * silu
        d_gate = gw * up * sig * (1 + gate * (1 - sig))
        return torch.cat([d_gate, d_up], dim=-1).to(h_R2F.dtype), dw

    def combine_fwd(self, y_RD: Tensor, idx_TK: Tensor, w_TK: Tensor) -> Tensor:
        T, K = idx_TK.shape
        acc = _acc(y_RD)
        rows = y_RD.index_select(0, idx_TK.reshape(-1)).view(T, K, -1).to(acc)
        # bmm, not einsum: the same contraction, 7x faster on the CPU (einsum took a slow path there).
        return torch.bmm(w_TK.to(acc).unsqueeze(1), rows).squeeze(1).to(y_RD.dtype)

    def combine_bwd(self, y_RD: Tensor, idx_TK: Tensor, w_TK: Tensor, g_TD: Tensor) -> tuple[Tensor, Tensor]:
        T, K = idx_TK.shape
        acc = _acc(y_RD)
        flat = idx_TK.reshape(-1)
        rows = y_RD.index_select(0, flat).view(T, K, -1).to(acc)
        dw = torch.bmm(rows, g_TD.to(acc).unsqueeze(-1)).squeeze(-1)
        dy_pairs = (w_TK.to(acc).unsqueeze(-1) * g_TD.to(acc).unsqueeze(1)).reshape(T * K, -1)
        # idx is a permutation of the rows: a plain scatter, no accumulation.
        dy = torch.empty_like(y_RD).index_copy_(0, flat, dy_pairs.to(y_RD.dtype))
        return dy, dw


def _acc(t: Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half types, else the tensor's own."""
    return torch.float32 if t.element_size() < 4 else t.dtype


TORCH_OPS = DispatchOps()
# Autograd functions carry the ops by name (a string constant traces cleanly under torch.compile).
_REGISTRY: OpRegistry[DispatchOps] = OpRegistry("dispatch", TORCH_OPS)


def register_dispatch_ops(device_type: str, ops: DispatchOps) -> None:
    """A backend's faster kernels for tensors of ``device_type`` (one registration each)."""
    _REGISTRY.register(device_type, ops)


def dispatch_ops_for(x: Tensor, fast: bool = True) -> DispatchOps:
    """The registered kernels for x's device, or the pure-torch ops."""
    return _REGISTRY.for_tensor(x, fast)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, src_token_R, sorted_pos_TK, ops_name):
        ctx.save_for_backward(sorted_pos_TK)
        ctx.ops_name = ops_name
        return _REGISTRY.named(ops_name).gather_rows(x_TD, src_token_R)

    @staticmethod
    def backward(ctx, g_RD):
        (sorted_pos_TK,) = ctx.saved_tensors
        return _REGISTRY.named(ctx.ops_name).gather_sum(g_RD.contiguous(), sorted_pos_TK), None, None, None


class _UnpermuteSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD, src_token_R, sorted_pos_TK, ops_name):
        ctx.save_for_backward(src_token_R)
        ctx.ops_name = ops_name
        return _REGISTRY.named(ops_name).gather_sum(y_RD, sorted_pos_TK)

    @staticmethod
    def backward(ctx, g_TD):
        (src_token_R,) = ctx.saved_tensors
        return _REGISTRY.named(ctx.ops_name).gather_rows(g_TD.contiguous(), src_token_R), None, None, None


class _SwiGLUWeighted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_R2F, w_R, ops_name):
        ctx.save_for_backward(h_R2F, w_R)
        ctx.ops_name = ops_name
        return _REGISTRY.named(ops_name).swiglu_fwd(h_R2F, w_R)

    @staticmethod
    def backward(ctx, g_RF):
        h_R2F, w_R = ctx.saved_tensors
        dh, dw = _REGISTRY.named(ctx.ops_name).swiglu_bwd(h_R2F, w_R, g_RF.contiguous())
        return dh, None if dw is None else dw.to(w_R.dtype), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD, sorted_pos_TK, w_TK, ops_name):
        ctx.save_for_backward(y_RD, sorted_pos_TK, w_TK)
        ctx.ops_name = ops_name
        return _REGISTRY.named(ops_name).combine_fwd(y_RD, sorted_pos_TK, w_TK)

    @staticmethod
    def backward(ctx, g_TD):
        y_RD, sorted_pos_TK, w_TK = ctx.saved_tensors
        dy, dw = _REGISTRY.named(ctx.ops_name).combine_bwd(y_RD, sorted_pos_TK, w_TK, g_TD.contiguous())
        return dy, None, dw.to(w_TK.dtype), None


def permute(x_TD: Tensor, index: RouteIndex, ops: DispatchOps | None = None) -> Tensor:
    """Token rows in expert-sorted order, [R, D]; differentiable in x."""
    ops = ops or dispatch_ops_for(x_TD)
    return _Permute.apply(x_TD.contiguous(), index.src_token_R, index.sorted_pos_TK, ops.name)


def unpermute_sum(y_RD: Tensor, index: RouteIndex, ops: DispatchOps | None = None) -> Tensor:
    """Sum each token's K sorted rows back into token order, [T, D]; differentiable in y."""
    ops = ops or dispatch_ops_for(y_RD)
    return _UnpermuteSum.apply(y_RD.contiguous(), index.src_token_R, index.sorted_pos_TK, ops.name)


def swiglu_weighted(h_R2F: Tensor, w_R: Tensor, ops: DispatchOps | None = None) -> Tensor:
    """``silu(h[:, :F]) * h[:, F:] * w[:, None]`` in one pass; differentiable in h and w."""
    ops = ops or dispatch_ops_for(h_R2F)
    return _SwiGLUWeighted.apply(h_R2F.contiguous(), w_R.contiguous(), ops.name)


def swiglu(h_R2F: Tensor, ops: DispatchOps | None = None) -> Tensor:
    """``silu(h[:, :F]) * h[:, F:]`` in one pass (forward and backward); differentiable in h."""
    ops = ops or dispatch_ops_for(h_R2F)
    return _SwiGLUWeighted.apply(h_R2F.contiguous(), None, ops.name)


def combine(y_RD: Tensor, sorted_pos_TK: Tensor, weights_TK: Tensor,
            ops: DispatchOps | None = None) -> Tensor:
    """``out[t] = sum_k w[t, k] * y[sorted_pos[t, k]]`` (fp32 accumulation), [T, D]; differentiable
    in y and w. Backward: one pass per token writes its K row gradients and K weight gradients,
    so ``sorted_pos`` must be a permutation of y's rows (as a RouteIndex's is)."""
    ops = ops or dispatch_ops_for(y_RD)
    return _Combine.apply(y_RD.contiguous(), sorted_pos_TK.contiguous(), weights_TK.contiguous(), ops.name)


def sorted_weights(weights_TK: Tensor, index: RouteIndex) -> Tensor:
    """Combine weights in sorted-row order (a small differentiable gather)."""
    return weights_TK.reshape(-1).index_select(0, index.perm_R)


def moe_ffn_fast(
    x_TD: Tensor,
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    w13_ED2F: Tensor,
    w2_EFD: Tensor,
    grouped_mm: GroupedMM,
    ops: DispatchOps | None = None,
) -> Tensor:
    """Routed SwiGLU experts: sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), in [T, D].

    ``w13_ED2F`` holds w1 (gate) in its first F columns and w3 (up) in the last F, so one
    grouped GEMM computes both. ``grouped_mm(x [R, D], w [E, D, F], counts [E])`` is the
    backend's kernel (rows sorted by expert).
    """
    ops = ops or dispatch_ops_for(x_TD)
    index = build_route_index(expert_ids_TK, w13_ED2F.shape[0])
    x_RD = permute(x_TD, index, ops)
    h_R2F = grouped_mm(x_RD, w13_ED2F, index.counts_E)
    act_RF = swiglu_weighted(h_R2F, sorted_weights(weights_TK, index), ops)
    y_RD = grouped_mm(act_RF, w2_EFD, index.counts_E)
    return unpermute_sum(y_RD, index, ops)


class FastLocalDispatcher:
    """``TokenDispatcher`` (anymoe.core.dispatch) for one rank on the fast ops.

    Same contract as ``LocalDispatcher``: dispatch -> (rows sorted by expert, counts, meta),
    combine -> weighted sum over the K slots. Dropped pairs (id -1, weight 0) ride on the
    last expert's block and are not zeroed: their weight is 0, so they add nothing forward
    and receive no gradient, which saves a pass over the rows.
    """

    def __init__(self, num_experts: int, ops: DispatchOps | None = None) -> None:
        self.num_local_experts = num_experts
        self.local_expert_offset = 0
        self.ops = ops

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor):
        index = build_route_index(expert_ids_TK, self.num_local_experts)
        x_RD = permute(x_TD, index, self.ops)
        return x_RD, index.counts_E, DispatchMeta(weights_TK, index.sorted_pos_TK, index.src_token_R)

    def combine(self, y_RD: Tensor, meta: DispatchMeta) -> Tensor:
        return combine(y_RD, meta.sorted_pos_TK, meta.weights_TK, self.ops)

    # Folded weights (MoELayer uses these when its experts take row weights): the experts scale
    # each row's activation by its weight, and the combine is an unweighted sum. Same result,
    # and the combine's backward needs no saved copy of the expert outputs ([R, D] per layer).
    def row_weights(self, meta: DispatchMeta) -> Tensor:
        """Combine weights in sorted-row order, [R]; differentiable."""
        w = meta.weights_TK.reshape(-1)
        return w.new_empty(meta.src_token_N.shape[0]).index_copy(0, meta.sorted_pos_TK.reshape(-1), w)

    def combine_summed(self, y_RD: Tensor, meta: DispatchMeta) -> Tensor:
        """out[t] = sum_k y[sorted_pos[t, k]] for rows that already carry their weights."""
        ops = self.ops or dispatch_ops_for(y_RD)
        return _UnpermuteSum.apply(y_RD.contiguous(), meta.src_token_N, meta.sorted_pos_TK, ops.name)


def moe_ffn_reference(
    x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, w13_ED2F: Tensor, w2_EFD: Tensor
) -> Tensor:
    """Plain loop over tokens and slots, in the inputs' dtype (use float64 to check)."""
    T, K = expert_ids_TK.shape
    Fh = w2_EFD.shape[1]
    rows = []
    for t in range(T):
        acc = x_TD.new_zeros(x_TD.shape[1])
        for k in range(K):
            e = int(expert_ids_TK[t, k])
            h = x_TD[t] @ w13_ED2F[e]
            acc = acc + weights_TK[t, k] * ((F.silu(h[:Fh]) * h[Fh:]) @ w2_EFD[e])
        rows.append(acc)
    return torch.stack(rows)
