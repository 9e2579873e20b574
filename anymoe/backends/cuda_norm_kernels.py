"""Triton RMSNorm on CUDA (see anymoe/core/norm.py for the formula), and the residual add
fused with it.

- ``_rms_fwd_kernel``: one program per row: read x once (with ``HAS_D`` also d, and store
  s = x + d rounded as torch rounds it), write y and the row's 1/rms (fp32, kept for the
  backward). The normalised value is rounded to x's dtype before the weight, as in the torch
  formula.
- ``_rms_bwd_kernel``: a program per block of rows: dx for each row (with ``HAS_GX`` plus the
  gradient s receives from the residual stream), and the block's partial sum of the weight
  gradient in fp32 (summed over blocks afterwards: no atomics, so the result does not depend
  on scheduling).

``rms_norm`` runs the kernels eagerly only: under ``torch.compile`` it returns the torch
formula, which Inductor fuses with its neighbours. ``add_rms_norm`` (the residual add and the
next norm, see ``MoETransformer``) runs them eagerly and, as custom ops, under torch.compile:
on the H100 step of moe-1b Inductor's fused add + norm backward kernels took 69-87 us per call
where one read and write of each tensor takes ~45. Importing this module registers the ops for
device type "cuda" when Triton is importable.

Legend: N rows, D normalised dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.backends.triton_launch import eager
from anymoe.core.norm import TORCH_NORM_OPS, NormOps, register_norm_ops

try:  # Triton ships with CUDA builds of torch; CPU builds and other devices lack it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_D = 16384  # one row in registers
_MAX_PROGRAMS = 4096  # backward programs (one fp32 partial weight-gradient row each)


if HAVE_TRITON:

    @triton.jit
    def _rms_fwd_kernel(x_ptr, d_ptr, s_ptr, w_ptr, y_ptr, rstd_ptr, D, stride_x, stride_d, stride_s,
                        stride_y, eps, HAS_D: tl.constexpr, BLOCK_D: tl.constexpr):
        # HAS_D: the residual add first, s = round(x + d) (stored), as torch rounds x + d.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_D:
            x += tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
            x = x.to(s_ptr.dtype.element_ty)
            tl.store(s_ptr + row * stride_s + cols, x, mask=mask)
            x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        tl.store(rstd_ptr + row, rstd)
        n = (x * rstd).to(s_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, (w * n).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_bwd_kernel(x_ptr, w_ptr, g_ptr, gx_ptr, rstd_ptr, dx_ptr, dwp_ptr, N, D, stride_x, stride_g,
                        stride_gx, stride_dx, HAS_GX: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        # y = w * n, n = round(x * rstd): dn = round(g * w) (autograd rounds it to n's dtype),
        # dx = rstd * dn - x * rstd^3 * <dn, x> / D (+ gx: x's gradient from its other use, the
        # residual stream, summed here instead of by a separate add), dw = sum over rows of g * n.
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
            if HAS_GX:
                dx += tl.load(gx_ptr + row * stride_gx + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dwp_ptr + pid.to(tl.int64) * D + cols, dw, mask=cmask)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def launch_rms_fwd(x_ND: Tensor, w_D: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y [N, D] in promote(x, w) dtype, rstd [N] fp32) for a contiguous x."""
    _, y, rstd = _launch_fwd(x_ND, None, w_D, eps)
    return y, rstd


