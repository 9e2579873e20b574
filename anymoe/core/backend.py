"""The Backend interface: everything anymoe needs from a device, and nothing more.

One implementation per target lives in ``anymoe/backends/`` and registers itself here by
name and an ``auto_priority``. ``get_backend("auto")`` picks the usable one with the lowest
priority (accelerators before the CPU); asking for a
backend that cannot run raises :class:`BackendUnavailable` with one line saying why,
before any work starts.
"""

from __future__ import annotations

import importlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.deterministic
from torch import Tensor
from torch.profiler import ProfilerActivity

from anymoe.core.grouped_mm import GroupedMM
from anymoe.core.sizing import IDENTITY, ExpertSizingPolicy


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""


def use_deterministic_algorithms(on: bool, strict: bool = False) -> None:
    """torch's deterministic algorithms, without its fill of every new tensor.

    ``torch.use_deterministic_algorithms(True)`` also turns on
    ``torch.utils.deterministic.fill_uninitialized_memory``: every ``torch.empty`` is written
    with NaN first, a debugging aid that changes no result of code that writes before it reads.
    On the H100 those fills were 10.7 ms of a 1.3B MoE's 127 ms training step
    (bench/results/gpu_h100/session6/). Reproducibility comes from the deterministic kernels,
    which stay on. ``strict``: an op without a deterministic kernel raises instead of warning;
    torch also picks some deterministic kernels only then (scaled-dot-product attention on
    CUDA: flash attention's deterministic backward, cuDNN attention left out).
    """
    torch.use_deterministic_algorithms(on, warn_only=not strict)
    torch.utils.deterministic.fill_uninitialized_memory = False


class BackendUnavailable(RuntimeError):
    """A named backend cannot run here; the message is the whole story in one line."""


