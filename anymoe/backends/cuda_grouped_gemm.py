"""Triton grouped GEMMs for the MoE experts (bf16 in, fp32 accumulate), with a fused row gather.

Rows are sorted by expert; ``offs_E`` holds the int32 END offset of every group, as
``torch._grouped_mm``'s ``offs`` does: group e owns rows [offs[e-1], offs[e]).

- ``grouped_mm_rows``: out[r] = A_row(r) @ W_e, M-grouped; the experts' forward and, on the
  transposed weight (strides, no copy), their data gradient. A persistent kernel: one program
  per SM walks the list of (group, row tile, column tile) triples, reading offs on the device,
  so uneven groups cost no idle programs. Rows past offs[-1] are written as zeros.
- ``grouped_mm_wgrad``: dw[e] = A_e^T @ G_e, K-grouped; the weight gradient. One program per
  (expert, output tile), looping over the expert's rows; an expert with no rows gets zeros.
- ``idx_R`` (optional, both): A_row(r) = a[idx[r]], the dispatch permute fused into the A load,
  so the permuted copy of the activations is never written.

Nothing is read back to the host and grids depend on shapes only, so the launchers can be
captured in CUDA graphs (after a first call has autotuned them). Custom ops
``anymoe::grouped_mm_rows`` / ``anymoe::grouped_mm_wgrad`` make each one opaque node for
torch.compile; ``grouped_mm`` is the autograd function over both.

They run on CUDA tensors, and on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1),
which is how tests/backends/test_cuda_grouped_gemm_interpreter.py checks them without a GPU.

Legend: R rows (sorted by expert), K reduction dim, N output dim, E experts.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU builds and other devices lack it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

# Read once at import, as Triton itself does: the interpreter runs one small config (autotuning
# there would run every config in Python) and takes the while-loop path of the wgrad kernel.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRET_PROGRAMS = 4  # the persistent grid in the interpreter, which has no SMs to count


def _rows_configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    shapes = [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
              (64, 128, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _wgrad_configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_K1": 16, "BLOCK_N": 32, "BLOCK_R": 16}, num_warps=4, num_stages=1)]
    shapes = [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4)]
    return [triton.Config({"BLOCK_K1": k1, "BLOCK_N": n, "BLOCK_R": r}, num_warps=w, num_stages=s)
            for k1, n, r, w, s in shapes]


if HAVE_TRITON:

    @triton.jit
    def _rows_tile(a_ptr, idx_ptr, w_ptr, rows, row_end, cols, N, stride_am, stride_ak, stride_wk, stride_wn,
                   K: tl.constexpr, HAS_IDX: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] fp32 tile of A_rows @ W. Rows past the group's end are clamped onto
        its last row (their results are never stored): no row mask in the K loop. Columns are
        masked, not clamped: a clamp hides their contiguity, and W's loads (N-contiguous) then
        cannot be vectorised, nor pipelined as bf16 (cp.async needs 4 bytes or more)."""
        rows = tl.minimum(rows, row_end - 1)
        nmask = (cols < N)[None, :]
        if HAS_IDX:
            src = tl.load(idx_ptr + rows).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak
        w_ptrs = w_ptr + ks[:, None] * stride_wk + cols[None, :].to(tl.int64) * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # K (like E) is a compile-time constant, one compile per model shape: the interpreter cannot
        # take a run-time range() bound, and a constant K drops the tail mask when BLOCK_K divides it.
        for k0 in range(0, K, BLOCK_K):
            if K % BLOCK_K == 0:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs, mask=nmask, other=0.0)
            else:
                kmask = ks < K - k0
                a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=kmask[:, None] & nmask, other=0.0)
            if DOT_FP32:  # the interpreter multiplies bf16 as its raw uint16 bits
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        return acc

    @triton.autotune(configs=_rows_configs(), key=["N", "K"])
    @triton.jit
    def _grouped_mm_rows_kernel(a_ptr, idx_ptr, w_ptr, offs_ptr, out_ptr, R, N,
                                stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om,
                                E: tl.constexpr, K: tl.constexpr, HAS_IDX: tl.constexpr,
                                PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # The tile list, in order: group 0's tiles, group 1's, ..., then the tail rows [offs[-1], R).
        # Within a group the column tiles of one row tile are consecutive, so the programs running
        # at the same moment share their A rows (and each W_e) in L2.
        tile = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        first = tile * 0  # index of the current group's first tile (an int32 loop-carried value)
        start = tile * 0
        for e in range(E):
            end = tl.minimum(tl.load(offs_ptr + e).to(tl.int32), R)  # the clamp keeps stores in bounds
            n_tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M) * num_n
            w_e = w_ptr + tl.cast(e, tl.int64) * stride_we  # E*K*N may pass 2**31
            while tile < first + n_tiles:
                local = tile - first
                rows = start + (local // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
                cols = (local % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
                acc = _rows_tile(a_ptr, idx_ptr, w_e, rows, end, cols, N, stride_am, stride_ak, stride_wk,
                                 stride_wn, K, HAS_IDX, PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)
                mask = (rows < end)[:, None] & (cols < N)[None, :]
                out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
                tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
                tile += tl.num_programs(0)
            first += n_tiles
            start = end
        n_tiles = tl.cdiv(tl.maximum(R - start, 0), BLOCK_M) * num_n
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
        while tile < first + n_tiles:
            local = tile - first
            rows = start + (local // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = (local % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = (rows < R)[:, None] & (cols < N)[None, :]
            tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], zeros, mask=mask)
            tile += tl.num_programs(0)

    @triton.jit
    def _wgrad_chunk(acc, a_ptr, idx_ptr, g_ptr, r0, end, ks, cols, K, N, stride_am, stride_ak, stride_gr,
                     stride_gn, HAS_IDX: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                     BLOCK_R: tl.constexpr):
        """acc += A[r0:r0+BLOCK_R, ks]^T @ G[r0:r0+BLOCK_R, cols]; rows past the group's end load as
        zeros in both operands (a zero times a non-finite G would still be NaN)."""
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        if HAS_IDX:
            src = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak
        a = tl.load(a_ptrs, mask=rmask[:, None] & (ks < K)[None, :], other=0.0)
        g_ptrs = g_ptr + rows[:, None].to(tl.int64) * stride_gr + cols[None, :] * stride_gn
        g = tl.load(g_ptrs, mask=rmask[:, None] & (cols < N)[None, :], other=0.0)
        if DOT_FP32:
            a, g = a.to(tl.float32), g.to(tl.float32)
        return tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)

    @triton.autotune(configs=_wgrad_configs(), key=["N", "K"])
    @triton.jit
    def _grouped_mm_wgrad_kernel(a_ptr, idx_ptr, g_ptr, offs_ptr, out_ptr, K, N,
                                 stride_am, stride_ak, stride_gr, stride_gn, stride_oe, stride_ok,
                                 HAS_IDX: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                                 LOOP_WHILE: tl.constexpr,
                                 BLOCK_K1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        e = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        ks = (tl.program_id(1) // num_n) * BLOCK_K1 + tl.arange(0, BLOCK_K1)
        cols = (tl.program_id(1) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0).to(tl.int32)
        end = tl.load(offs_ptr + e).to(tl.int32)
        acc = tl.zeros((BLOCK_K1, BLOCK_N), dtype=tl.float32)
        if LOOP_WHILE:  # the interpreter cannot take a run-time range() bound; a while loop is not pipelined
            r0 = start
            while r0 < end:
                acc = _wgrad_chunk(acc, a_ptr, idx_ptr, g_ptr, r0, end, ks, cols, K, N, stride_am,
                                   stride_ak, stride_gr, stride_gn, HAS_IDX, PRECISION, DOT_FP32, BLOCK_R)
                r0 += BLOCK_R
        else:
            for r0 in range(start, end, BLOCK_R):
                acc = _wgrad_chunk(acc, a_ptr, idx_ptr, g_ptr, r0, end, ks, cols, K, N, stride_am,
                                   stride_ak, stride_gr, stride_gn, HAS_IDX, PRECISION, DOT_FP32, BLOCK_R)
        mask = (ks < K)[:, None] & (cols < N)[None, :]
        out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + ks[:, None] * stride_ok + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --- launchers: plain functions on CUDA tensors (or CPU tensors in Triton's interpreter) ---


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRET_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands follow torch's matmul setting (TF32 only when allowed); bf16/fp16 ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _check(a_RK: Tensor, other: Tensor, offs_E: Tensor, idx_R: Tensor | None, E: int,
           other_name: str) -> None:
    if not HAVE_TRITON:
        raise RuntimeError("the Triton grouped GEMMs need Triton; use torch._grouped_mm or grouped_mm_loop")
    if a_RK.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"a_RK is on {a_RK.device}: the kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    if a_RK.dtype != other.dtype:
        raise ValueError(f"a_RK is {a_RK.dtype} but {other_name} is {other.dtype}: cast them to one dtype")
    if offs_E.shape != (E,) or offs_E.dtype.is_floating_point:
        raise ValueError(f"offs_E must be integer end offsets of shape ({E},), got {offs_E.dtype} "
                         f"{tuple(offs_E.shape)}")
    for name, t in (("offs_E", offs_E), ("idx_R", idx_R), (other_name, other)):
        if t is not None and t.device != a_RK.device:
            raise ValueError(f"{name} is on {t.device}, a_RK on {a_RK.device}: move them to one device")


def grouped_mm_rows(a_RK: Tensor, w_EKN: Tensor, offs_E: Tensor, idx_R: Tensor | None = None,
                    trans_w: bool = False) -> Tensor:
    """out[r] = A_row(r) @ W_e for the rows r of group e; rows past offs[-1] are zeros.

    A_row(r) = a_RK[r], or a_RK[idx_R[r]] with a gather (then R = len(idx_R)). W_e = w_EKN[e]
    ([E, K, N]), or with ``trans_w`` w_EKN is [E, N, K] and W_e = w_EKN[e].T, read through strides.
    """
    if a_RK.dim() != 2 or w_EKN.dim() != 3:
        raise ValueError(f"a_RK must be 2-D and w_EKN 3-D, got {tuple(a_RK.shape)} and {tuple(w_EKN.shape)}")
    E = w_EKN.shape[0]
    K, N = (w_EKN.shape[2], w_EKN.shape[1]) if trans_w else (w_EKN.shape[1], w_EKN.shape[2])
    R = a_RK.shape[0] if idx_R is None else idx_R.shape[0]
    _check(a_RK, w_EKN, offs_E, idx_R, E, "w_EKN")
    if a_RK.shape[1] != K:
        raise ValueError(f"a_RK {tuple(a_RK.shape)} does not match the weight's K={K} (trans_w={trans_w})")
    if E == 0 or K == 0:
        return a_RK.new_zeros(R, N)
    out = a_RK.new_empty(R, N)
    if R == 0 or N == 0:
        return out
    stride_wk, stride_wn = w_EKN.stride(1), w_EKN.stride(2)
    if trans_w:  # w is [E, N, K]: W_e[k, n] = w[e, n, k]
        stride_wk, stride_wn = stride_wn, stride_wk
    num_sms = _num_sms(a_RK.device)

    def grid(meta: dict) -> tuple[int]:
        most_tiles = (triton.cdiv(R, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(num_sms, most_tiles),)

    idx = a_RK if idx_R is None else idx_R.contiguous()  # a placeholder pointer when there is no gather
    _grouped_mm_rows_kernel[grid](
        a_RK, idx, w_EKN, offs_E.contiguous(), out, R, N, a_RK.stride(0), a_RK.stride(1),
        w_EKN.stride(0), stride_wk, stride_wn, out.stride(0),
        E=E, K=K, HAS_IDX=idx_R is not None, PRECISION=_precision(a_RK.dtype), DOT_FP32=INTERPRET)
    return out


def grouped_mm_wgrad(a_RK: Tensor, g_RN: Tensor, offs_E: Tensor, idx_R: Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> Tensor:
    """dw[e] = A_e^T @ G_e over the rows of group e (A rows gathered through idx_R when given);
    fp32 accumulation, [E, K, N] in out_dtype (default a's); a group with no rows gets zeros."""
    if a_RK.dim() != 2 or g_RN.dim() != 2 or offs_E.dim() != 1:
        raise ValueError(f"a_RK, g_RN must be 2-D, offs_E 1-D: got {tuple(a_RK.shape)}, {tuple(g_RN.shape)}, "
                         f"{tuple(offs_E.shape)}")
    E, (R, N), K = offs_E.shape[0], g_RN.shape, a_RK.shape[1]
    _check(a_RK, g_RN, offs_E, idx_R, E, "g_RN")
    rows_a = a_RK.shape[0] if idx_R is None else idx_R.shape[0]
    if rows_a != R:
        raise ValueError(f"g_RN has {R} rows but A has {rows_a} (len(idx_R) with a gather)")
    out = torch.empty(E, K, N, dtype=out_dtype or a_RK.dtype, device=a_RK.device)
    if out.numel() == 0:
        return out
    if R == 0:
        return out.zero_()

    def grid(meta: dict) -> tuple[int, int]:
        return (E, triton.cdiv(K, meta["BLOCK_K1"]) * triton.cdiv(N, meta["BLOCK_N"]))

    idx = a_RK if idx_R is None else idx_R.contiguous()
    _grouped_mm_wgrad_kernel[grid](
        a_RK, idx, g_RN, offs_E.contiguous(), out, K, N, a_RK.stride(0), a_RK.stride(1), g_RN.stride(0),
        g_RN.stride(1), out.stride(0), out.stride(1),
        HAS_IDX=idx_R is not None, PRECISION=_precision(a_RK.dtype), DOT_FP32=INTERPRET, LOOP_WHILE=INTERPRET)
    return out


# --- custom ops: one opaque node each for torch.compile, capturable by CUDA graphs ---

if HAVE_TRITON:

    @torch.library.custom_op("anymoe::grouped_mm_rows", mutates_args=())
    def _grouped_mm_rows_op(a: Tensor, w: Tensor, offs: Tensor, idx: Tensor | None = None,
                            trans_w: bool = False) -> Tensor:
        return grouped_mm_rows(a, w, offs, idx, trans_w)

    @_grouped_mm_rows_op.register_fake
    def _(a, w, offs, idx=None, trans_w=False):
        return a.new_empty(a.shape[0] if idx is None else idx.shape[0], w.shape[1] if trans_w else w.shape[2])

    @torch.library.custom_op("anymoe::grouped_mm_wgrad", mutates_args=())
    def _grouped_mm_wgrad_op(a: Tensor, g: Tensor, offs: Tensor, idx: Tensor | None = None,
                             out_dtype: torch.dtype | None = None) -> Tensor:
        return grouped_mm_wgrad(a, g, offs, idx, out_dtype)

    @_grouped_mm_wgrad_op.register_fake
    def _(a, g, offs, idx=None, out_dtype=None):
        return a.new_empty(offs.shape[0], a.shape[1], g.shape[1], dtype=out_dtype or a.dtype)


def _rows(a: Tensor, w: Tensor, offs: Tensor, idx: Tensor | None, trans_w: bool) -> Tensor:
    """Outside torch.compile the launcher runs directly: the custom-op layer only adds host time."""
    op = torch.ops.anymoe.grouped_mm_rows if torch.compiler.is_compiling() else grouped_mm_rows
    return op(a, w, offs, idx, trans_w)


def _wgrad(a: Tensor, g: Tensor, offs: Tensor, idx: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    op = torch.ops.anymoe.grouped_mm_wgrad if torch.compiler.is_compiling() else grouped_mm_wgrad
    return op(a, g, offs, idx, out_dtype)


class GroupedMMRows(torch.autograd.Function):
    """y = grouped_mm_rows(a, w, offs, idx); dA by the same kernel on W^T, dW by the wgrad kernel.

    With a gather, row r's gradient belongs to a[idx[r]] and a source row may feed several rows
    (top-k routing), so dA is accumulated with ``index_add_`` in fp32 and cast once: a reference
    formulation, not the fast path (on CUDA index_add_ sums in an unspecified order, so the last
    bits of a repeated row's gradient can vary run to run).
    """

    @staticmethod
    def forward(ctx, a_RK: Tensor, w_EKN: Tensor, offs_E: Tensor, idx_R: Tensor | None) -> Tensor:
        ctx.save_for_backward(a_RK, w_EKN, offs_E, idx_R)
        return _rows(a_RK, w_EKN, offs_E, idx_R, False)

    @staticmethod
    def backward(ctx, g_RN: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        a_RK, w_EKN, offs_E, idx_R = ctx.saved_tensors
        da = dw = None
        if ctx.needs_input_grad[0]:
            da = _rows(g_RN, w_EKN, offs_E, None, True)  # rows past offs[-1] get zeros, as in forward
            if idx_R is not None:
                da = a_RK.new_zeros(a_RK.shape, dtype=torch.float32).index_add_(0, idx_R, da.float())
                da = da.to(a_RK.dtype)
        if ctx.needs_input_grad[1]:
            dw = _wgrad(a_RK, g_RN, offs_E, idx_R, w_EKN.dtype)
        return da, dw, None, None


def grouped_mm(a_RK: Tensor, w_EKN: Tensor, offs_E: Tensor, idx_R: Tensor | None = None) -> Tensor:
    """Differentiable ``grouped_mm_rows`` (no trans_w): y[r] = A_row(r) @ w[e], gradients for a and w."""
    return GroupedMMRows.apply(a_RK, w_EKN, offs_E, idx_R)


__all__ = ["HAVE_TRITON", "GroupedMMRows", "grouped_mm", "grouped_mm_rows", "grouped_mm_wgrad"]
