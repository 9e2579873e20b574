"""Triton kernels of the fused language-model cross-entropy on CUDA (see anymoe/core/losses.py).

Two kernels, one program per row, the vocabulary walked in blocks of ``BLOCK_V``:

- ``_ce_fwd_kernel``: an online max / sum-exp over the row in fp32 (Milakov & Gimelshein,
  "Online normalizer calculation for softmax", 2018), then ``loss = lse - x[label]``. Writes
  the row's loss and lse; reads the row once.
- ``_ce_bwd_kernel``: ``dx = g * (exp(x - lse) - onehot(label))`` written in the logits'
  dtype; reads the row once more, writes the gradient once, rounds once.

Ignored rows (label == ignore_index) are masked out of every load: they cost no reads, give
loss 0 and a zero gradient. A label outside [0, V) gives that row a nan loss (the trainers
skip a step with a non-finite loss) instead of a host check or an out-of-bounds read.

Each launcher is wrapped as a ``torch.library.custom_op`` with a fake implementation, so
``torch.compile`` sees one opaque node and CUDA graphs capture it: grids depend on shapes
only, nothing is read back to the host. Importing this module registers the ops for device
type "cuda" when Triton is importable; otherwise the pure-torch chunked ops run.

Legend: N rows (tokens), V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.backends.triton_launch import eager
from anymoe.core.losses import TORCH_OPS, LossOps, register_loss_ops

try:  # Triton ships with CUDA builds of torch; CPU builds and other devices lack it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BLOCK_V = 4096  # 16 bf16 per thread at 8 warps: two 16-byte loads, a handful of registers


if HAVE_TRITON:

    @triton.jit
    def _ce_fwd_kernel(x_ptr, labels_ptr, loss_ptr, lse_ptr, V, stride_x, ignore_index,
                       BLOCK_V: tl.constexpr, N_BLOCKS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        m = float("-inf")  # running max of the row
        s = 0.0  # running sum of exp(x - m)
        for i in range(N_BLOCKS):  # a constexpr bound, as in cuda_kernels (Triton's interpreter)
            cols = i * BLOCK_V + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + cols, mask=(cols < V) & valid, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # While every value so far is -inf (a masked vocabulary block, an ignored row),
            # shift by 0 instead of -inf: exp(-inf - -inf) would be nan, exp(-inf - 0) is 0.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
        lse = m + tl.log(s)
        in_range = (label >= 0) & (label < V)
        target = tl.load(x_row + tl.where(in_range & valid, label, 0)).to(tl.float32)
        loss = tl.where(in_range, lse - target, float("nan"))
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _ce_bwd_kernel(x_ptr, labels_ptr, lse_ptr, g_ptr, dx_ptr, V, stride_x, stride_g, stride_dx,
                       ignore_index, BLOCK_V: tl.constexpr, N_BLOCKS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        dx_row = dx_ptr + row * stride_dx
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row * stride_g).to(tl.float32)
        for i in range(N_BLOCKS):
            cols = i * BLOCK_V + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask & valid, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(cols == label, p - 1.0, p)
            dx = tl.where(valid, p * g, 0.0)  # a where: an ignored row's garbage cannot leak
            tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --- launchers: plain functions on any tensors Triton can address ---


def _config(V: int) -> tuple[int, int, int]:
    """(BLOCK_V, N_BLOCKS, num_warps) for a row of V."""
    block = min(_BLOCK_V, triton.next_power_of_2(max(V, 16)))
    return block, triton.cdiv(V, block), 4 if block <= 1024 else 8


def launch_ce_fwd(logits_NV: Tensor, labels_N: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """-> (loss_N, lse_N), fp32. ``logits_NV`` needs a unit column stride; rows may be strided."""
    N, V = logits_NV.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
    if N and V:
        block, n_blocks, warps = _config(V)
        _ce_fwd_kernel[(N,)](logits_NV, labels_N, loss, lse, V, logits_NV.stride(0), ignore_index,
                             BLOCK_V=block, N_BLOCKS=n_blocks, num_warps=warps)
    return loss, lse


def launch_ce_bwd(logits_NV: Tensor, labels_N: Tensor, lse_N: Tensor, g_N: Tensor,
                  ignore_index: int) -> Tensor:
    """-> dlogits [N, V] (contiguous, the logits' dtype) = g_N[n] * (softmax - onehot)."""
    N, V = logits_NV.shape
    dx = torch.empty(N, V, dtype=logits_NV.dtype, device=logits_NV.device)
    if N and V:
        block, n_blocks, warps = _config(V)
        _ce_bwd_kernel[(N,)](logits_NV, labels_N, lse_N, g_N, dx, V, logits_NV.stride(0), g_N.stride(0),
                             dx.stride(0), ignore_index, BLOCK_V=block, N_BLOCKS=n_blocks, num_warps=warps)
    return dx


# --- custom ops: one opaque node each for torch.compile, capturable by CUDA graphs ---

if HAVE_TRITON:

    @torch.library.custom_op("anymoe::cross_entropy_fwd", mutates_args=(), device_types="cuda")
    def _ce_fwd_op(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
        return launch_ce_fwd(logits, labels, ignore_index)

    @_ce_fwd_op.register_fake
    def _(logits, labels, ignore_index):
        N = logits.shape[0]
        return logits.new_empty(N, dtype=torch.float32), logits.new_empty(N, dtype=torch.float32)

    @torch.library.custom_op("anymoe::cross_entropy_bwd", mutates_args=(), device_types="cuda")
    def _ce_bwd_op(logits: Tensor, labels: Tensor, lse: Tensor, g: Tensor, ignore_index: int) -> Tensor:
        return launch_ce_bwd(logits, labels, lse, g, ignore_index)

    @_ce_bwd_op.register_fake
    def _(logits, labels, lse, g, ignore_index):
        return logits.new_empty(logits.shape)


def _rows_unit_stride(logits_NV: Tensor) -> Tensor:
    """The kernels step rows by stride(0) and columns by 1: copy only a column-strided view."""
    return logits_NV if logits_NV.stride(1) == 1 else logits_NV.contiguous()


class TritonLossOps(LossOps):
    """The fused cross-entropy in Triton; the pure-torch ops for dtypes it does not cover (fp64)."""

    name = "triton"

    def ce_fwd(self, logits_NV: Tensor, labels_N: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
        if logits_NV.dtype not in _KERNEL_DTYPES:
            return TORCH_OPS.ce_fwd(logits_NV, labels_N, ignore_index)
        op = launch_ce_fwd if eager() else torch.ops.anymoe.cross_entropy_fwd
        return op(_rows_unit_stride(logits_NV), labels_N.contiguous(), ignore_index)

    def ce_bwd(self, logits_NV: Tensor, labels_N: Tensor, lse_N: Tensor, g_N: Tensor,
               ignore_index: int) -> Tensor:
        if logits_NV.dtype not in _KERNEL_DTYPES:
            return TORCH_OPS.ce_bwd(logits_NV, labels_N, lse_N, g_N, ignore_index)
        op = launch_ce_bwd if eager() else torch.ops.anymoe.cross_entropy_bwd
        return op(_rows_unit_stride(logits_NV), labels_N.contiguous(), lse_N, g_N.float(), ignore_index)


TRITON_LOSS_OPS = TritonLossOps() if HAVE_TRITON else None
if TRITON_LOSS_OPS is not None:
    register_loss_ops("cuda", TRITON_LOSS_OPS)