def launch_add_rms_fwd(x_ND: Tensor, d_ND: Tensor, w_D: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(s = x + d [N, D] in x's dtype, y = rms_norm(s) in promote(s, w), rstd [N] fp32) for
    contiguous x and d of one dtype."""
    return _launch_fwd(x_ND, d_ND, w_D, eps)


def _launch_fwd(x_ND: Tensor, d_ND: Tensor | None, w_D: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    N, D = x_ND.shape
    s = x_ND if d_ND is None else torch.empty_like(x_ND)
    y = torch.empty(N, D, dtype=torch.promote_types(x_ND.dtype, w_D.dtype), device=x_ND.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x_ND.device)
    if N:
        block = triton.next_power_of_2(D)
        d = x_ND if d_ND is None else d_ND
        _rms_fwd_kernel[(N,)](x_ND, d, s, w_D, y, rstd, D, x_ND.stride(0), d.stride(0), s.stride(0),
                              y.stride(0), eps, HAS_D=d_ND is not None, BLOCK_D=block,
                              num_warps=_warps(block))
    return s, y, rstd


def launch_rms_bwd(x_ND: Tensor, w_D: Tensor, rstd_N: Tensor, g_ND: Tensor,
                   gx_ND: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dx [N, D] in x's dtype, dw [D] in w's dtype) for contiguous x and g; ``gx`` (contiguous):
    a gradient x also receives from elsewhere, added into dx."""
    N, D = x_ND.shape
    dx = torch.empty_like(x_ND)
    # Rows per program: few, so that many programs keep loads in flight (each row's reduction
    # waits for its loads); at most ~4096 programs, whose fp32 partial rows are summed after.
    # (32 rows per program measured 65 us per [16384, 1024] call on the H100, a 4-row 2-D tile
    # 77 us.)
    rows = max(8, triton.cdiv(N, _MAX_PROGRAMS))
    programs = triton.cdiv(N, rows)
    partial = torch.empty(programs, D, dtype=torch.float32, device=x_ND.device)  # N = 0: sums to zeros
    if N:
        block = triton.next_power_of_2(D)
        gx = g_ND if gx_ND is None else gx_ND
        _rms_bwd_kernel[(programs,)](x_ND, w_D, g_ND, gx, rstd_N, dx, partial, N, D, x_ND.stride(0),
                                     g_ND.stride(0), gx.stride(0), dx.stride(0), HAS_GX=gx_ND is not None,
                                     ROWS=rows, BLOCK_D=block, num_warps=_warps(block))
    return dx, partial.sum(0).to(w_D.dtype)


# --- custom ops: one opaque node each for torch.compile, capturable by CUDA graphs ---

if HAVE_TRITON:

    @torch.library.custom_op("anymoe::add_rms_norm_fwd", mutates_args=(), device_types="cuda")
    def _add_rms_fwd_op(x: Tensor, d: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return launch_add_rms_fwd(x, d, weight, eps)

    @_add_rms_fwd_op.register_fake
    def _(x, d, weight, eps):
        y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
        return x.new_empty(x.shape), y, x.new_empty(x.shape[0], dtype=torch.float32)

    @torch.library.custom_op("anymoe::rms_norm_bwd", mutates_args=(), device_types="cuda")
    def _rms_bwd_op(x: Tensor, weight: Tensor, rstd: Tensor, g: Tensor,
                    gx: Tensor | None) -> tuple[Tensor, Tensor]:
        return launch_rms_bwd(x, weight, rstd, g, gx)

    @_rms_bwd_op.register_fake
    def _(x, weight, rstd, g, gx):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)


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


class _AddRMSNorm(torch.autograd.Function):
    """(s, y) = (x + d, rms_norm(x + d)); the backward returns one tensor, s's own gradient plus
    the norm's input gradient, for both x and d. Saves s (not x and d) and the rows' 1/rms."""

    @staticmethod
    def forward(ctx, x, d, weight, eps):
        ctx.set_materialize_grads(False)  # s unused (the last norm): no zero gradient to add
        D = x.shape[-1]
        fwd = launch_add_rms_fwd if eager() else torch.ops.anymoe.add_rms_norm_fwd
        s, y, rstd = fwd(x.reshape(-1, D).contiguous(), d.reshape(-1, D).contiguous(), weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        return s.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, gs, gy):
        s, weight, rstd = ctx.saved_tensors
        if gy is None:
            return gs, gs, None, None
        D = s.shape[-1]
        gx = None if gs is None else gs.reshape(-1, D).contiguous()
        bwd = launch_rms_bwd if eager() else torch.ops.anymoe.rms_norm_bwd
        dx, dw = bwd(s, weight, rstd, gy.reshape(-1, D).contiguous(), gx)
        dx = dx.view(gy.shape)
        return dx, dx, dw, None


class TritonNormOps(NormOps):
    """RMSNorm in two Triton kernels when eager; the torch formula under torch.compile."""

    name = "triton"

    kernel_device_type = "cuda"  # the Triton-interpreter tests set "cpu"

    def kernel_takes(self, x: Tensor, weight: Tensor) -> bool:
        return (x.device.type == self.kernel_device_type and x.dtype in _KERNEL_DTYPES
                and weight.dtype in _KERNEL_DTYPES and weight.dim() == 1 and weight.is_contiguous()
                and x.shape[-1] == weight.shape[0] and x.shape[-1] <= _MAX_D)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        if torch.compiler.is_compiling() or not self.kernel_takes(x, weight):
            return TORCH_NORM_OPS.rms_norm(x, weight, eps)
        return _RMSNorm.apply(x, weight, float(eps))

    def add_rms_norm(self, x: Tensor, d: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """One kernel per direction, eagerly and under torch.compile (custom ops): Inductor's
        fused add + norm backward took 69-87 us per call on the H100 step of moe-1b where
        reading and writing each tensor once takes ~45 (see the module docstring)."""
        if d is None or d.shape != x.shape or d.dtype != x.dtype or not self.kernel_takes(x, weight):
            return super().add_rms_norm(x, d, weight, eps)
        return _AddRMSNorm.apply(x, d, weight, float(eps))


TRITON_NORM_OPS = TritonNormOps() if HAVE_TRITON else None
if TRITON_NORM_OPS is not None:
    register_norm_ops("cuda", TRITON_NORM_OPS)
