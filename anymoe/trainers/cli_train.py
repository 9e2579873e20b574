"""`anymoe train CONFIG`: the command-line contract scripts and CI rely on.

    anymoe train CONFIG [--out RUN_DIR] [--steps N] [--seed S] [--backend NAME]
                        [--set key=value ...] [--resume] [--nproc N]

RUN_DIR (default: the config's out_dir, else runs/<name>) receives:
    config.yaml        the resolved config (every default filled in)
    run.json           backend, world size, precision, parameter counts, versions
    metrics.jsonl      one JSON object per logged step (step, loss, lr, tokens_per_s, ...)
    checkpoints/       step_XXXXXXXX/ folders with a checksummed manifest
    tensorboard/       event files (when tensorboard is installed)
    loss.png, lr.png, expert_load.png

Exit codes: 0 done; 2 bad input (config, backend, run directory) reported before any work;
3 the run stopped itself (too many non-finite steps; a checkpoint of the last good state
was written); 130 interrupted.

Multi-process: under torchrun (RANK/WORLD_SIZE set) every process runs this; ``--nproc N``
re-runs the same command under torchrun. After an elastic restart
(TORCHELASTIC_RESTART_COUNT > 0) the run resumes from its newest intact checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import yaml

from anymoe.core.config import ConfigError, to_dict
from anymoe.trainers.exit_codes import EXIT_BAD_INPUT, fail, fit_exit_code  # noqa: F401 (re-exported)

PROG = "anymoe train"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (e.g. configs/tiny.yaml)")
    parser.add_argument("--out", default=None, metavar="RUN_DIR", help="run directory (default: runs/<name>)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--seed", type=int, default=None, help="override train.seed")
    parser.add_argument("--backend", default=None, help="override backend: auto, cpu, cuda, npu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint in RUN_DIR (start fresh if none)")
    parser.add_argument("--nproc", type=int, default=None, help="start N local processes (via torchrun)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="with --nproc: torchrun elastic restarts after a worker dies")
    parser.add_argument("--sizing", default=None,
                        help="force an expert sizing policy (identity, pow2, multiple_of:N); tests only")


def _argv_for_workers(args: argparse.Namespace, run_dir: Path) -> list[str]:
    from anymoe.trainers.distributed import worker_argv

    return worker_argv(["train", args.config], run_dir, args, ("steps", "seed", "backend", "sizing"))


def _overrides(args: argparse.Namespace) -> list[str]:
    items = list(args.overrides)
    if args.steps is not None:
        items.append(f"train.steps={args.steps}")
    if args.seed is not None:
        items.append(f"train.seed={args.seed}")
    if args.backend is not None:
        items.append(f"backend={args.backend}")
    return items


def resolve_run_dir(cfg, out: str | None) -> Path:
    return Path(out or cfg.out_dir or Path("runs") / cfg.name)


def preflight(cfg, world_size: int) -> None:
    """Every check that needs the world size or the tokenizer, before anything is written."""
    from anymoe.data.tokenizers import build_tokenizer, check_vocab

    moe = cfg.model.moe
    cfg.parallel.check_world(world_size, moe.num_experts if moe is not None else None)
    cfg.train.accumulation(world_size)
    check_vocab(build_tokenizer(cfg.data.tokenizer), cfg.model.vocab_size)


def _fail(text: str, code: int = EXIT_BAD_INPUT) -> int:
    return fail(PROG, text, code)


def run(args: argparse.Namespace) -> int:
    from anymoe.core.backend import BackendUnavailable, get_backend
    from anymoe.trainers.checkpoint import (
        CheckpointError,
        CheckpointManager,
        probe_writable,
        write_bytes_atomic,
    )
    from anymoe.trainers.config import load_run_config
    from anymoe.trainers.distributed import env_from_launcher, init_distributed, relaunch, shutdown

    try:
        cfg = load_run_config(args.config, _overrides(args))
    except ConfigError as err:
        return _fail(f"config error: {err}")
    run_dir = resolve_run_dir(cfg, args.out)
    env = env_from_launcher()
    if args.nproc is not None and args.nproc < 1:
        return _fail("--nproc must be >= 1")
    if args.nproc and args.nproc > 1 and env.world_size == 1:
        return relaunch(args.nproc, _argv_for_workers(args, run_dir), args.max_restarts)
    try:
        preflight(cfg, env.world_size)
    except ConfigError as err:
        return _fail(f"config error: {err}")
    resume = args.resume or env.restart_count > 0
    if env.is_main and not resume and CheckpointManager(run_dir / "checkpoints").finished():
        return _fail(f"{run_dir} already holds checkpoints; pass --resume to continue that run or --out "
                     "to start another (nothing was overwritten)")
    sizing = None
    if args.sizing:
        from anymoe.core.sizing import parse_policy

        try:
            sizing = parse_policy(args.sizing)
        except ValueError as err:
            return _fail(f"--sizing: {err}")
    try:
        backend = get_backend(cfg.backend, sizing=sizing)
    except BackendUnavailable as err:
        return _fail(f"backend: {err}")
    if env.is_main:
        try:
            probe_writable(run_dir)
        except CheckpointError as err:
            return _fail(str(err))
    try:
        env = init_distributed(backend)
        from anymoe.core.parallel import build_parallel_groups

        moe = cfg.model.moe
        groups = build_parallel_groups(cfg.parallel, backend.device_type,
                                       moe.num_experts if moe is not None else None)
    except ConfigError as err:
        shutdown()
        return _fail(f"config error: {err}")
    from anymoe.trainers.loop import TrainingStopped
    from anymoe.trainers.pretrain import PretrainTrainer, precision_label

    trainer_cls = PretrainTrainer
    if cfg.engine == "deepspeed":
        from anymoe.trainers.deepspeed_trainer import DeepSpeedPretrainTrainer as trainer_cls
    trainer = trainer_cls(cfg, run_dir, backend, dist=env, resume=resume, groups=groups)
    if env.is_main:
        write_bytes_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    t0 = time.perf_counter()
    finished = False
    try:
        summary = trainer.fit()
        finished = True
    except (ConfigError, CheckpointError, TrainingStopped, KeyboardInterrupt) as err:
        return fit_exit_code(PROG, err)
    finally:
        shutdown(wait_for_peers=finished)
    if env.is_main:
        info = {"backend": backend.name, "world_size": env.world_size, "ep": groups.ep.size,
                "precision": precision_label(cfg, backend),
                "parameters": trainer.model.num_parameters(),
                "active_parameters": trainer.model.num_parameters(active=True),
                "steps": trainer.step, "seconds": round(time.perf_counter() - t0, 2),
                "final_loss": summary.get("loss"), "eval_loss": summary.get("eval_loss"),
                "python": platform.python_version(), "torch": __import__("torch").__version__,
                "host_cpus": os.cpu_count()}
        write_bytes_atomic(run_dir / "run.json", json.dumps(info, indent=1).encode())
        loss = summary.get("loss")
        ev = summary.get("eval_loss")
        ev_text = f", eval loss {ev:.4f}" if isinstance(ev, float) else ""
        print(f"done: {trainer.step} steps in {info['seconds']:.1f} s; final loss {loss:.4f}{ev_text}; "
              f"run dir {run_dir}", flush=True)
    return 0


__all__ = ["configure", "resolve_run_dir", "run"]
