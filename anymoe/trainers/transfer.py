"""Host <-> device copies that do not make the host wait for queued device work.

A plain copy between pageable host memory and an accelerator waits for every kernel queued before
it: in ``anymoe train`` on an H100 the copy of a step's token ids waited 8.7 ms, the whole AdamW
step queued at the end of the previous step, before the host could issue the next forward (a
profile of the loop, bench/results/gpu_h100/session8/). Through pinned host memory each copy is
queued like a kernel; the host only waits where it reads the result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _async(device: torch.device) -> bool:
    return device.type != "cpu" and torch.accelerator.is_available()


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (on the host) copied to ``device``, queued behind the device's work instead of waiting
    for it. The pinned staging block is not reused before the copy is done (torch's pinned-memory
    allocator records the copy's stream)."""
    if not _async(device):
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host_later(t: Tensor) -> Callable[[], Tensor]:
    """Start copying ``t`` to the host; the returned call waits for that copy and the work queued
    before it, not for work queued since (an event on the device's stream, a pinned buffer).
    On the CPU, or where torch has no accelerator, the copy is made now."""
    if not _async(t.device):
        host = t.cpu()
        return lambda: host
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.Event(t.device)
    copied.record(torch.accelerator.current_stream(t.device))

    def wait() -> Tensor:
        copied.synchronize()
        return host

    return wait


__all__ = ["to_device", "to_host_later"]
