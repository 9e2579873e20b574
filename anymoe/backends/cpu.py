"""CPU backend: gloo collectives, the per-expert loop grouped matmul (fastest measured here)."""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.core.backend import Availability, Backend, register_backend
from anymoe.core.grouped_mm import grouped_mm_loop


@register_backend("cpu", auto_priority=100)
class CPUBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    def availability(self) -> Availability:
        return Availability(True)

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def grouped_mm(self, x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
        return grouped_mm_loop(x_TD, w_EDF, counts_E)

    def autocast_dtype(self) -> torch.dtype | None:
        return None
