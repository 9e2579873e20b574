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
    add_common_flags(parser, "rlhf.policy.kl_coef=0.05",
                     "data parallel over N local processes (via torchrun)")


def _fail(text: str, code: int = EXIT_BAD_INPUT) -> int:
    return fail(PROG, text, code)


def run(args: argparse.Namespace) -> int:
    from anymoe.core.backend import BackendUnavailable, get_backend
    from anymoe.trainers.checkpoint import CheckpointError, probe_writable
    from anymoe.trainers.distributed import env_from_launcher, relaunch, worker_argv
    from anymoe.trainers.rlhf.config import load_rlhf_config

    env = env_from_launcher()
    if args.nproc is not None and args.nproc < 1:
        return _fail("--nproc must be >= 1")
    world = args.nproc if env.world_size == 1 and args.nproc else env.world_size
    try:
        cfg = load_rlhf_config(args.config, args.algorithm, overrides(args))
        cfg.check_world(args.algorithm, world)
    except ConfigError as err:
        return _fail(f"config error: {err}")
    run_dir = resolve_run_dir(cfg, args.out)
    refusal = overwrite_refusal(run_dir, env.is_main, args.resume)
    if refusal:
        return _fail(refusal)
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
        env, groups = start_processes(backend, cfg)
    except ConfigError as err:
        return _fail(f"config error: {err}")
    trainer = trainer_class(args.algorithm)(cfg, run_dir, backend, resume=args.resume, dist=env,
                                            groups=groups)
    keys = ("loss", "reward_mean", "eval_reward", "eval_exact", "accuracy", "eval_accuracy", "margin",
            "eval_margin", "kl", "routing_agreement")

    def report(summary: dict, seconds: float) -> dict:
        shown = ", ".join(f"{k} {summary[k]:.4f}" for k in keys if isinstance(summary.get(k), float))
        print(f"done: {args.algorithm} {trainer.step} steps in {seconds:.1f} s; {shown}; run dir {run_dir}",
              flush=True)
        return {"algorithm": args.algorithm, "backend": backend.name, "world_size": env.world_size,
                "steps": trainer.step, "seconds": seconds, **{k: summary[k] for k in keys if k in summary}}

    return fit_run(PROG, trainer, cfg, run_dir, env.is_main, report)


__all__ = ["configure", "run", "trainer_class"]
