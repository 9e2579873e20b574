"""The training loop skeleton every anymoe trainer shares (pretrain/SFT here, RLHF in rlhf/).

NOTE FOR TRAINER AUTHORS (rlhf): subclass :class:`Trainer` and fill in the named phases;
the base owns the step counter, logging (metrics.jsonl, TensorBoard, progress bar with
ETA), checkpoint cadence and atomic checkpoints, resume, non-finite step skipping, the
stop after ``max_bad_steps`` consecutive bad steps, loss-spike rollback and hooks.

    build()                  make model(s), optimizer(s), data; called once by fit()
    train_step(step)         one optimizer step -> StepOutput (skipped=True if non-finite;
                             the subclass must not have updated the weights then)
    evaluate()               -> {"eval_loss": ..., ...} (optional)
    checkpoint_files()       -> {file name: state} for this rank (model, optimizer, ...)
    load_checkpoint(path, restore_data)   the inverse; restore_data=False on a rollback
    data_state()/load_data_state(s)       this rank's data sampler position (optional)
    finish()                 end-of-run work (plots, exports) (optional)
    make_profiler()          a StepProfiler over a few steps (anymoe.trainers.profiling) (optional)

Hooks: ``trainer.add_hook("after_step" | "after_eval" | "after_save" | "on_end", fn)``;
``fn(trainer, info_dict)``. The base saves RNG streams (torch CPU + device, python, numpy)
and its own counters per rank, so a resumed run continues the same loss curve bitwise on
the CPU as long as the subclass's train_step is deterministic given that state.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anymoe.trainers.checkpoint import CheckpointManager
from anymoe.trainers.distributed import DistEnv
from anymoe.trainers.metrics import MetricsWriter
from anymoe.trainers.profiling import StepProfiler
from anymoe.trainers.progress import Progress


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many bad steps); a checkpoint of the last good state exists."""


@dataclass(frozen=True)
class LoopSettings:
    """What the loop skeleton needs; trainers build it from their own config."""

    total_steps: int
    log_every: int = 1
    checkpoint_every: int = 0  # 0: only at the end
    keep_last: int = 3
    checkpoint_at_end: bool = True
    eval_every: int = 0  # 0: no periodic evaluation
    eval_at_end: bool = True
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    spike_factor: float = 0.0  # > 0: loss above factor * running mean triggers a rollback
    spike_window: int = 20
    max_rollbacks: int = 3
    resume: bool = False
    tensorboard: bool = True
    progress: bool = True


@dataclass
class StepOutput:
    loss: float  # the loss of this step over the whole global batch (what is logged)
    tokens: int = 0  # tokens the step trained on, all ranks together
    skipped: bool = False  # non-finite loss or gradient: no update was made
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # more per-step fields for metrics.jsonl


