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
