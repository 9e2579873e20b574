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
import os
from pathlib import Path

from anymoe.core.config import ConfigError
from anymoe.trainers.cli_run import (
    add_common_flags,
    fit_run,
    overrides,
    overwrite_refusal,
    resolve_run_dir,
    start_processes,
)
from anymoe.trainers.exit_codes import EXIT_BAD_INPUT, fail

PROG = "anymoe train"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (e.g. configs/tiny.yaml)")
    add_common_flags(parser, "optim.lr=1e-3", "start N local processes (via torchrun)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="with --nproc: torchrun elastic restarts after a worker dies")
    parser.add_argument("--sizing", default=None,
                        help="force an expert sizing policy (identity, pow2, multiple_of:N); tests only")


def _argv_for_workers(args: argparse.Namespace, run_dir: Path) -> list[str]:
    from anymoe.trainers.distributed import worker_argv

    return worker_argv(["train", args.config], run_dir, args, ("steps", "seed", "backend", "sizing"))


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
    from anymoe.trainers.checkpoint import CheckpointError, probe_writable
    from anymoe.trainers.config import load_run_config
    from anymoe.trainers.distributed import env_from_launcher, relaunch

    try:
        cfg = load_run_config(args.config, overrides(args))
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
    refusal = overwrite_refusal(run_dir, env.is_main, resume)
    if refusal:
        return _fail(refusal)
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
        env, groups = start_processes(backend, cfg)
    except ConfigError as err:
        return _fail(f"config error: {err}")
    from anymoe.trainers.pretrain import PretrainTrainer, precision_label

    trainer_cls = PretrainTrainer
    if cfg.engine == "deepspeed":
        from anymoe.trainers.deepspeed_trainer import DeepSpeedPretrainTrainer as trainer_cls
    trainer = trainer_cls(cfg, run_dir, backend, dist=env, resume=resume, groups=groups)

    def report(summary: dict, seconds: float) -> dict:
        loss, ev = summary.get("loss"), summary.get("eval_loss")
        ev_text = f", eval loss {ev:.4f}" if isinstance(ev, float) else ""
        print(f"done: {trainer.step} steps in {seconds:.1f} s; final loss {loss:.4f}{ev_text}; "
              f"run dir {run_dir}", flush=True)
        return {"backend": backend.name, "world_size": env.world_size, "ep": groups.ep.size,
                "precision": precision_label(cfg, backend), "parameters": trainer.model.num_parameters(),
                "active_parameters": trainer.model.num_parameters(active=True), "steps": trainer.step,
                "seconds": seconds, "final_loss": loss, "eval_loss": ev, "host_cpus": os.cpu_count()}

    return fit_run(PROG, trainer, cfg, run_dir, env.is_main, report)


__all__ = ["configure", "resolve_run_dir", "run"]
