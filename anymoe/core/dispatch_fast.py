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
    """Sort the (token, slot) pairs by expert; stable, so ties keep token order."""
    T, K = expert_ids_TK.shape
    flat_R = expert_ids_TK.reshape(-1)
    ids_sorted_R, perm_R = torch.sort(flat_R, stable=True)
    # Inverse permutation by a second sort (no scatter: deterministic on every device).
    sorted_pos_R = torch.argsort(perm_R)
    # counts from the sorted ids: boundaries of each expert's run, no bincount (bincount on
    # some devices reads the max back to the host).
    bounds = torch.searchsorted(
        ids_sorted_R, torch.arange(num_experts + 1, device=flat_R.device, dtype=ids_sorted_R.dtype)
    )
    counts_E = (bounds[1:] - bounds[:-1]).to(torch.int64)
    return RouteIndex(
        perm_R=perm_R,
        src_token_R=torch.div(perm_R, K, rounding_mode="floor"),
        sorted_pos_TK=sorted_pos_R.view(T, K),
        counts_E=counts_E,
    )


class DispatchOps:
    """The three memory-bound kernels of the fast path, in plain torch (runs everywhere).

    A backend subclasses this with device kernels and registers it for its device type.
    Shapes: gather_rows(x [N, D], idx [R]) -> [R, D]; gather_sum(y [R, D], idx [T, K]) ->
    [T, D] summed in fp32; swiglu_fwd(h [R, 2F], w [R] fp32) -> [R, F];
    swiglu_bwd(h, w, g [R, F]) -> (dh [R, 2F], dw [R] fp32). Half types accumulate in fp32.
    """

    name = "torch"

    def gather_rows(self, x_ND: Tensor, idx_R: Tensor) -> Tensor:
        return x_ND.index_select(0, idx_R)

    def gather_sum(self, y_RD: Tensor, idx_TK: Tensor) -> Tensor:
        T, K = idx_TK.shape
        rows = y_RD.index_select(0, idx_TK.reshape(-1)).view(T, K, -1)
        return rows.sum(dim=1, dtype=_acc(y_RD)).to(y_RD.dtype)

    def swiglu_fwd(self, h_R2F: Tensor, w_R: Tensor) -> Tensor:
        acc = _acc(h_R2F)
        gate, up = h_R2F.to(acc).chunk(2, dim=-1)
        return (F.silu(gate) * up * w_R.to(acc).unsqueeze(-1)).to(h_R2F.dtype)

    def swiglu_bwd(self, h_R2F: Tensor, w_R: Tensor, g_RF: Tensor) -> tuple[Tensor, Tensor]:
        acc = _acc(h_R2F)
        gate, up = h_R2F.to(acc).chunk(2, dim=-1)
        g = g_RF.to(acc)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        w = w_R.to(acc).unsqueeze(-1)
        d_up = g * w * silu
        d_gate = g * w * up * sig * (1 + gate * (1 - sig))
        dw = (g * silu * up).sum(dim=-1)
        return torch.cat([d_gate, d_up], dim=-1).to(h_R2F.dtype), dw


def _acc(t: Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half types, else the tensor's own."""
    return torch.float32 if t.element_size() < 4 else t.dtype


TORCH_OPS = DispatchOps()
_OPS: dict[str, DispatchOps] = {}  # device type -> fastest ops
# Autograd functions carry the ops by name (a string constant traces cleanly under torch.compile).
_BY_NAME: dict[str, DispatchOps] = {TORCH_OPS.name: TORCH_OPS}


def register_dispatch_ops(device_type: str, ops: DispatchOps) -> None:
    """A backend's faster kernels for tensors of ``device_type`` (one registration each)."""
    if device_type in _OPS and _OPS[device_type] is not ops:
        raise ValueError(f"dispatch ops for device type {device_type!r} are registered twice")
    _OPS[device_type] = ops
    _BY_NAME[ops.name] = ops


def dispatch_ops_for(x: Tensor, fast: bool = True) -> DispatchOps:
    """The registered kernels for x's device, or the pure-torch ops."""
    return _OPS.get(x.device.type, TORCH_OPS) if fast else TORCH_OPS


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, src_token_R, sorted_pos_TK, ops_name):
        ctx.save_for_backward(sorted_pos_TK)
        ctx.ops_name = ops_name
        return _BY_NAME[ops_name].gather_rows(x_TD, src_token_R)

    @staticmethod
    def backward(ctx, g_RD):
        (sorted_pos_TK,) = ctx.saved_tensors
        return _BY_NAME[ctx.ops_name].gather_sum(g_RD.contiguous(), sorted_pos_TK), None, None, None


class _UnpermuteSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD, src_token_R, sorted_pos_TK, ops_name):
        ctx.save_for_backward(src_token_R)
        ctx.ops_name = ops_name
        return _BY_NAME[ops_name].gather_sum(y_RD, sorted_pos_TK)

    @staticmethod
    def backward(ctx, g_TD):
        (src_token_R,) = ctx.saved_tensors
        return _BY_NAME[ctx.ops_name].gather_rows(g_TD.contiguous(), src_token_R), None, None, None


class _SwiGLUWeighted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_R2F, w_R, ops_name):
        ctx.save_for_backward(h_R2F, w_R)
        ctx.ops_name = ops_name
        return _BY_NAME[ops_name].swiglu_fwd(h_R2F, w_R)

    @staticmethod
    def backward(ctx, g_RF):
        h_R2F, w_R = ctx.saved_tensors
        dh, dw = _BY_NAME[ctx.ops_name].swiglu_bwd(h_R2F, w_R, g_RF.contiguous())
        return dh, dw.to(w_R.dtype), None


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
