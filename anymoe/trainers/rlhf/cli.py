"""`anymoe rlhf rm|dpo|ppo|grpo CONFIG.yaml`: post-train an MoE model.

    anymoe rlhf ALGO CONFIG [--out RUN_DIR] [--steps N] [--seed S] [--backend NAME]
                            [--set key=value ...] [--resume] [--nproc N]

RUN_DIR (default: the config's out_dir, else runs/<name>) receives what `anymoe train`
writes (config.yaml, metrics.jsonl, checkpoints/, tensorboard/, loss.png, lr.png,
expert_load.png) plus reward.png, rl_stats.png, routing.png (ppo/grpo) or preference.png
(rm/dpo), and run.json with the final numbers.

Exit codes: 0 done; 2 bad input, reported before any work; 3 the run stopped itself
(non-finite steps); 130 interrupted. ``--nproc N`` (or torchrun) trains data parallel over N
processes (anymoe.trainers.rlhf.data_parallel); rank 0 writes the run directory.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import yaml

from anymoe.core.config import ConfigError, to_dict
from anymoe.trainers.exit_codes import EXIT_BAD_INPUT, fail, fit_exit_code  # noqa: F401 (re-exported)
from anymoe.trainers.rlhf.config import ALGORITHMS

PROG = "anymoe rlhf"


def trainer_class(algo: str):
    if algo == "rm":
        from anymoe.trainers.rlhf.rm import RMTrainer

        return RMTrainer
    if algo == "dpo":
        from anymoe.trainers.rlhf.dpo import DPOTrainer

        return DPOTrainer
    if algo == "ppo":
        from anymoe.trainers.rlhf.ppo import PPOTrainer

        return PPOTrainer
    from anymoe.trainers.rlhf.grpo import GRPOTrainer

    return GRPOTrainer


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("algorithm", choices=ALGORITHMS, help="rm: reward model; dpo; ppo; grpo")
    parser.add_argument("config", help="YAML config (e.g. configs/rlhf/grpo_addition.yaml)")
    parser.add_argument("--out", default=None, metavar="RUN_DIR", help="run directory (default: runs/<name>)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--seed", type=int, default=None, help="override train.seed")
    parser.add_argument("--backend", default=None, help="override backend: auto, cpu, cuda, npu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set rlhf.policy.kl_coef=0.05 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    parser.add_argument("--nproc", type=int, default=None,
                        help="data parallel over N local processes (via torchrun)")


def _fail(text: str, code: int = EXIT_BAD_INPUT) -> int:
    return fail(PROG, text, code)


def _overrides(args: argparse.Namespace) -> list[str]:
    items = list(args.overrides)
    for key, value in (("train.steps", args.steps), ("train.seed", args.seed), ("backend", args.backend)):
        if value is not None:
            items.append(f"{key}={value}")
    return items


def run(args: argparse.Namespace) -> int:
    from anymoe.core.backend import BackendUnavailable, get_backend
    from anymoe.trainers.checkpoint import (
        CheckpointError,
        CheckpointManager,
        probe_writable,
        write_bytes_atomic,
    )
    from anymoe.trainers.distributed import (
        env_from_launcher,
        init_distributed,
        relaunch,
        shutdown,
        worker_argv,
    )
    from anymoe.trainers.loop import TrainingStopped
    from anymoe.trainers.rlhf.config import load_rlhf_config

    env = env_from_launcher()
    if args.nproc is not None and args.nproc < 1:
        return _fail("--nproc must be >= 1")
    world = args.nproc if env.world_size == 1 and args.nproc else env.world_size
    try:
        cfg = load_rlhf_config(args.config, args.algorithm, _overrides(args))
        cfg.check_world(args.algorithm, world)
    except ConfigError as err:
        return _fail(f"config error: {err}")
    run_dir = Path(args.out or cfg.out_dir or Path("runs") / cfg.name)
    if env.is_main and not args.resume and CheckpointManager(run_dir / "checkpoints").finished():
        return _fail(f"{run_dir} already holds checkpoints; pass --resume to continue that run or --out to "
                     "start "
                     "another (nothing was overwritten)")
    try:
        backend = get_backend(cfg.backend)
        if env.is_main:
            probe_writable(run_dir)
    except BackendUnavailable as err:
        return _fail(f"backend: {err}")
    except CheckpointError as err:
        return _fail(str(err))
    if world > 1 and env.world_size == 1:
        return relaunch(world, worker_argv(["rlhf", args.algorithm, args.config], run_dir, args))
    try:
        env = init_distributed(backend)
        from anymoe.core.parallel import build_parallel_groups

        groups = build_parallel_groups(cfg.parallel, backend.device_type, cfg.model.moe.num_experts)
    except ConfigError as err:
        shutdown()
        return _fail(f"config error: {err}")
    trainer = trainer_class(args.algorithm)(cfg, run_dir, backend, resume=args.resume, dist=env,
                                            groups=groups)
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
    if not env.is_main:
        return 0
    keys = ("loss", "reward_mean", "eval_reward", "eval_exact", "accuracy", "eval_accuracy", "margin",
            "eval_margin", "kl", "routing_agreement")
    info = {"algorithm": args.algorithm, "backend": backend.name, "world_size": env.world_size,
            "steps": trainer.step, "seconds": round(time.perf_counter() - t0, 2),
            "python": platform.python_version(), "torch": __import__("torch").__version__,
            **{k: summary[k] for k in keys if k in summary}}
    write_bytes_atomic(run_dir / "run.json", json.dumps(info, indent=1).encode())
    shown = ", ".join(f"{k} {summary[k]:.4f}" for k in keys if isinstance(summary.get(k), float))
    print(f"done: {args.algorithm} {trainer.step} steps in {info['seconds']:.1f} s; {shown}; "
          f"run dir {run_dir}",
          flush=True)
    return 0


__all__ = ["configure", "run", "trainer_class"]
