"""Triton kernels for the fast MoE dispatch path on CUDA (see anymoe/core/dispatch_fast.py).

Memory-bound kernels replace the chains of small torch ops around the expert GEMMs:

- ``topk_ids``: the router's top-k indices, K passes of a row max over a [rows, E] tile held
  in registers (torch.topk ran a radix select and a sort of the K results: 0.8 ms per step
  on the moe-1b shape, for 4 MB read per layer).
- ``expert_counts``: pairs per expert from a block histogram (no contended scatter-add).
- ``gather_rows``: out[r] = x[idx[r]]; the permute forward and the un-permute backward.
- ``gather_sum``: out[t] = sum_k y[idx[t, k]], fp32 accumulation; the un-permute forward
  and the permute backward (no atomics: deterministic, and no zero-fill pass).
- ``swiglu_fwd`` / ``swiglu_bwd``: silu(gate) * up * w in one pass; the backward writes
  d(gate), d(up) and the combine weight's gradient (a row dot product) in one pass.

Each is a ``torch.library.custom_op`` (with a fake implementation), so ``torch.compile``
treats it as one opaque node and CUDA graphs capture it: grids depend on shapes only,
nothing is read back to the host. Importing this module registers the ops for device
type "cuda" when Triton is importable; otherwise the pure-torch twin runs.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R sorted rows (= T*K).
"""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.backends.triton_launch import eager
from anymoe.core.dispatch_fast import TORCH_OPS, DispatchOps, register_dispatch_ops

try:  # Triton ships with CUDA builds of torch; CPU builds and other devices lack it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TOPK_MAX_EXPERTS = 1024  # a row of E scores sits in registers; wider rows go to torch.topk


def _block(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(n, 16)))


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8


