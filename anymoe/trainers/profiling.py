"""Profile a few training steps: where the host and the device spend a step, by phase and by op.

``profile.enabled: true`` records steps ``start_step`` .. ``start_step + steps - 1`` (1-based, as in
metrics.jsonl; the step before runs under the profiler as its warm-up) with the backend's profiler
(``Backend.profiler``: torch's kineto with the device's activity, or the runtime's own) and
writes, under ``RUN_DIR/profile/``:

- ``trace_rank{R}.json.gz``: the timeline (Perfetto or chrome://tracing open it);
- ``ops_rank{R}.txt``: torch's op table, sorted by device time where there is a device;
- ``summary_rank{R}.json``: per step, the wall time, the device's busy time (the union of its
  kernels: busy < wall means the device waited on the host), each trainer phase's host time
  (``phase(name)`` ranges: forward, backward, optimizer, ...; where the runtime reports it, also
  the phase's span on the device timeline, from the first to the last kernel the phase's thread
  launched: the backward's kernels come from autograd's own thread) and the top ops by self
  device time (host time without a device).

A runtime whose profiler writes its own format (the NPU backend's) gets only its folder under
``profile/``. Profiling costs host time while it records; the steps outside the window run as usual.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

from anymoe.core.config import param

PHASE_PREFIX = "anymoe/"


@dataclass(frozen=True)
class ProfileConfig:
    enabled: bool = param(False, doc="record a few steps with the backend's profiler into RUN_DIR/profile")
    start_step: int = param(5, ge=1, doc="first recorded step (1-based; the step before warms the "
                                         "profiler up)")
    steps: int = param(3, ge=1, doc="steps recorded")
    all_ranks: bool = param(False, doc="every rank records (false: rank 0 only)")
    record_shapes: bool = param(False, doc="keep op input shapes in the trace")
    memory: bool = param(False, doc="record allocations (memory timeline in the trace)")
    with_stack: bool = param(False, doc="keep Python stacks of ops in the trace (large)")


def phase(name: str) -> torch.profiler.record_function:
    """A named range of a training step; the summary reports its host and device time."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals given in microseconds, in ms."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def _is_annotation(e: Any) -> bool:
    """A named range (ours, the profiler's steps, torch's optimizer ranges), not a kernel or copy."""
    return bool(getattr(e, "is_user_annotation", False)) or e.name.startswith((PHASE_PREFIX, "ProfilerStep"))


def summarize(prof: Any, first_step: int, n: int, top: int = 30) -> dict[str, Any]:
    """The summary of a torch profiler that recorded ``n`` steps from ``first_step`` (module docstring)."""
    events = prof.events()
    step_spans = sorted((e.time_range.start, e.time_range.end) for e in events
                        if e.name.startswith("ProfilerStep") and e.device_type == DeviceType.CPU)[:n]
    kernels = [(e.time_range.start, e.time_range.end) for e in events  # not the ranges' device spans
               if e.device_type != DeviceType.CPU and not _is_annotation(e)]
    rows = prof.key_averages()
    on_device = bool(kernels)
    phases: dict[str, dict[str, float]] = {}
    for e in events:  # host ranges; on a device also the range's span on its timeline
        if e.name.startswith(PHASE_PREFIX):
            row = phases.setdefault(e.name[len(PHASE_PREFIX):], {"calls_per_step": 0.0, "host_ms": 0.0})
            ms = (e.time_range.end - e.time_range.start) / 1e3 / n
            if e.device_type == DeviceType.CPU:
                row["calls_per_step"] += 1 / n
                row["host_ms"] += ms
            else:
                row["device_span_ms"] = row.get("device_span_ms", 0.0) + ms
    key = (lambda r: r.self_device_time_total) if on_device else (lambda r: r.self_cpu_time_total)
    ops = [{"name": r.key, "calls_per_step": r.count / n, "self_host_ms": r.self_cpu_time_total / 1e3 / n,
            "self_device_ms": r.self_device_time_total / 1e3 / n}
           for r in sorted(rows, key=key, reverse=True)
           if not r.key.startswith((PHASE_PREFIX, "ProfilerStep"))][:top]
    out: dict[str, Any] = {
        "steps": [first_step, first_step + n - 1],
        "step_ms": [round((b - a) / 1e3, 3) for a, b in step_spans],
        "phases": phases,
        "top_ops": ops,
    }
    if on_device and step_spans:
        window = (step_spans[0][0], step_spans[-1][1])
        inside = [(max(a, window[0]), min(b, window[1])) for a, b in kernels
                  if b > window[0] and a < window[1]]
        out["device_busy_ms_per_step"] = _union_ms(inside) / len(step_spans)
        out["wall_ms_per_step"] = (window[1] - window[0]) / 1e3 / len(step_spans)
    return out


class StepProfiler:
    """Drives the backend's profiler over a step loop: ``step()`` after every training step."""

    def __init__(self, cfg: ProfileConfig, backend: Any, run_dir: Path, rank: int, done_steps: int,
                 log: Callable[[str], None]) -> None:
        self.out_dir = Path(run_dir) / "profile"
        self.rank, self.log = rank, log
        self.window = (cfg.start_step, cfg.start_step + cfg.steps - 1)
        warmup = 1 if cfg.start_step - 1 > done_steps else 0
        self.before = cfg.start_step - 1 - done_steps  # steps taken before the window opens
        self.total = self.before + cfg.steps  # steps until the window is written
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prof = backend.profiler(
            wait=self.before - warmup, warmup=warmup, active=cfg.steps,
            out_dir=self.out_dir, on_ready=self._write, record_shapes=cfg.record_shapes,
            profile_memory=cfg.memory, with_stack=cfg.with_stack)
        self.prof.__enter__()
        self.taken = 0

    def step(self) -> None:
        if self.prof is None:
            return
        self.taken += 1
        self.prof.step()
        if self.taken >= self.total:
            self.close()

    def close(self) -> None:
        """Stop recording (a run that ends inside the window writes what it recorded)."""
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.__exit__(None, None, None)

    def _write(self, prof: Any) -> None:
        r = self.rank
        prof.export_chrome_trace(str(self.out_dir / f"trace_rank{r}.json.gz"))
        sort = "self_device_time_total" if any(e.device_type != DeviceType.CPU for e in prof.events()) \
            else "self_cpu_time_total"
        (self.out_dir / f"ops_rank{r}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=60))
        recorded = min(self.taken, self.total) - self.before  # fewer when the run stopped inside the window
        if recorded <= 0:
            return
        summary = summarize(prof, self.window[0], recorded)
        (self.out_dir / f"summary_rank{r}.json").write_text(json.dumps(summary, indent=1))
        self.log(f"profile of steps {summary['steps'][0]}-{summary['steps'][1]} written to {self.out_dir}")


def step_profiler(cfg: ProfileConfig, backend: Any, run_dir: Path, rank: int, done_steps: int,
                  log: Callable[[str], None]) -> StepProfiler | None:
    """The run's profiler, or None (off, not this rank, or the window already passed on a resume)."""
    if not cfg.enabled or (rank != 0 and not cfg.all_ranks):
        return None
    if done_steps >= cfg.start_step:
        log(f"profile: step {cfg.start_step} was taken before this resume; nothing is profiled")
        return None
    return StepProfiler(cfg, backend, run_dir, rank, done_steps, log)


__all__ = ["ProfileConfig", "StepProfiler", "phase", "step_profiler", "summarize"]
