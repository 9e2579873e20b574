"""Ascend NPU backend (HCCL). Placeholder until the foundation work lands."""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.core.backend import Availability, Backend, register_backend
from anymoe.core.grouped_mm import grouped_mm_loop
from anymoe.core.sizing import POW2, ExpertSizingPolicy


@register_backend("npu", auto_priority=10)
class NPUBackend(Backend):
    name = "npu"
    device_type = "npu"
    dist_backend = "hccl"

    def availability(self) -> Availability:
        return Availability(False, "the torch_npu package is not installed (pip install 'anymoe[npu]')")

    def default_sizing(self) -> ExpertSizingPolicy:
        return POW2

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("npu", local_rank)

    def grouped_mm(self, x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
        return grouped_mm_loop(x_TD, w_EDF, counts_E)