class Backend(ABC):
    """A compute target: device, collective library, kernels and sizing policy."""

    name: str
    device_type: str
    dist_backend: str

    def __init__(self, sizing: ExpertSizingPolicy | None = None) -> None:
        # Tests and parity runs force a policy on any backend to prove padding is inert.
        self._sizing = sizing

    @abstractmethod
    def availability(self) -> Availability:
        """Whether this backend can run on this machine, and if not, why (one line)."""

    @abstractmethod
    def device(self, local_rank: int = 0) -> torch.device:
        """The torch device a process of this local rank computes on."""

    @abstractmethod
    def grouped_mm(self, x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
        """Rows sorted by expert times per-expert weights; differentiable; empty experts allowed."""

    def default_sizing(self) -> ExpertSizingPolicy:
        return IDENTITY

    def sizing_policy(self) -> ExpertSizingPolicy:
        return self._sizing or self.default_sizing()

    def bind(self, local_rank: int) -> None:
        """Make ``device(local_rank)`` this process's current device (before collectives run:
        an accelerator process group bound to one device refuses tensors staged on another)."""

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def synchronize(self) -> None:
        """Wait for queued device work (no-op where work is synchronous)."""

    def memory_stats(self) -> dict[str, float]:
        """Allocated and peak bytes on the device, where the runtime reports them."""
        return {}

    def reset_peak_memory(self) -> None:
        """Restart the peak-memory counter (no-op where there is none)."""

    def peak_flops(self, dtype: torch.dtype) -> float:
        """Datasheet peak FLOP/s of one device for ``dtype``; 0 when unknown (MFU not shown)."""
        return 0.0

    def set_deterministic(self, on: bool) -> None:
        use_deterministic_algorithms(on)

    # The device's kineto activity (the profiler records its kernels); None: host ops only.
    profiler_activity: ProfilerActivity | None = None

    def profiler(self, *, wait: int, warmup: int, active: int, out_dir: Path,
                 on_ready: Callable[[Any], None], record_shapes: bool = False,
                 profile_memory: bool = False, with_stack: bool = False) -> Any:
        """A profiler context for a step loop: skips ``wait`` steps, warms up ``warmup``, records
        ``active`` (call ``.step()`` after each step); ``on_ready(prof)`` writes the results.
        Backends whose runtime brings its own profiler override this and write to ``out_dir``."""
        activities = [ProfilerActivity.CPU] + ([self.profiler_activity] if self.profiler_activity else [])
        with warnings.catch_warnings():  # warmup=0 (a resume right before the window) is wanted
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
            schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
        return torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=on_ready,
                                      record_shapes=record_shapes, profile_memory=profile_memory,
                                      with_stack=with_stack)

    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype mixed precision computes in, or None for plain fp32."""
        return torch.bfloat16

    def device_count(self) -> int:
        """Devices of this kind visible to this process (0 when the backend is not usable)."""
        return 1 if self.availability().ok else 0

    def extensions(self) -> dict[str, str]:
        """Optional accelerator libraries this backend uses or skips, and why (for `anymoe env`)."""
        return {}

    def adamw_class(self, master_weights: bool = False) -> type[torch.optim.AdamW] | None:
        """An AdamW subclass with a faster step on this device, same math and state_dict (checkpoints
        move between it and torch's); None = torch's own (``optim.fused: auto`` asks here first).

        ``master_weights``: one that takes ``master_weights=True`` (fp32 masters of low-precision
        parameters kept in its state; ``train.precision: bf16_master``), or None where the backend
        has none."""
        return None

    def optimize(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """Hand model and optimizer to a vendor optimiser where one is in use; default unchanged."""
        return model, optimizer

    def compile_modes(self) -> tuple[str, ...]:
        """The ``train.compile`` values this backend can run ("none" = eager, always there).

        Base: "blocks", because torch.compile's default compiler (Inductor) generates code for
        the device; CUDA graphs ("blocks_cudagraphs") are only where a backend adds them."""
        return ("none", "blocks")

    def preferred_compile_modes(self) -> tuple[str, ...]:
        """What ``train.compile: auto`` tries, best first; the first one the run's config allows
        is taken. Base: eager (compiling pays back only where a measurement says so)."""
        return ("none",)

    def traceable_grouped_mm(self) -> GroupedMM:
        """The experts' grouped matmul inside compiled blocks: one the tracer takes whole (no
        host read, no dtype probe), so a block stays one graph. Base: ``grouped_mm``."""
        return self.grouped_mm

    def check(self) -> Backend:
        """Raise BackendUnavailable unless usable; returns self so calls chain."""
        status = self.availability()
        if not status.ok:
            raise BackendUnavailable(f"backend {self.name!r} is not usable here: {status.reason}")
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, sizing={self.sizing_policy().kind})"


BackendFactory = Callable[..., Backend]
_REGISTRY: dict[str, BackendFactory] = {}
_AUTO_PRIORITY: dict[str, int] = {}


def register_backend(name: str, auto_priority: int) -> Callable[[BackendFactory], BackendFactory]:
    """Class decorator adding a backend to the registry; duplicate names are a bug.

    ``auto_priority``: lower is tried first by ``backend: auto``.
    """

    def add(factory: BackendFactory) -> BackendFactory:
        if name in _REGISTRY:
            raise ValueError(f"backend {name!r} is registered twice")
        _REGISTRY[name] = factory
        _AUTO_PRIORITY[name] = auto_priority
        return factory

    return add


def _load_builtin_backends() -> None:
    importlib.import_module("anymoe.backends")


def backend_names() -> list[str]:
    _load_builtin_backends()
    return sorted(_REGISTRY)


def get_backend(name: str = "auto", sizing: ExpertSizingPolicy | None = None) -> Backend:
    """The backend called ``name`` (or the first usable one for "auto"), checked usable."""
    _load_builtin_backends()
    if name == "auto":
        for candidate in sorted(_REGISTRY, key=_AUTO_PRIORITY.__getitem__):
            backend = _REGISTRY[candidate](sizing=sizing)
            if backend.availability().ok:
                return backend
        raise BackendUnavailable("no backend is usable here (not even 'cpu'); run `anymoe env`")
    if name not in _REGISTRY:
        valid = ", ".join(["auto", *sorted(_REGISTRY)])
        raise BackendUnavailable(f"unknown backend {name!r}; valid backends: {valid}")
    return _REGISTRY[name](sizing=sizing).check()


def create_backend(name: str, sizing: ExpertSizingPolicy | None = None) -> Backend:
    """The backend called ``name``, not checked usable (for `anymoe env` and conformance tests)."""
    _load_builtin_backends()
    if name not in _REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r}; valid backends: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](sizing=sizing)


def probe_backends() -> dict[str, Availability]:
    """Availability of every registered backend, for `anymoe env` and test parametrisation."""
    _load_builtin_backends()
    return {name: factory().availability() for name, factory in sorted(_REGISTRY.items())}
