"""Grouped expert matmul: rows sorted by expert times a per-expert weight.

Every backend exposes ``grouped_mm(x_TD, w_EDF, counts_E) -> y_TF``: the first counts[0]
rows of x go through w[0], the next counts[1] through w[1], and so on. Experts with no
rows are allowed. This module holds the portable implementations; a backend picks the
fastest correct one for its device (or brings its own kernel).

Legend: T rows (tokens x top-k), D input dim, F output dim, E experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

GroupedMM = Callable[[Tensor, Tensor, Tensor], Tensor]


def check_grouped_mm_args(x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> None:
    assert x_TD.dim() == 2 and w_EDF.dim() == 3, (x_TD.shape, w_EDF.shape)
    assert x_TD.shape[1] == w_EDF.shape[1], (x_TD.shape, w_EDF.shape)
    assert counts_E.dim() == 1 and counts_E.numel() == w_EDF.shape[0], (counts_E.shape, w_EDF.shape)


def grouped_mm_loop(x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
    """One matmul per expert. The reference, and the fastest path measured on the CPU.

    It reads counts on the host, so GPU backends use a kernel instead.
    """
    check_grouped_mm_args(x_TD, w_EDF, counts_E)
    chunks = x_TD.split(counts_E.tolist(), dim=0)
    out = [chunk @ w_EDF[e] for e, chunk in enumerate(chunks)]
    if not out:
        return x_TD.new_zeros(0, w_EDF.shape[2])
    return torch.cat(out, dim=0)


def grouped_mm_padded(x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor, capacity: int | None = None) -> Tensor:
    """Scatter rows into an [E, C, D] buffer, one batched matmul, gather back.

    No host synchronisation when ``capacity`` is given (C must be >= max(counts)); wasteful
    when loads are skewed, but it runs on every device torch supports.
    """
    check_grouped_mm_args(x_TD, w_EDF, counts_E)
    E, D, F = w_EDF.shape
    T = x_TD.shape[0]
    C = int(counts_E.max().item()) if capacity is None else capacity
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    expert_T = torch.repeat_interleave(torch.arange(E, device=x_TD.device), counts_E, output_size=T)
    slot_T = torch.arange(T, device=x_TD.device) - starts_E[expert_T]
    flat_T = expert_T * C + slot_T
    buf = x_TD.new_zeros(E * C, D).index_copy(0, flat_T, x_TD)
    y_ECF = torch.bmm(buf.view(E, C, D), w_EDF)
    return y_ECF.reshape(E * C, F).index_select(0, flat_T)


def offsets_from_counts(counts_E: Tensor) -> Tensor:
    """End offset of every group as int32, computed on the counts' device (no host sync)."""
    return torch.cumsum(counts_E, 0, dtype=torch.int32)


def has_torch_grouped_mm() -> bool:
    """Whether this torch has the grouped GEMM op (``torch._grouped_mm``, torch >= 2.8)."""
    return hasattr(torch, "_grouped_mm")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    ``torch._grouped_mm``'s own backward rejects an expanded incoming gradient (``y.sum()``
    gives one with stride 0: "Invalid strides/sizes"), so the output passes through here.
    """

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _pad_last(t: Tensor, size: int) -> Tensor:
    return t if t.shape[-1] == size else torch.nn.functional.pad(t, (0, size - t.shape[-1]))


def aligned_size(n: int, dtype: torch.dtype, align_bytes: int) -> int:
    """Smallest m >= n with m * itemsize a multiple of ``align_bytes`` (grouped GEMM stride rule)."""
    per = max(1, align_bytes // torch.empty((), dtype=dtype).element_size())
    return -(-n // per) * per


def _aligned(t: Tensor, align_bytes: int) -> Tensor:
    """Contiguous, starting on an aligned address (a fresh copy is; a rare offset view may not be)."""
    if torch.compiler.is_compiling():  # fake tensors have no data pointer; graphs allocate fresh
        return t.contiguous()
    aligned = t.data_ptr() % align_bytes == 0
    return t.contiguous() if aligned else t.clone(memory_format=torch.contiguous_format)


def grouped_mm_torch(x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor, align_bytes: int = 16) -> Tensor:
    """``torch._grouped_mm`` with int32 offsets from a device-side cumsum: no host sync.

    The GEMM kernels need every stride to be a multiple of 16 bytes, so D and F are padded
    with zeros up to the next aligned size when they are not (zero columns of x times zero
    rows of w add nothing; padded output columns are sliced off). Autograd runs through
    torch's own derivative of the op, the pads and the slice.
    """
    check_grouped_mm_args(x_TD, w_EDF, counts_E)
    E, D, F = w_EDF.shape
    Dp, Fp = aligned_size(D, x_TD.dtype, align_bytes), aligned_size(F, x_TD.dtype, align_bytes)
    if Dp != D:
        x_TD = _pad_last(x_TD, Dp)
        w_EDF = torch.nn.functional.pad(w_EDF, (0, 0, 0, Dp - D))
    w_EDF = _pad_last(w_EDF, Fp)
    x_TD, w_EDF = _aligned(x_TD, align_bytes), _aligned(w_EDF, align_bytes)
    y_TF = torch._grouped_mm(x_TD, w_EDF, offs=offsets_from_counts(counts_E))
    y_TF = _ContiguousGrad.apply(y_TF)
    return y_TF if Fp == F else y_TF[:, :F]


_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def torch_grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs and is right for ``dtype`` on ``device`` (probed once).

    Which dtypes and devices the op supports moved between torch releases (bf16 only on
    early versions, fp32 later, a CPU kernel later still), so a backend asks the op itself:
    a tiny forward + backward with an empty group, compared with the loop. The answer is
    cached per (device, dtype); the probe reads one value back to the host, once.
    """
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False  # the op's fake-tensor rule accepts bf16 only (torch 2.13), eager may take more
    key = (str(device), dtype)
    if key not in _PROBED:
        _PROBED[key] = has_torch_grouped_mm() and _probe(device, dtype)
    return _PROBED[key]


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=gen).to(device, dtype).requires_grad_()
    w = torch.randn(3, 16, 8, generator=gen).to(device, dtype).requires_grad_()
    counts = torch.tensor([2, 0, 3], device=device)
    # Identity hooks: the probe's own graph stays invisible to an enclosing activation
    # checkpoint (the first call can come from inside a checkpointed block, whose recompute,
    # with the answer cached, would otherwise save fewer tensors and fail).
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            y = grouped_mm_torch(x, w, counts)
            y.sum().backward()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    ref = grouped_mm_loop(x.detach().double().cpu(), w.detach().double().cpu(), counts.cpu())
    tol = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3
    return bool(torch.allclose(y.detach().double().cpu(), ref, atol=tol, rtol=tol)) and w.grad is not None


def match_operand_dtypes(x_TD: Tensor, w_EDF: Tensor) -> tuple[Tensor, Tensor]:
    """Both operands in one dtype, as a matmul under autocast would compute them.

    Inside ``torch.autocast`` for x's device both go to the autocast dtype (fp32 master
    weights times bf16 activations -> a bf16 grouped GEMM, like nn.Linear); outside it,
    to the promoted dtype. The casts are differentiable, so gradients reach the fp32 weights.
    """
    device_type = x_TD.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(x_TD.dtype, w_EDF.dtype)
    return x_TD.to(dtype), w_EDF.to(dtype)
