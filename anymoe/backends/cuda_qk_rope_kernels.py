"""Triton qk-norm + RoPE on CUDA, one kernel per direction (see anymoe/core/qk_norm_rope.py).

- ``_qk_norm_rope_fwd_kernel``: a program per tile of ROWS (b, s, h) rows, each row one head's
  D values, read as its two halves (RoPE pairs i and i + D/2, so no register shuffle): the
  row's 1/rms, the gain, the rotation, all in fp32, one rounding at the store; y contiguous.
- ``_qk_norm_rope_bwd_kernel``: dy with any strides: the transposed rotation
  (dn = dy * cos + rotate_half^T(dy * sin)), then the RMSNorm backward from the recomputed
  1/rms (nothing but x and the gain is saved), dx contiguous, and the program's partial sum
  of the gain's gradient in fp32 ([programs, D], summed afterwards: no atomics, the result
  does not depend on scheduling).

Row order: a tile walks the rows in the order of the input's memory, (b, s, h) when the heads
of a token are adjacent (the projections' output), (b, h, s) when a head's tokens are (the
gradient cuDNN's attention returns, [B, H, S, D]-contiguous), so each tile reads one run of
memory; the other tensors are read and written a whole row (D * itemsize bytes) at a time.
A tile holds 2048 values (D = 64: 32 rows, two tokens of 16 heads): at 4 warps each thread
loads one 16-byte vector of bf16 per half-row tile, a size chosen so that the backward's ~8
live tiles fit in registers (not yet tuned on a GPU).

Numerics: the torch formula in bf16 / fp16 rounds after each op (the normalised value to x's
dtype, as Hugging Face's norm does, then the gain, each product, the sum); the kernels round
once, at the output. So they are not bitwise the formula, and sit within one rounding of the
exact value (the tests hold them to float64).

Each direction is a ``torch.library.custom_op`` with a fake implementation, so torch.compile
sees one opaque node (Inductor neither splits nor transposes it) and CUDA graphs capture it;
eagerly the launchers run directly. Importing this module registers the ops for device type
"cuda" when Triton is importable.

Legend: B batch, S sequence, H heads, D head dim, N rows (B * S * H).
"""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.backends.triton_launch import eager
from anymoe.core.qk_norm_rope import (
    TORCH_QK_NORM_ROPE_OPS,
    QKNormRopeOps,
    qkv_heads,
    register_qk_norm_rope_ops,
)

try:  # Triton ships with CUDA builds of torch; CPU builds and other devices lack it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 256  # a tile of whole rows in registers
_MAX_ROWS = 2**30  # row indices are int32 in the kernels (offsets are int64)
_TILE = 2048  # values per tile: ROWS = _TILE // D
_MAX_PARTIALS = 1024  # the backward's programs stay near this many while they can: a small dw sum


