"""Triton RMSNorm for eager mode on CUDA (see anymoe/core/norm.py for the formula).

- ``_rms_fwd_kernel``: one program per row: read x once, write y and the row's 1/rms (fp32,
  kept for the backward). The normalised value is rounded to x's dtype before the weight,
  as in the torch formula.
- ``_rms_bwd_kernel``: a program per block of rows: dx for each row, and the block's partial
  sum of the weight gradient in fp32 (summed over blocks afterwards: no atomics, so the
  result does not depend on scheduling).

Eager only: under ``torch.compile`` the ops return the torch formula, which Inductor fuses
with the neighbouring residual add (an opaque kernel would cut that fusion). Importing this
module registers the ops for device type "cuda" when Triton is importable.

Legend: N rows, D normalised dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.core.norm import TORCH_NORM_OPS, NormOps, register_norm_ops

try:  # Triton ships with CUDA builds of torch; CPU builds and other devices lack it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_D = 16384  # one row in registers


if HAVE_TRITON:

    @triton.jit
    def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, D, stride_x, stride_y, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        tl.store(rstd_ptr + row, rstd)
        n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, (w * n).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_bwd_kernel(x_ptr, w_ptr, g_ptr, rstd_ptr, dx_ptr, dwp_ptr, N, D, stride_x, stride_g, stride_dx,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        # y = w * n, n = round(x * rstd): dn = round(g * w) (autograd rounds it to n's dtype),
        # dx = rstd * dn - x * rstd^3 * <dn, x> / D, dw = sum over rows of g * n.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(ROWS):
            row = pid.to(tl.int64) * ROWS + i
            mask = cmask & (row < N)
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=row < N, other=0.0)
            n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
            dw += g * n
            dn = (g * w).to(g_ptr.dtype.element_ty).to(x_ptr.dtype.element_ty).to(tl.float32)
            dot = tl.sum(dn * x, axis=0)
            dx = rstd * dn - x * (rstd * rstd * rstd) * (dot / D)
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dwp_ptr + pid.to(tl.int64) * D + cols, dw, mask=cmask)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def launch_rms_fwd(x_ND: Tensor, w_D: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y [N, D] in promote(x, w) dtype, rstd [N] fp32) for a contiguous x."""
    N, D = x_ND.shape
    y = torch.empty(N, D, dtype=torch.promote_types(x_ND.dtype, w_D.dtype), device=x_ND.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x_ND.device)
    if N:
        block = triton.next_power_of_2(D)
        _rms_fwd_kernel[(N,)](x_ND, w_D, y, rstd, D, x_ND.stride(0), y.stride(0), eps,
                              BLOCK_D=block, num_warps=_warps(block))
    return y, rstd


def launch_rms_bwd(x_ND: Tensor, w_D: Tensor, rstd_N: Tensor, g_ND: Tensor) -> tuple[Tensor, Tensor]:
    """(dx [N, D] in x's dtype, dw [D] in w's dtype) for contiguous x and g."""
    N, D = x_ND.shape
    dx = torch.empty_like(x_ND)
    rows = 32 if N >= 16384 else 8
    programs = triton.cdiv(N, rows)
    partial = torch.empty(programs, D, dtype=torch.float32, device=x_ND.device)  # N = 0: sums to zeros
    if N:
        block = triton.next_power_of_2(D)
        _rms_bwd_kernel[(programs,)](x_ND, w_D, g_ND, rstd_N, dx, partial, N, D, x_ND.stride(0),
                                     g_ND.stride(0), dx.stride(0), ROWS=rows, BLOCK_D=block,
                                     num_warps=_warps(block))
    return dx, partial.sum(0).to(w_D.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x_ND = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = launch_rms_fwd(x_ND, weight, eps)
        ctx.save_for_backward(x_ND, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, g):
        x_ND, weight, rstd = ctx.saved_tensors
        dx, dw = launch_rms_bwd(x_ND, weight, rstd, g.reshape(x_ND.shape).contiguous())
        return dx.view(ctx.shape), dw, None


class TritonNormOps(NormOps):
    """RMSNorm in two Triton kernels when eager; the torch formula under torch.compile."""

    name = "triton"

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        kernel_ok = (x.dtype in _KERNEL_DTYPES and weight.dtype in _KERNEL_DTYPES and weight.dim() == 1
                     and weight.is_contiguous() and x.shape[-1] == weight.shape[0] and x.shape[-1] <= _MAX_D)
        if torch.compiler.is_compiling() or not kernel_ok:
            return TORCH_NORM_OPS.rms_norm(x, weight, eps)
        return _RMSNorm.apply(x, weight, float(eps))


TRITON_NORM_OPS = TritonNormOps() if HAVE_TRITON else None
if TRITON_NORM_OPS is not None:
    register_norm_ops("cuda", TRITON_NORM_OPS)
