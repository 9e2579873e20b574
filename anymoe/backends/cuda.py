"""CUDA backend (NCCL). Placeholder until the foundation work lands."""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.core.backend import Availability, Backend, register_backend
from anymoe.core.grouped_mm import grouped_mm_loop


@register_backend("cuda", auto_priority=0)
class CUDABackend(Backend):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"

    def availability(self) -> Availability:
        if not torch.cuda.is_available():
            return Availability(False, "torch sees no CUDA device (torch.cuda.is_available() is False)")
        return Availability(True)

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cuda", local_rank)

    def grouped_mm(self, x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
        return grouped_mm_loop(x_TD, w_EDF, counts_E)