def rng_state(device_type: str = "cpu") -> dict[str, Any]:
    """Every random stream a step may draw from, as tensors and plain data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    module = torch.get_device_module(device_type) if device_type != "cpu" else None
    if module is not None and hasattr(module, "get_rng_state_all"):
        state["device"] = module.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device_type: str = "cpu") -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "device" in state and device_type != "cpu":
        torch.get_device_module(device_type).set_rng_state_all(state["device"])


def _fault_kill(step: int, dist: DistEnv) -> None:
    """Fault injection for the reliability tests: ANYMOE_FAULT_KILL="RANK:STEP" makes that rank
    SIGKILL itself after STEP on the first attempt (not after an elastic restart)."""
    spec = os.environ.get("ANYMOE_FAULT_KILL")
    if not spec or dist.restart_count > 0:
        return
    rank, at = (int(x) for x in spec.split(":"))
    if rank == dist.rank and step == at:
        os.kill(os.getpid(), signal.SIGKILL)


class Trainer(ABC):
    """The loop skeleton: named phases, counters, logging, checkpoints, recovery."""

    device_type: str = "cpu"

    def __init__(self, run_dir: str | Path, loop: LoopSettings, dist: DistEnv | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.loop = loop
        self.dist = dist or DistEnv()
        self.step = 0
        self.bad_steps = 0
        self.consecutive_bad = 0
        self.rollbacks = 0
        self.recent_losses: list[float] = []
        self.last_saved_step: int | None = None
        self._hooks: dict[str, list[Callable[[Trainer, dict[str, Any]], None]]] = {
            "after_step": [], "after_eval": [], "after_save": [], "on_end": []}
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep_last=loop.keep_last,
                                      rank=self.dist.rank, barrier=self.dist.barrier, log=self.message)
        self.metrics: MetricsWriter | None = None
        self.progress: Progress | None = None

    # ---- phases a trainer fills in ----
    @abstractmethod
    def build(self) -> None:
        """Create model(s), optimizer(s) and data."""

    @abstractmethod
    def train_step(self, step: int) -> StepOutput:
        """One optimizer step (step = 0-based index of the step being taken)."""

    def evaluate(self) -> dict[str, float]:
        return {}

    @abstractmethod
    def checkpoint_files(self) -> dict[str, Any]:
        """This rank's files for a checkpoint: name -> state (torch.save-able)."""

    @abstractmethod
    def load_checkpoint(self, path: Path, restore_data: bool = True) -> None:
        """Restore what checkpoint_files() wrote."""

    def data_state(self) -> dict[str, Any]:
        return {}

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Restore the data position written by data_state()."""

    def finish(self) -> None:
        """End-of-run work after the final checkpoint (plots, exports)."""

    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    def make_profiler(self) -> StepProfiler | None:
        """The profiler of a few steps (``profile:`` in the config); None: no profiling."""
        return None

    def derived_metrics(self, row: dict[str, Any]) -> dict[str, Any]:
        """Fields computed from a finished row (e.g. MFU from tokens_per_s); optional."""
        return {}

    # ---- hooks and messages ----
    def add_hook(self, event: str, fn: Callable[[Trainer, dict[str, Any]], None]) -> None:
        if event not in self._hooks:
            raise ValueError(f"unknown hook {event!r}; use one of {', '.join(self._hooks)}")
        self._hooks[event].append(fn)

    def _fire(self, event: str, info: dict[str, Any]) -> None:
        for fn in self._hooks[event]:
            fn(self, info)

    def message(self, text: str) -> None:
        if not self.dist.is_main:
            return
        if self.progress is not None and self.progress.enabled:
            self.progress.message(text)
        else:
            print(text, file=sys.stderr, flush=True)

    # ---- checkpoints ----
    def _rank_file(self) -> str:
        return f"rank{self.dist.rank:05d}.pt"

    def save(self) -> Path:
        files = dict(self.checkpoint_files())
        files[self._rank_file()] = {
            "step": self.step, "bad_steps": self.bad_steps, "consecutive_bad": self.consecutive_bad,
            "rollbacks": self.rollbacks, "recent_losses": list(self.recent_losses),
            "rng": rng_state(self.device_type), "data": self.data_state(),
        }
        meta = {"world_size": self.dist.world_size, **self.checkpoint_meta()}
        path = self.ckpt.save(self.step, files, meta)
        self.last_saved_step = self.step
        self._fire("after_save", {"step": self.step, "path": str(path)})
        return path

    def restore(self, path: Path, restore_data: bool = True) -> None:
        self.load_checkpoint(path, restore_data=restore_data)
        own = path / self._rank_file()
        if not own.is_file() and (path / "rank00000.pt").is_file():
            # Written by a smaller world: the data position is global (any rank's copy serves);
            # this rank's RNG streams (dropout) start from rank 0's.
            self.message(f"{path.name} has no state for rank {self.dist.rank} (written by a smaller world); "
                         "using rank 0's data position and RNG state")
            own = path / "rank00000.pt"
        state = self.ckpt.load(path, own.name)
        set_rng_state(state["rng"], self.device_type)
        self.step = int(state["step"])
        self.rollbacks = int(state["rollbacks"]) if restore_data else self.rollbacks
        self.recent_losses = [float(x) for x in state["recent_losses"]]
        self.consecutive_bad = 0
        if restore_data:
            self.bad_steps = int(state["bad_steps"])
            self.load_data_state(state["data"])
        self.last_saved_step = self.step

    def resume(self) -> bool:
        """Restore the newest intact checkpoint; False when there is none."""
        path = self.ckpt.latest_valid()
        if path is None:
            return False
        self.restore(path)
        self.message(f"resumed from {path} (step {self.step})")
        return True

    # ---- the loop ----
    def _is_spike(self, loss: float) -> bool:
        lo = self.loop
        if lo.spike_factor <= 0 or len(self.recent_losses) < lo.spike_window:
            return False
        mean = sum(self.recent_losses) / len(self.recent_losses)
        return loss > lo.spike_factor * mean

    def _rollback(self, loss: float) -> bool:
        path = self.ckpt.latest_valid()
        if path is None or self.rollbacks >= self.loop.max_rollbacks:
            return False
        bad_step = self.step
        # Weights, optimizer and RNG go back; the data position does not, so the batches
        # that led to the spike are skipped (the PaLM recipe) instead of replayed.
        self.restore(path, restore_data=False)
        self.rollbacks += 1
        self.message(f"loss spike at step {bad_step} ({loss:.4f}); rolled back to step {self.step} and "
                     f"skipped the batches in between (rollback {self.rollbacks}/{self.loop.max_rollbacks})")
        return True

    def _stop_bad(self, out: StepOutput) -> None:
        self.save()
        text = (f"stopping: {self.consecutive_bad} consecutive steps had a non-finite loss or gradient "
                f"(last: {out.reason or 'non-finite'}) at step {self.step}; the last good weights are saved "
                f"in {self.run_dir / 'checkpoints'}; lower optim.lr, check the data, then --resume")
        self.message(text)
        raise TrainingStopped(text)

    def fit(self) -> dict[str, Any]:
        """build -> resume? -> steps (log, eval, save, hooks) -> final save -> finish."""
        self.build()
        resumed = self.resume() if self.loop.resume else False
        if self.loop.resume and not resumed:
            self.message("no usable checkpoint to resume from; starting from step 0")
        main = self.dist.is_main
        self.metrics = MetricsWriter(self.run_dir, enabled=main, tensorboard=self.loop.tensorboard,
                                     resume_step=self.step if resumed else None)
        self.progress = Progress(self.loop.total_steps, start=self.step, enabled=main and self.loop.progress)
        last: dict[str, Any] = {}
        profiler = self.make_profiler()
        last_end = time.perf_counter()
        try:
            while self.step < self.loop.total_steps:
                t0 = time.perf_counter()
                out = self.train_step(self.step)
                self.step += 1
                end = time.perf_counter()
                # tokens/s over the whole iteration: the previous step's logging, hooks, evaluation and
                # checkpoint are part of the run's time (train_step alone left them out, and with them
                # any device work they hid, e.g. a queued optimizer step)
                seconds, interval, last_end = end - t0, end - last_end, end
                if profiler is not None:
                    profiler.step()
                if out.skipped or not math.isfinite(out.loss):
                    self.bad_steps += 1
                    self.consecutive_bad += 1
                    self.message(f"step {self.step}: skipped ({out.reason or 'non-finite loss'}); "
                                 f"{self.consecutive_bad} in a row, {self.bad_steps} in total")
                    if self.consecutive_bad >= self.loop.max_bad_steps:
                        self._stop_bad(out)
                    out.skipped = True
                else:
                    self.consecutive_bad = 0
                    if self._is_spike(out.loss) and self._rollback(out.loss):
                        continue
                    self.recent_losses = (self.recent_losses + [out.loss])[-max(1, self.loop.spike_window):]
                row = {"step": self.step, "loss": out.loss, **out.metrics, "step_time_s": seconds,
                       "interval_s": interval, "tokens_per_s": out.tokens / interval if interval > 0 else 0.0,
                       "skipped": out.skipped, "bad_steps": self.bad_steps}
                row.update(self.derived_metrics(row))
                last = row
                if self.loop.eval_every and self.step % self.loop.eval_every == 0:
                    row.update(self._evaluate())
                if self.step % self.loop.log_every == 0 or self.step == self.loop.total_steps:
                    self.metrics.log(row)
                    self.progress.update(self.step, **{k: row[k] for k in ("loss", "lr", "tokens_per_s")
                                                       if isinstance(row.get(k), (int, float))})
                self._fire("after_step", row)
                _fault_kill(self.step, self.dist)
                if self.loop.checkpoint_every and self.step % self.loop.checkpoint_every == 0:
                    self.save()
            if self.loop.eval_at_end and not (self.loop.eval_every and self.step % self.loop.eval_every == 0):
                ev = self._evaluate()
                if ev:
                    last.update(ev)
                    self.metrics.log({"step": self.step, **ev})
            if self.loop.checkpoint_at_end and self.last_saved_step != self.step:
                self.save()
        finally:
            if profiler is not None:
                profiler.close()
            self.progress.close()
            self.metrics.close()
        self.finish()
        self._fire("on_end", last)
        return last

    def _evaluate(self) -> dict[str, float]:
        ev = self.evaluate()
        if ev:
            self._fire("after_eval", {"step": self.step, **ev})
        return ev


__all__ = ["LoopSettings", "StepOutput", "Trainer", "TrainingStopped", "rng_state", "set_rng_state"]
