"""What the training commands (`anymoe train`, `anymoe rlhf ALGO`) share: their common flags and
overrides, the refusal to write over a finished run, the process group's start, and the end of a
run (config.yaml, fit with the exit codes of anymoe.trainers.exit_codes, shutdown, run.json)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from anymoe.core.config import to_dict
from anymoe.trainers.exit_codes import fit_exit_code


def add_common_flags(parser: argparse.ArgumentParser, set_example: str, nproc_help: str) -> None:
    """--out, --steps, --seed, --backend, --set, --resume, --nproc."""
    parser.add_argument("--out", default=None, metavar="RUN_DIR", help="run directory (default: runs/<name>)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--seed", type=int, default=None, help="override train.seed")
    parser.add_argument("--backend", default=None, help="override backend: auto, cpu, cuda, npu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override any config field, e.g. --set {set_example} (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint in RUN_DIR (start fresh if none)")
    parser.add_argument("--nproc", type=int, default=None, help=nproc_help)


def overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items plus the shorthand flags, as ``key=value`` overrides (the flags last: they win)."""
    items = list(args.overrides)
    for key, value in (("train.steps", args.steps), ("train.seed", args.seed), ("backend", args.backend)):
        if value is not None:
            items.append(f"{key}={value}")
    return items


def resolve_run_dir(cfg: Any, out: str | None) -> Path:
    return Path(out or cfg.out_dir or Path("runs") / cfg.name)


def overwrite_refusal(run_dir: Path, is_main: bool, resume: bool) -> str | None:
    """Why a fresh run may not start in ``run_dir`` (it holds finished checkpoints), or None."""
    from anymoe.trainers.checkpoint import CheckpointManager

    if is_main and not resume and CheckpointManager(run_dir / "checkpoints").finished():
        return (f"{run_dir} already holds checkpoints; pass --resume to continue that run or --out to start "
                "another (nothing was overwritten)")
    return None


def start_processes(backend: Any, cfg: Any) -> tuple[Any, Any]:
    """Join the process group (torchrun's env, or one process) and build the DP x EP groups:
    (DistEnv, ParallelGroups). A ConfigError from the groups shuts the process group down first."""
    from anymoe.core.config import ConfigError
    from anymoe.core.parallel import build_parallel_groups
    from anymoe.trainers.distributed import init_distributed, shutdown

    env = init_distributed(backend)
    moe = cfg.model.moe
    try:
        groups = build_parallel_groups(cfg.parallel, backend.device_type,
                                       moe.num_experts if moe is not None else None)
    except ConfigError:
        shutdown()
        raise
    return env, groups


def fit_run(prog: str, trainer: Any, cfg: Any, run_dir: Path, is_main: bool,
            report: Callable[[dict[str, Any], float], dict[str, Any]]) -> int:
    """Write config.yaml, fit, shut the process group down; on rank 0 write run.json from
    ``report(summary, seconds)`` plus the versions. Returns the exit code."""
    from anymoe.core.config import ConfigError
    from anymoe.trainers.checkpoint import CheckpointError, write_bytes_atomic
    from anymoe.trainers.distributed import shutdown
    from anymoe.trainers.loop import TrainingStopped

    if is_main:
        write_bytes_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    t0 = time.perf_counter()
    finished = False
    try:
        summary = trainer.fit()
        finished = True
    except (ConfigError, CheckpointError, TrainingStopped, KeyboardInterrupt) as err:
        return fit_exit_code(prog, err)
    finally:
        shutdown(wait_for_peers=finished)
    if is_main:
        info = report(summary, round(time.perf_counter() - t0, 2))
        info.update(python=platform.python_version(), torch=__import__("torch").__version__)
        write_bytes_atomic(run_dir / "run.json", json.dumps(info, indent=1).encode())
    return 0


__all__ = ["add_common_flags", "fit_run", "overrides", "overwrite_refusal", "resolve_run_dir",
           "start_processes"]
