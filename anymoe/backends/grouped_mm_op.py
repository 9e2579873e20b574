"""The per-expert grouped matmul loop as one opaque node for torch.compile (compiled blocks).

The loop (``anymoe.core.grouped_mm.grouped_mm_loop``) splits the rows by the expert counts,
which it reads on the host. torch.compile cannot trace a data-dependent host read, so every
call breaks the graph: 10 graph breaks and 11 graphs for the two blocks of the tiny preset
(3 grouped matmuls per MoE layer, forward). Wrapped as ``torch.library`` custom ops with a
shape rule and an autograd formula, the loop is one node of the block's graph, the host read
happens inside it at run time, and one compiled graph serves every block.

    y_e  = x_e @ w_e           anymoe::grouped_mm_loop
    dx_e = dy_e @ w_e^T        the same op on w transposed
    dw_e = x_e^T @ dy_e        anymoe::grouped_mm_loop_wgrad

A backend whose grouped matmul reads the host only in the loop fallback (the CPU: fp32 always
takes the loop under torch.compile, ``torch._grouped_mm``'s shape rule being bf16-only) hands
this to compiled blocks. It cannot go into a CUDA graph (the host read would stall capture),
so CUDA uses its own traceable kernel instead.

Legend: T rows sorted by expert, D input dim, F output dim, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.core.grouped_mm import check_grouped_mm_args, grouped_mm_loop, match_operand_dtypes


@torch.library.custom_op("anymoe::grouped_mm_loop", mutates_args=())
def grouped_mm_loop_op(x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
    """``grouped_mm_loop`` as a custom op (a fresh output: custom ops may not alias inputs)."""
    return grouped_mm_loop(x_TD, w_EDF, counts_E)


@grouped_mm_loop_op.register_fake
def _(x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
    return x_TD.new_empty(x_TD.shape[0], w_EDF.shape[2])


@torch.library.custom_op("anymoe::grouped_mm_loop_wgrad", mutates_args=())
def grouped_mm_loop_wgrad(x_TD: Tensor, dy_TF: Tensor, counts_E: Tensor) -> Tensor:
    """dw [E, D, F]: each expert's rows x_e^T @ dy_e (an expert with no rows gets zeros)."""
    sizes = counts_E.tolist()
    pairs = zip(x_TD.split(sizes, dim=0), dy_TF.split(sizes, dim=0))
    parts = [x_e.t() @ dy_e for x_e, dy_e in pairs]
    if not parts:
        return x_TD.new_zeros(0, x_TD.shape[1], dy_TF.shape[1])
    return torch.stack(parts)


@grouped_mm_loop_wgrad.register_fake
def _(x_TD: Tensor, dy_TF: Tensor, counts_E: Tensor) -> Tensor:
    return x_TD.new_empty(counts_E.shape[0], x_TD.shape[1], dy_TF.shape[1])


def _setup(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy_TF: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x_TD, w_EDF, counts_E = ctx.saved_tensors
    dx = grouped_mm_loop_op(dy_TF, w_EDF.transpose(1, 2), counts_E) if ctx.needs_input_grad[0] else None
    dw = grouped_mm_loop_wgrad(x_TD, dy_TF, counts_E) if ctx.needs_input_grad[1] else None
    return dx, dw, None


grouped_mm_loop_op.register_autograd(_backward, setup_context=_setup)


def grouped_mm_opaque(x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
    """Operands in one dtype (as under autocast), then the loop as one graph node."""
    check_grouped_mm_args(x_TD, w_EDF, counts_E)
    x_TD, w_EDF = match_operand_dtypes(x_TD, w_EDF)
    return grouped_mm_loop_op(x_TD, w_EDF, counts_E)


__all__ = ["grouped_mm_loop_op", "grouped_mm_loop_wgrad", "grouped_mm_opaque"]