if HAVE_TRITON:

    @triton.jit
    def _row_coords(tile, N, S, H, ROWS: tl.constexpr, HEAD_MAJOR: tl.constexpr):
        # Tile ``tile``'s rows r as (b, s, h): r = (b * S + s) * H + h, or (b * H + h) * S + s when
        # HEAD_MAJOR (the [B, H, S, D] memory order).
        r = tile * ROWS + tl.arange(0, ROWS)
        if HEAD_MAJOR:
            s = r % S
            h = (r // S) % H
            b = r // (S * H)
        else:
            h = r % H
            s = (r // H) % S
            b = r // (S * H)
        return b.to(tl.int64), s.to(tl.int64), h.to(tl.int64), r < N

    @triton.jit
    def _row_rstd(x1, x2, eps, HALF: tl.constexpr):
        # Each row's 1/rms from its two halves: the forward's, and the backward's recomputation.
        return 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)

    @triton.jit
    def _cos_sin_halves(cos_ptr, sin_ptr, b, s, cols, mask, scb, scs, scd, ssb, sss, ssd, HALF: tl.constexpr):
        # The rows' cos and sin, each as its two halves (fp32), for the tile's (b, s).
        c_at = cos_ptr + (b * scb + s * scs)[:, None] + cols[None, :] * scd
        s_at = sin_ptr + (b * ssb + s * sss)[:, None] + cols[None, :] * ssd
        c1 = tl.load(c_at, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(c_at + HALF * scd, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(s_at, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(s_at + HALF * ssd, mask=mask, other=0.0).to(tl.float32)
        return c1, c2, s1, s2

    @triton.jit
    def _qk_norm_rope_fwd_kernel(
        x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, N, S, H,
        sxb, sxs, sxh, scb, scs, scd, ssb, sss, ssd, eps,
        HALF: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_W: tl.constexpr,
        HEAD_MAJOR: tl.constexpr, ROTATE: tl.constexpr = True,
    ):
        # ROTATE False (and no gain): a copy, with the same strided walk (attention's v heads)
        b, s, h, rmask = _row_coords(tl.program_id(0), N, S, H, ROWS, HEAD_MAJOR)
        cols = tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < HALF)[None, :]
        x_at = x_ptr + (b * sxb + s * sxs + h * sxh)[:, None] + cols[None, :]
        x1 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_at + HALF, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            rstd = _row_rstd(x1, x2, eps, HALF)
            w1 = tl.load(w_ptr + cols, mask=cols < HALF, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
            n1 = x1 * rstd[:, None] * w1[None, :]
            n2 = x2 * rstd[:, None] * w2[None, :]
        else:
            n1, n2 = x1, x2
        if ROTATE:  # y = n * cos + rotate_half(n) * sin, rotate_half(n) = (-n2, n1)
            c1, c2, s1, s2 = _cos_sin_halves(cos_ptr, sin_ptr, b, s, cols, mask, scb, scs, scd, ssb, sss, ssd,
                                             HALF)
            n1, n2 = n1 * c1 - n2 * s1, n2 * c2 + n1 * s2
        y_at = y_ptr + (((b * S + s) * H + h) * (2 * HALF))[:, None] + cols[None, :]
        tl.store(y_at, n1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_at + HALF, n2.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_bwd_kernel(
        x_ptr, w_ptr, cos_ptr, sin_ptr, dy_ptr, dx_ptr, dwp_ptr, N, S, H,
        sxb, sxs, sxh, scb, scs, scd, ssb, sss, ssd, sgb, sgs, sgh, sgd, sdb, sds, sdh, eps,
        HALF: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, ITERS: tl.constexpr,
        HAS_W: tl.constexpr, HEAD_MAJOR: tl.constexpr, ROTATE: tl.constexpr = True,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        cmask = cols < HALF
        if HAS_W:
            w1 = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + cols, mask=cmask, other=0.0).to(tl.float32)
        dw1 = tl.zeros([BLOCK], dtype=tl.float32)
        dw2 = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ITERS):
            b, s, h, rmask = _row_coords(pid * ITERS + i, N, S, H, ROWS, HEAD_MAJOR)
            mask = rmask[:, None] & cmask[None, :]
            g_at = dy_ptr + (b * sgb + s * sgs + h * sgh)[:, None] + cols[None, :] * sgd
            g1 = tl.load(g_at, mask=mask, other=0.0).to(tl.float32)
            g2 = tl.load(g_at + HALF * sgd, mask=mask, other=0.0).to(tl.float32)
            if ROTATE:  # dn = dy * cos + rotate_half^T(dy * sin), rotate_half^T(z) = (z2, -z1)
                c1, c2, s1, s2 = _cos_sin_halves(cos_ptr, sin_ptr, b, s, cols, mask, scb, scs, scd, ssb,
                                                 sss, ssd, HALF)
                dn1 = g1 * c1 + g2 * s2
                dn2 = g2 * c2 - g1 * s1
            else:
                dn1, dn2 = g1, g2
            if HAS_W:
                # n = w * xhat, xhat = x * rstd: dxhat = w * dn,
                # dx = rstd * (dxhat - xhat * mean(dxhat * xhat)), dw = sum over rows of dn * xhat
                x_at = x_ptr + (b * sxb + s * sxs + h * sxh)[:, None] + cols[None, :]
                x1 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
                x2 = tl.load(x_at + HALF, mask=mask, other=0.0).to(tl.float32)
                rstd = _row_rstd(x1, x2, eps, HALF)
                xh1 = x1 * rstd[:, None]
                xh2 = x2 * rstd[:, None]
                dw1 += tl.sum(dn1 * xh1, axis=0)
                dw2 += tl.sum(dn2 * xh2, axis=0)
                d1 = dn1 * w1[None, :]
                d2 = dn2 * w2[None, :]
                mean = (tl.sum(d1 * xh1, axis=1) + tl.sum(d2 * xh2, axis=1)) / (2 * HALF)
                dn1 = rstd[:, None] * (d1 - xh1 * mean[:, None])
                dn2 = rstd[:, None] * (d2 - xh2 * mean[:, None])
            dx_at = dx_ptr + (b * sdb + s * sds + h * sdh)[:, None] + cols[None, :]
            tl.store(dx_at, dn1.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dx_at + HALF, dn2.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_W:
            dw_at = dwp_ptr + pid.to(tl.int64) * (2 * HALF) + cols
            tl.store(dw_at, dw1, mask=cmask)
            tl.store(dw_at + HALF, dw2, mask=cmask)


# --- launchers: plain functions on any tensors Triton can address (also its CPU interpreter) ---


def _head_major(t_BSHD: Tensor) -> bool:
    """Whether a head's tokens lie closer together in memory than a token's heads."""
    return t_BSHD.shape[1] > 1 and t_BSHD.shape[2] > 1 and t_BSHD.stride(2) > t_BSHD.stride(1)


def _tiling(D: int) -> tuple[int, int]:
    block = max(2, triton.next_power_of_2(D // 2))  # D = 2: no tl.arange of one element
    return block, max(1, _TILE // (2 * block))


def _rope_tables(x_BSHD: Tensor, cos_BSD: Tensor, sin_BSD: Tensor) -> tuple[Tensor, Tensor]:
    B, S, _, D = x_BSHD.shape
    return cos_BSD.expand(B, S, D), sin_BSD.expand(B, S, D)  # broadcast B (or S) as stride 0


def launch_qk_norm_rope_fwd(x_BSHD: Tensor, w_D: Tensor | None, cos_BSD: Tensor, sin_BSD: Tensor,
                            eps: float, rotate: bool = True) -> Tensor:
    """y [B, S, H, D], contiguous, in promote(x, w, cos, sin); x's last stride 1, D even.
    ``rotate=False`` without w: a copy of x (the tables only set the dtype)."""
    B, S, H, D = x_BSHD.shape
    cos_BSD, sin_BSD = _rope_tables(x_BSHD, cos_BSD, sin_BSD)
    dtype = torch.promote_types(x_BSHD.dtype, torch.promote_types(cos_BSD.dtype, sin_BSD.dtype))
    if w_D is not None:
        dtype = torch.promote_types(dtype, w_D.dtype)
    y = torch.empty(B, S, H, D, dtype=dtype, device=x_BSHD.device)
    N = B * S * H
    if N and D:
        block, rows = _tiling(D)
        _qk_norm_rope_fwd_kernel[(triton.cdiv(N, rows),)](
            x_BSHD, x_BSHD if w_D is None else w_D, cos_BSD, sin_BSD, y, N, S, H,
            x_BSHD.stride(0), x_BSHD.stride(1), x_BSHD.stride(2), *cos_BSD.stride(), *sin_BSD.stride(),
            eps, HALF=D // 2, BLOCK=block, ROWS=rows, HAS_W=w_D is not None,
            HEAD_MAJOR=_head_major(x_BSHD), ROTATE=rotate, num_warps=4,
        )
    return y


def launch_qk_norm_rope_bwd(dy_BSHD: Tensor, x_BSHD: Tensor, w_D: Tensor | None, cos_BSD: Tensor,
                            sin_BSD: Tensor, eps: float, out: Tensor | None = None,
                            rotate: bool = True) -> tuple[Tensor, Tensor]:
    """(dx [B, S, H, D] in x's dtype, dw [D] in w's dtype; an empty dw without w). dx is ``out``
    when given (any strides with a last stride of 1: a slice of a larger gradient), else new
    and contiguous. ``rotate=False`` without w: dy copied into dx."""
    B, S, H, D = x_BSHD.shape
    cos_BSD, sin_BSD = _rope_tables(x_BSHD, cos_BSD, sin_BSD)
    dx = torch.empty(B, S, H, D, dtype=x_BSHD.dtype, device=x_BSHD.device) if out is None else out
    N = B * S * H
    block, rows = _tiling(D) if D else (1, 1)
    tiles = triton.cdiv(N, rows)
    iters = 1 if w_D is None else min(8, triton.next_power_of_2(max(1, triton.cdiv(tiles, _MAX_PARTIALS))))
    programs = triton.cdiv(tiles, iters)
    partial = torch.empty(programs if w_D is not None else 0, D, dtype=torch.float32, device=x_BSHD.device)
    if N and D:
        _qk_norm_rope_bwd_kernel[(programs,)](
            x_BSHD, x_BSHD if w_D is None else w_D, cos_BSD, sin_BSD, dy_BSHD, dx, partial, N, S, H,
            x_BSHD.stride(0), x_BSHD.stride(1), x_BSHD.stride(2), *cos_BSD.stride(), *sin_BSD.stride(),
            *dy_BSHD.stride(), *dx.stride()[:3], eps, HALF=D // 2, BLOCK=block, ROWS=rows, ITERS=iters,
            HAS_W=w_D is not None, HEAD_MAJOR=_head_major(dy_BSHD), ROTATE=rotate, num_warps=4,
        )
    if w_D is None:
        return dx, x_BSHD.new_empty(0)
    return dx, partial.sum(0).to(w_D.dtype)  # no rows: zeros


def launch_qkv_norm_rope_fwd(qkv_BSHD: Tensor, q_w: Tensor | None, k_w: Tensor | None, cos_BSD: Tensor,
                             sin_BSD: Tensor, eps: float, n_q: int,
                             n_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v), each new and contiguous: q and k through the forward kernel, v copied (so
    that the backward writes the projection's whole gradient itself, see the bwd)."""
    x_q, x_k, x_v = qkv_heads(qkv_BSHD, n_q, n_k)
    q = launch_qk_norm_rope_fwd(x_q, q_w, cos_BSD, sin_BSD, eps)
    k = launch_qk_norm_rope_fwd(x_k, k_w, cos_BSD, sin_BSD, eps)
    # v: the same kernel as a copy (torch's generic strided copy took ~3x as long on the H100)
    v = launch_qk_norm_rope_fwd(x_v, None, x_v[:, :, 0], x_v[:, :, 0], eps, rotate=False)
    return q, k, v


def launch_qkv_norm_rope_bwd(dq: Tensor, dk: Tensor, dv: Tensor, qkv_BSHD: Tensor, q_w: Tensor | None,
                             k_w: Tensor | None, cos_BSD: Tensor, sin_BSD: Tensor, eps: float, n_q: int,
                             n_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(d qkv [B, S, n_q + 2 n_k, D] contiguous, dq_w, dk_w): the two backward kernels write
    their heads' slices of the projection's gradient and dv is copied into the rest, so no
    concatenation (with attention's [B, H, S, D]-strided dv transposed on the way) follows."""
    dqkv = torch.empty(qkv_BSHD.shape, dtype=qkv_BSHD.dtype, device=qkv_BSHD.device)
    x_q, x_k, _ = qkv_heads(qkv_BSHD, n_q, n_k)
    d_q, d_k, d_v = qkv_heads(dqkv, n_q, n_k)
    _, dq_w = launch_qk_norm_rope_bwd(dq, x_q, q_w, cos_BSD, sin_BSD, eps, out=d_q)
    _, dk_w = launch_qk_norm_rope_bwd(dk, x_k, k_w, cos_BSD, sin_BSD, eps, out=d_k)
    launch_qk_norm_rope_bwd(dv, d_v, None, cos_BSD, sin_BSD, eps, out=d_v, rotate=False)  # a copy
    return dqkv, dq_w, dk_w


# --- custom ops: one opaque node each for torch.compile, capturable by CUDA graphs ---

if HAVE_TRITON:

    @torch.library.custom_op("anymoe::qk_norm_rope_fwd", mutates_args=(), device_types="cuda")
    def _qk_norm_rope_fwd_op(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor,
                             eps: float) -> Tensor:
        return launch_qk_norm_rope_fwd(x, weight, cos, sin, eps)

    @_qk_norm_rope_fwd_op.register_fake
    def _(x, weight, cos, sin, eps):
        dtype = torch.promote_types(x.dtype, torch.promote_types(cos.dtype, sin.dtype))
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
        return x.new_empty(x.shape, dtype=dtype)

    @torch.library.custom_op("anymoe::qk_norm_rope_bwd", mutates_args=(), device_types="cuda")
    def _qk_norm_rope_bwd_op(dy: Tensor, x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor,
                             eps: float) -> tuple[Tensor, Tensor]:
        return launch_qk_norm_rope_bwd(dy, x, weight, cos, sin, eps)

    @_qk_norm_rope_bwd_op.register_fake
    def _(dy, x, weight, cos, sin, eps):
        dw = x.new_empty(0) if weight is None else weight.new_empty(weight.shape)
        return x.new_empty(x.shape), dw

    @torch.library.custom_op("anymoe::qkv_norm_rope_fwd", mutates_args=(), device_types="cuda")
    def _qkv_norm_rope_fwd_op(qkv: Tensor, q_w: Tensor | None, k_w: Tensor | None, cos: Tensor, sin: Tensor,
                              eps: float, n_q: int, n_k: int) -> tuple[Tensor, Tensor, Tensor]:
        return launch_qkv_norm_rope_fwd(qkv, q_w, k_w, cos, sin, eps, n_q, n_k)

    @_qkv_norm_rope_fwd_op.register_fake
    def _(qkv, q_w, k_w, cos, sin, eps, n_q, n_k):
        x_q, x_k, x_v = qkv_heads(qkv, n_q, n_k)
        return (_qk_norm_rope_fwd_op(x_q, q_w, cos, sin, eps), _qk_norm_rope_fwd_op(x_k, k_w, cos, sin, eps),
                x_v.new_empty(x_v.shape))

    @torch.library.custom_op("anymoe::qkv_norm_rope_bwd", mutates_args=(), device_types="cuda")
    def _qkv_norm_rope_bwd_op(dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, q_w: Tensor | None,
                              k_w: Tensor | None, cos: Tensor, sin: Tensor, eps: float, n_q: int,
                              n_k: int) -> tuple[Tensor, Tensor, Tensor]:
        return launch_qkv_norm_rope_bwd(dq, dk, dv, qkv, q_w, k_w, cos, sin, eps, n_q, n_k)

    @_qkv_norm_rope_bwd_op.register_fake
    def _(dq, dk, dv, qkv, q_w, k_w, cos, sin, eps, n_q, n_k):
        dw = [qkv.new_empty(0) if w is None else w.new_empty(w.shape) for w in (q_w, k_w)]
        return qkv.new_empty(qkv.shape), dw[0], dw[1]


class _QKNormRope(torch.autograd.Function):
    """Saves x as given (a view of the qkv projection: no copy) and the gain; the backward
    recomputes each row's 1/rms."""

    @staticmethod
    def forward(ctx, x_BSHD, weight_D, cos_BSD, sin_BSD, eps):
        fwd = launch_qk_norm_rope_fwd if eager() else torch.ops.anymoe.qk_norm_rope_fwd
        ctx.save_for_backward(x_BSHD, weight_D, cos_BSD, sin_BSD)
        ctx.eps = eps
        return fwd(x_BSHD, weight_D, cos_BSD, sin_BSD, eps)

    @staticmethod
    def backward(ctx, dy_BSHD):
        x_BSHD, weight_D, cos_BSD, sin_BSD = ctx.saved_tensors
        bwd = launch_qk_norm_rope_bwd if eager() else torch.ops.anymoe.qk_norm_rope_bwd
        dx, dw = bwd(dy_BSHD, x_BSHD, weight_D, cos_BSD, sin_BSD, ctx.eps)
        return dx, None if weight_D is None else dw, None, None, None


class _QKVNormRope(torch.autograd.Function):
    """q, k (normed, rotated) and v from the heads of one fused projection; the backward returns
    the projection's gradient whole (see launch_qkv_norm_rope_bwd)."""

    @staticmethod
    def forward(ctx, qkv_BSHD, q_w, k_w, cos_BSD, sin_BSD, eps, n_q, n_k):
        fwd = launch_qkv_norm_rope_fwd if eager() else torch.ops.anymoe.qkv_norm_rope_fwd
        ctx.save_for_backward(qkv_BSHD, q_w, k_w, cos_BSD, sin_BSD)
        ctx.args = (eps, n_q, n_k)
        return fwd(qkv_BSHD, q_w, k_w, cos_BSD, sin_BSD, eps, n_q, n_k)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        qkv_BSHD, q_w, k_w, cos_BSD, sin_BSD = ctx.saved_tensors
        bwd = launch_qkv_norm_rope_bwd if eager() else torch.ops.anymoe.qkv_norm_rope_bwd
        dqkv, dq_w, dk_w = bwd(dq, dk, dv, qkv_BSHD, q_w, k_w, cos_BSD, sin_BSD, *ctx.args)
        dq_w, dk_w = (None if w is None else dw for w, dw in ((q_w, dq_w), (k_w, dk_w)))
        return dqkv, dq_w, dk_w, None, None, None, None, None


class TritonQKNormRopeOps(QKNormRopeOps):
    """qk-norm + RoPE in one Triton kernel per direction, eagerly and under torch.compile; the
    torch formula for what the kernels do not cover."""

    name = "triton"
    kernel_device_type = "cuda"  # the Triton-interpreter tests set "cpu"

    def kernel_takes(self, x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor) -> bool:
        if x.dim() != 4 or x.device.type != self.kernel_device_type or x.dtype not in _KERNEL_DTYPES:
            return False
        D = x.shape[-1]
        x_ok = D % 2 == 0 and 0 < D <= MAX_HEAD_DIM and x.stride(-1) == 1 and x.numel() // D < _MAX_ROWS
        w_ok = weight is None or (weight.dim() == 1 and weight.shape[0] == D and weight.is_contiguous()
                                  and weight.dtype in _KERNEL_DTYPES)
        tables_ok = all(t.dim() == 3 and t.shape[-1] == D and t.dtype in _KERNEL_DTYPES
                        and not t.requires_grad for t in (cos, sin))  # the kernels give them no gradient
        return x_ok and w_ok and tables_ok

    def qk_norm_rope(self, x_BSHD: Tensor, weight_D: Tensor | None, eps: float, cos_BSD: Tensor,
                     sin_BSD: Tensor) -> Tensor:
        if not self.kernel_takes(x_BSHD, weight_D, cos_BSD, sin_BSD):
            return TORCH_QK_NORM_ROPE_OPS.qk_norm_rope(x_BSHD, weight_D, eps, cos_BSD, sin_BSD)
        return _QKNormRope.apply(x_BSHD, weight_D, cos_BSD, sin_BSD, float(eps))

    def qkv_norm_rope(self, qkv_BSHD: Tensor, n_q: int, n_k: int, q_weight: Tensor | None,
                      k_weight: Tensor | None, eps: float, cos_BSD: Tensor,
                      sin_BSD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_q, x_k, _ = qkv_heads(qkv_BSHD, n_q, n_k)
        if not (self.kernel_takes(x_q, q_weight, cos_BSD, sin_BSD)
                and self.kernel_takes(x_k, k_weight, cos_BSD, sin_BSD)):
            return super().qkv_norm_rope(qkv_BSHD, n_q, n_k, q_weight, k_weight, eps, cos_BSD, sin_BSD)
        return _QKVNormRope.apply(qkv_BSHD, q_weight, k_weight, cos_BSD, sin_BSD, float(eps), n_q, n_k)


TRITON_QK_NORM_ROPE_OPS = TritonQKNormRopeOps() if HAVE_TRITON else None
if TRITON_QK_NORM_ROPE_OPS is not None:
    register_qk_norm_rope_ops("cuda", TRITON_QK_NORM_ROPE_OPS)