if HAVE_TRITON:

    @triton.jit
    def _topk_ids_kernel(s_ptr, out_ptr, T, E, stride_s, K: tl.constexpr, ROWS: tl.constexpr,
                         E_PAD: tl.constexpr):
        # K passes over a [ROWS, E_PAD] tile: the row max, then the lowest still-available column
        # holding it (ties: lower index first), which leaves the pool. Columns past E are never
        # available. Availability is a mask, not a score overwritten with -inf: real -inf scores
        # (group-limited routing's masked experts) stay pickable, so a row with fewer than K
        # finite scores still gets K distinct valid indices, its lowest unused -inf columns last.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, E_PAD)
        rmask = rows < T
        avail = rmask[:, None] & (cols < E)[None, :]
        s = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=avail,
                    other=float("-inf")).to(tl.float32)
        s = tl.where(s != s, float("inf"), s)  # NaN as +inf: above every finite score, as in torch.topk
        for i in range(K):  # a loop, not unrolled: K may reach E
            m = tl.max(tl.where(avail, s, float("-inf")), axis=1)
            hit = avail & (s == m[:, None])
            pick = tl.min(tl.where(hit, cols[None, :], E_PAD), axis=1)
            tl.store(out_ptr + rows * K + i, pick.to(tl.int64), mask=rmask)
            avail = avail & (cols[None, :] != pick[:, None])

    @triton.jit
    def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, R, D, stride_x, stride_o,
                            ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        # A [ROWS, BLOCK_D] tile: ROWS consecutive output rows, so the stores are contiguous.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = rows < R
        mask = rmask[:, None] & (cols < D)[None, :]
        src = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        vals = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=mask)
        tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], vals, mask=mask)

    @triton.jit
    def _histogram_kernel(ids_ptr, out_ptr, N, E, BLOCK: tl.constexpr, BINS: tl.constexpr):
        # A block histogram in registers, then E integer atomics per block: a scatter-add of
        # ones contends on E addresses (170 us per layer at T*K = 131k on the H100). Integer
        # sums are exact, so the counts do not depend on the atomics' order.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
        valid = (offs < N) & (ids >= 0) & (ids < E)
        hist = tl.histogram(tl.where(valid, ids, 0), BINS, mask=valid)
        bins = tl.arange(0, BINS)
        tl.atomic_add(out_ptr + bins, hist, mask=bins < E, sem="relaxed")

    @triton.jit
    def _gather_sum_kernel(
        y_ptr, idx_ptr, out_ptr, D, stride_y, stride_o, K: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            src = tl.load(idx_ptr + t * K + k).to(tl.int64)
            acc += tl.load(y_ptr + src * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_fwd_kernel(h_ptr, w_ptr, out_ptr, F, stride_h, stride_o, BLOCK_F: tl.constexpr,
                           HAS_W: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = cols < F
        gate = tl.load(h_ptr + r * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + r * stride_h + F + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        if HAS_W:
            out = out * tl.load(w_ptr + r).to(tl.float32)
        tl.store(out_ptr + r * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        h_ptr, w_ptr, g_ptr, dh_ptr, dw_ptr, F, stride_h, stride_g, stride_dh,
        BLOCK_F: tl.constexpr, N_BLOCKS: tl.constexpr, HAS_W: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        w = tl.load(w_ptr + r).to(tl.float32) if HAS_W else 1.0
        dw = tl.zeros([BLOCK_F], dtype=tl.float32)
        for i in range(N_BLOCKS):  # a run-time bound trips Triton's CPU interpreter
            cols = i * BLOCK_F + tl.arange(0, BLOCK_F)
            mask = cols < F
            gate = tl.load(h_ptr + r * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(h_ptr + r * stride_h + F + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + r * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            d_up = g * w * silu
            d_gate = g * w * up * sig * (1.0 + gate * (1.0 - sig))
            dw += g * silu * up
            tl.store(dh_ptr + r * stride_dh + cols, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dh_ptr + r * stride_dh + F + cols, d_up.to(dh_ptr.dtype.element_ty), mask=mask)
        if HAS_W:
            tl.store(dw_ptr + r, tl.sum(dw, axis=0))

    @triton.jit
    def _combine_fwd_kernel(y_ptr, idx_ptr, w_ptr, out_ptr, D, stride_y, stride_o,
                            K: tl.constexpr, BLOCK_D: tl.constexpr):
        # out[t] = sum_k w[t, k] * y[idx[t, k]]: one [BLOCK_D] accumulator, the K rows added in
        # turn (gather_sum's pattern; a [K, BLOCK_D] tile summed over K ran at ~1.4 TB/s on the
        # H100 where gather_sum runs at ~2.9).
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            src = tl.load(idx_ptr + t * K + k).to(tl.int64)
            w = tl.load(w_ptr + t * K + k).to(tl.float32)
            acc += w * tl.load(y_ptr + src * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_bwd_kernel(y_ptr, idx_ptr, w_ptr, g_ptr, dy_ptr, dw_ptr, D, stride_y, stride_g, stride_dy,
                            K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                            N_BLOCKS: tl.constexpr):
        # dy[idx[t, k]] = w[t, k] * g[t] (idx is a permutation: plain stores) and
        # dw[t, k] = <g[t], y[idx[t, k]]>, in one pass over token t's rows.
        t = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, K_PAD)
        kmask = ks < K
        src = tl.load(idx_ptr + t * K + ks, mask=kmask, other=0).to(tl.int64)
        w = tl.load(w_ptr + t * K + ks, mask=kmask, other=0.0).to(tl.float32)
        dw = tl.zeros([K_PAD], dtype=tl.float32)
        for i in range(N_BLOCKS):
            cols = i * BLOCK_D + tl.arange(0, BLOCK_D)
            cmask = cols < D
            m2 = kmask[:, None] & cmask[None, :]
            g = tl.load(g_ptr + t * stride_g + cols, mask=cmask, other=0.0).to(tl.float32)
            tile = tl.load(y_ptr + src[:, None] * stride_y + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            dw += tl.sum(tile * g[None, :], axis=1)
            dy = w[:, None] * g[None, :]
            dy_ptrs = dy_ptr + src[:, None] * stride_dy + cols[None, :]
            tl.store(dy_ptrs, dy.to(dy_ptr.dtype.element_ty), mask=m2)
        tl.store(dw_ptr + t * K + ks, dw, mask=kmask)


# --- launchers: plain functions on any tensors Triton can address (also its CPU interpreter) ---


def launch_topk_ids(scores_TE: Tensor, k: int) -> Tensor:
    """[T, k] int64 for scores with unit column stride, E <= TOPK_MAX_EXPERTS, k <= E."""
    T, E = scores_TE.shape
    out = torch.empty(T, k, dtype=torch.int64, device=scores_TE.device)
    if T and k:
        e_pad = triton.next_power_of_2(max(E, 16))
        rows = 2048 // e_pad  # a 2048-score tile: 16 per thread at 4 warps
        _topk_ids_kernel[(triton.cdiv(T, rows),)](scores_TE, out, T, E, scores_TE.stride(0), K=k,
                                                 ROWS=rows, E_PAD=e_pad, num_warps=4)
    return out


def launch_expert_counts(ids_N: Tensor, num_experts: int) -> Tensor:
    out = torch.zeros(num_experts, dtype=torch.int32, device=ids_N.device)
    n = ids_N.numel()
    if n:
        block = 4096
        _histogram_kernel[(triton.cdiv(n, block),)](ids_N, out, n, num_experts, BLOCK=block,
                                                   BINS=triton.next_power_of_2(num_experts), num_warps=4)
    return out.to(torch.int64)


def launch_gather_rows(x_ND: Tensor, idx_R: Tensor) -> Tensor:
    R, D = idx_R.shape[0], x_ND.shape[1]
    out = x_ND.new_empty(R, D)
    if R and D:
        block = _block(D, 1024)
        rows = 4
        grid = (triton.cdiv(R, rows), triton.cdiv(D, block))
        _gather_rows_kernel[grid](x_ND, idx_R, out, R, D, x_ND.stride(0), out.stride(0),
                                  ROWS=rows, BLOCK_D=block, num_warps=4)
    return out


def launch_gather_sum(y_RD: Tensor, idx_TK: Tensor) -> Tensor:
    (T, K), D = idx_TK.shape, y_RD.shape[1]
    out = y_RD.new_empty(T, D)
    if T and D:
        block = _block(D, 2048)
        grid = (T, triton.cdiv(D, block))
        _gather_sum_kernel[grid](y_RD, idx_TK, out, D, y_RD.stride(0), out.stride(0),
                                 K=K, BLOCK_D=block, num_warps=_warps(block))
    return out


def launch_swiglu_fwd(h_R2F: Tensor, w_R: Tensor | None) -> Tensor:
    R, F = h_R2F.shape[0], h_R2F.shape[1] // 2
    out = h_R2F.new_empty(R, F)
    if R and F:
        block = _block(F, 2048)
        grid = (R, triton.cdiv(F, block))
        _swiglu_fwd_kernel[grid](h_R2F, h_R2F if w_R is None else w_R, out, F, h_R2F.stride(0), out.stride(0),
                                 BLOCK_F=block, HAS_W=w_R is not None, num_warps=_warps(block))
    return out


def launch_swiglu_bwd(h_R2F: Tensor, w_R: Tensor | None, g_RF: Tensor) -> tuple[Tensor, Tensor]:
    """-> (dh, dw); dw is an empty tensor when there is no weight."""
    R, F = h_R2F.shape[0], h_R2F.shape[1] // 2
    dh = torch.empty_like(h_R2F)
    dw = torch.empty(R if w_R is not None else 0, dtype=torch.float32, device=h_R2F.device)
    if R and F:
        block = _block(F, 1024)
        _swiglu_bwd_kernel[(R,)](h_R2F, h_R2F if w_R is None else w_R, g_RF, dh, dw, F, h_R2F.stride(0),
                                 g_RF.stride(0), dh.stride(0), BLOCK_F=block, N_BLOCKS=triton.cdiv(F, block),
                                 HAS_W=w_R is not None, num_warps=_warps(block))
    elif dw.numel():
        dw.zero_()
    return dh, dw


def launch_combine_fwd(y_RD: Tensor, idx_TK: Tensor, w_TK: Tensor) -> Tensor:
    (T, K), D = idx_TK.shape, y_RD.shape[1]
    out = y_RD.new_empty(T, D)
    if T and D:
        block = _block(D, 2048)  # the launch of gather_sum, whose pattern the kernel shares
        grid = (T, triton.cdiv(D, block))
        _combine_fwd_kernel[grid](y_RD, idx_TK, w_TK, out, D, y_RD.stride(0), out.stride(0), K=K,
                                  BLOCK_D=block, num_warps=_warps(block))
    return out


def launch_combine_bwd(y_RD: Tensor, idx_TK: Tensor, w_TK: Tensor, g_TD: Tensor) -> tuple[Tensor, Tensor]:
    (T, K), D = idx_TK.shape, y_RD.shape[1]
    dy = torch.empty_like(y_RD)
    dw = torch.empty(T, K, dtype=torch.float32, device=y_RD.device)
    if T and D:
        block = _block(D, max(64, 2048 // triton.next_power_of_2(K)))
        _combine_bwd_kernel[(T,)](y_RD, idx_TK, w_TK, g_TD, dy, dw, D, y_RD.stride(0), g_TD.stride(0),
                                  dy.stride(0), K=K, K_PAD=triton.next_power_of_2(K), BLOCK_D=block,
                                  N_BLOCKS=triton.cdiv(D, block), num_warps=4)
    elif T:
        dw.zero_()
    return dy, dw


# --- custom ops: one opaque node each for torch.compile, capturable by CUDA graphs ---

if HAVE_TRITON:

    @torch.library.custom_op("anymoe::topk_ids", mutates_args=(), device_types="cuda")
    def _topk_ids_op(scores: Tensor, k: int) -> Tensor:
        return launch_topk_ids(scores, k)

    @_topk_ids_op.register_fake
    def _(scores, k):
        return scores.new_empty(scores.shape[0], k, dtype=torch.int64)

    @torch.library.custom_op("anymoe::expert_counts", mutates_args=(), device_types="cuda")
    def _expert_counts_op(ids: Tensor, num_experts: int) -> Tensor:
        return launch_expert_counts(ids, num_experts)

    @_expert_counts_op.register_fake
    def _(ids, num_experts):
        return ids.new_empty(num_experts, dtype=torch.int64)

    @torch.library.custom_op("anymoe::gather_rows", mutates_args=(), device_types="cuda")
    def _gather_rows_op(x: Tensor, idx: Tensor) -> Tensor:
        return launch_gather_rows(x, idx)

    @_gather_rows_op.register_fake
    def _(x, idx):
        return x.new_empty(idx.shape[0], x.shape[1])

    @torch.library.custom_op("anymoe::gather_sum", mutates_args=(), device_types="cuda")
    def _gather_sum_op(y: Tensor, idx: Tensor) -> Tensor:
        return launch_gather_sum(y, idx)

    @_gather_sum_op.register_fake
    def _(y, idx):
        return y.new_empty(idx.shape[0], y.shape[1])

    @torch.library.custom_op("anymoe::swiglu_fwd", mutates_args=(), device_types="cuda")
    def _swiglu_fwd_op(h: Tensor, w: Tensor | None) -> Tensor:
        return launch_swiglu_fwd(h, w)

    @_swiglu_fwd_op.register_fake
    def _(h, w):
        return h.new_empty(h.shape[0], h.shape[1] // 2)

    @torch.library.custom_op("anymoe::swiglu_bwd", mutates_args=(), device_types="cuda")
    def _swiglu_bwd_op(h: Tensor, w: Tensor | None, g: Tensor) -> tuple[Tensor, Tensor]:
        return launch_swiglu_bwd(h, w, g)

    @_swiglu_bwd_op.register_fake
    def _(h, w, g):
        return torch.empty_like(h), h.new_empty(h.shape[0] if w is not None else 0, dtype=torch.float32)

    @torch.library.custom_op("anymoe::combine_fwd", mutates_args=(), device_types="cuda")
    def _combine_fwd_op(y: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        return launch_combine_fwd(y, idx, w)

    @_combine_fwd_op.register_fake
    def _(y, idx, w):
        return y.new_empty(idx.shape[0], y.shape[1])

    @torch.library.custom_op("anymoe::combine_bwd", mutates_args=(), device_types="cuda")
    def _combine_bwd_op(y: Tensor, idx: Tensor, w: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        return launch_combine_bwd(y, idx, w, g)

    @_combine_bwd_op.register_fake
    def _(y, idx, w, g):
        return torch.empty_like(y), y.new_empty(idx.shape, dtype=torch.float32)


class TritonDispatchOps(DispatchOps):
    """The fast path's kernels in Triton; the pure-torch ops for what they do not cover."""

    name = "triton"

    @staticmethod
    def _ok(*ts: Tensor) -> bool:
        return all(t.dtype in _KERNEL_DTYPES and t.is_contiguous() for t in ts)

    def topk_ids(self, scores_TE: Tensor, k: int) -> Tensor:
        E = scores_TE.shape[-1]
        if scores_TE.dim() != 2 or not self._ok(scores_TE) or E > TOPK_MAX_EXPERTS or not 0 <= k <= E:
            return TORCH_OPS.topk_ids(scores_TE, k)  # k > E: torch.topk raises the error
        if eager():
            return launch_topk_ids(scores_TE, k)
        return torch.ops.anymoe.topk_ids(scores_TE, k)

    def expert_counts(self, ids_N: Tensor, num_experts: int) -> Tensor:
        ids_N = ids_N.reshape(-1).contiguous()
        if eager():
            return launch_expert_counts(ids_N, num_experts)
        return torch.ops.anymoe.expert_counts(ids_N, num_experts)

    def gather_rows(self, x_ND: Tensor, idx_R: Tensor) -> Tensor:
        if not self._ok(x_ND):
            return TORCH_OPS.gather_rows(x_ND, idx_R)
        if eager():
            return launch_gather_rows(x_ND, idx_R.contiguous())
        return torch.ops.anymoe.gather_rows(x_ND, idx_R.contiguous())

    def gather_sum(self, y_RD: Tensor, idx_TK: Tensor) -> Tensor:
        if not self._ok(y_RD):
            return TORCH_OPS.gather_sum(y_RD, idx_TK)
        if eager():
            return launch_gather_sum(y_RD, idx_TK.contiguous())
        return torch.ops.anymoe.gather_sum(y_RD, idx_TK.contiguous())

    def swiglu_fwd(self, h_R2F: Tensor, w_R: Tensor | None) -> Tensor:
        if not self._ok(h_R2F, *([] if w_R is None else [w_R])):
            return TORCH_OPS.swiglu_fwd(h_R2F, w_R)
        if eager():
            return launch_swiglu_fwd(h_R2F, w_R)
        return torch.ops.anymoe.swiglu_fwd(h_R2F, w_R)

    def swiglu_bwd(self, h_R2F: Tensor, w_R: Tensor | None, g_RF: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self._ok(h_R2F, g_RF, *([] if w_R is None else [w_R])):
            return TORCH_OPS.swiglu_bwd(h_R2F, w_R, g_RF)
        op = launch_swiglu_bwd if eager() else torch.ops.anymoe.swiglu_bwd
        dh, dw = op(h_R2F, w_R, g_RF)
        return dh, None if w_R is None else dw

    def combine_fwd(self, y_RD: Tensor, idx_TK: Tensor, w_TK: Tensor) -> Tensor:
        if not self._ok(y_RD, w_TK):
            return TORCH_OPS.combine_fwd(y_RD, idx_TK, w_TK)
        op = launch_combine_fwd if eager() else torch.ops.anymoe.combine_fwd
        return op(y_RD, idx_TK.contiguous(), w_TK)

    def combine_bwd(self, y_RD: Tensor, idx_TK: Tensor, w_TK: Tensor, g_TD: Tensor) -> tuple[Tensor, Tensor]:
        if not self._ok(y_RD, w_TK, g_TD):
            return TORCH_OPS.combine_bwd(y_RD, idx_TK, w_TK, g_TD)
        op = launch_combine_bwd if eager() else torch.ops.anymoe.combine_bwd
        return op(y_RD, idx_TK.contiguous(), w_TK, g_TD)


TRITON_OPS = TritonDispatchOps() if HAVE_TRITON else None
if TRITON_OPS is not None:
    register_dispatch_ops("cuda", TRITON_OPS)


def grouped_mm_direct(x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
    """``torch._grouped_mm`` on int32 offsets with no host-side checks: traceable whole by
    torch.compile (the backend's probing wrapper reads data pointers, a graph break).

    For the fast path's own tensors: rows come fresh from a kernel (aligned, contiguous),
    weights are contiguous parameters, and D, F are multiples of 8 (bf16 16-byte strides).
    """
    return torch._grouped_mm(x_TD, w_EDF, offs=torch.cumsum(counts_E, 0, dtype=torch.int32))
