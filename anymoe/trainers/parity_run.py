"""`anymoe parity run`: train a config in parity mode and write its per-step curve.

Parity mode makes a run a function of the config and the seed only, so two runs that
should agree (another backend, EP size, sizing policy, precision, or a resumed run) can be
compared step by step with ``anymoe parity compare``:

- dropout 0 and no router input jitter (both draw from device random streams that differ
  between backends); checkpoints, evaluation, plots and TensorBoard off (not part of the curve);
- deterministic algorithms where the backend has them (``backend.set_deterministic``: on
  accelerators this also turns TF32 off, so fp32 really is fp32);
- weights drawn on the CPU from ``train.seed`` and data order from ``data.seed`` (the
  trainer does both for every run; parity mode relies on it);
- ``--ep N`` / ``--nproc N`` re-run the same command under torchrun (the trainer's
  ``--nproc`` machinery): gloo on the CPU, the backend's collective library elsewhere.

The curve (see anymoe.trainers.curves) gets a header (backend, device, precision, EP and
world size, sizing policy, float32 matmul precision, versions, a hash of the recipe) and one
line per step: loss, grad norm, lr, the expert-load share of every MoE layer, and the
routing probe: the sorted top-k expert ids of every token of a fixed held-out sequence, per
MoE layer, taken after the step in eval mode (no state changes, no random draws).

``--resume-at K`` runs to step K, saves a checkpoint, stops, builds a fresh trainer that
resumes from it and runs on to the end: the curve of one command proves resume parity.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from anymoe.core.config import ConfigError, to_dict
from anymoe.trainers.exit_codes import EXIT_BAD_INPUT, fail, fit_exit_code  # noqa: F401 (re-exported)

PROG = "anymoe parity run"
PROBE_TOKENS = 32  # tokens of the routing probe (one held-out sequence, cut to this length)


class _StopAt(Exception):
    """Raised by the --resume-at hook after the checkpoint at step K is written."""


def _fail(text: str, code: int = EXIT_BAD_INPUT) -> int:
    return fail(PROG, text, code)


# ---------------------------------------------------------------------------------------- config
def parity_overrides(args: argparse.Namespace) -> list[str]:
    """The user's --set items, then what parity mode forces (later items win)."""
    items = list(args.overrides)
    if args.steps is not None:
        items.append(f"train.steps={args.steps}")
    items += [
        f"backend={args.backend}", f"parallel.ep={args.ep}", f"train.precision={args.precision}",
        "train.deterministic=true", "model.dropout=0.0", "train.spike_factor=0.0",
        "checkpoint.every=0", "checkpoint.at_end=false", "eval.every=0", "eval.at_end=false",
        "logging.every=1", "logging.tensorboard=false", "logging.plots=false",
    ]
    return items


def load_parity_config(args: argparse.Namespace):
    """The run config in parity mode; router jitter is forced off only where the model has one."""
    from anymoe.trainers.config import load_run_config

    items = parity_overrides(args)
    cfg = load_run_config(args.config, items)
    moe = cfg.model.moe
    if moe is not None and moe.router.jitter > 0:
        items.append("model.moe.router.jitter=0.0")
        cfg = load_run_config(args.config, items)
    return cfg, items


def recipe_sha256(cfg) -> str:
    """Hash of what must match between two curves that are compared: model, data, optimiser,
    seed and step count (not the backend, EP size, precision -- incl. the moments' dtype -- or logging)."""
    data = to_dict(cfg)
    train = {k: v for k, v in data["train"].items() if k not in ("precision", "deterministic", "compile")}
    optim = {k: v for k, v in data["optim"].items() if k != "moment_dtype"}
    recipe = {"model": data["model"], "data": data["data"], "optim": optim, "train": train}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _check_args(args: argparse.Namespace, steps: int) -> str | None:
    if args.ep < 1:
        return "--ep must be >= 1"
    nproc = args.nproc if args.nproc is not None else args.ep
    if nproc < 1:
        return "--nproc must be >= 1"
    if nproc % args.ep:
        return f"--nproc ({nproc}) must be a multiple of --ep ({args.ep}): world = dp x ep"
    if args.resume_at is not None and not 1 <= args.resume_at < steps:
        return (f"--resume-at must be between 1 and the number of steps - 1 ({steps - 1}); "
                f"got {args.resume_at}")
    return None


def _worker_argv(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The same command for every torchrun worker (no --nproc: torchrun's argument parser would
    take it for its own; the workers read the world size from torchrun's environment)."""
    argv = ["parity", "run", str(args.config), "--out", str(Path(args.out).resolve()),
            "--backend", args.backend, "--ep", str(args.ep), "--precision", args.precision,
            "--run-dir", str(run_dir)]
    for flag, value in (("--steps", args.steps), ("--sizing", args.sizing), ("--resume-at", args.resume_at)):
        if value is not None:
            argv += [flag, str(value)]
    for item in args.overrides:
        argv += ["--set", item]
    return argv


# ---------------------------------------------------------------------------------------- recording
class CurveRecorder:
    """An ``after_step`` hook: one curve row per step, with loads and the routing probe."""

    def __init__(self, probe_tokens: int = PROBE_TOKENS) -> None:
        self.rows: list[dict[str, Any]] = []
        self.probe_tokens = probe_tokens
        self._probe: torch.Tensor | None = None

    def probe_ids(self, trainer) -> torch.Tensor:
        """[1, S] token ids: the first held-out sample (the first training sample if there is none)."""
        bundle = trainer.data.bundle
        sample = bundle.eval[0] if len(bundle.eval) else bundle.train[0]
        ids = bundle.collate([sample])["input_ids"][:, :self.probe_tokens]
        return ids.to(trainer.device)

    @torch.no_grad()
    def routing(self, trainer) -> list[list[list[int]]] | None:
        """Sorted top-k expert ids per probe token, per MoE layer. Every rank runs it (EP
        dispatch is collective); eval mode, so no jitter, no aux-free load counting."""
        if self._probe is None:
            self._probe = self.probe_ids(trainer)
        model = trainer.model
        autocast = (torch.autocast(device_type=trainer.device_type, dtype=trainer.amp_dtype)
                    if trainer.amp_dtype is not None else contextlib.nullcontext())
        model.eval()
        try:
            with autocast:
                out = model(self._probe, return_aux=True)
        finally:
            model.train()
        if not out.moe_aux:
            return None
        return [aux.expert_ids.sort(dim=-1).values.cpu().tolist() for aux in out.moe_aux]

    def __call__(self, trainer, row: dict[str, Any]) -> None:
        routing = self.routing(trainer)
        if not trainer.dist.is_main:
            return
        out: dict[str, Any] = {"step": int(row["step"]), "loss": float(row["loss"]),
                               "grad_norm": row.get("grad_norm"), "lr": row.get("lr"),
                               "aux_loss": row.get("aux_loss"), "skipped": bool(row.get("skipped", False))}
        if row.get("layers"):
            out["loads"] = [layer["share"] for layer in row["layers"]]
        if routing is not None:
            out["routing"] = routing
        self.rows = [r for r in self.rows if r["step"] < out["step"]] + [out]


def _stop_at(step: int):
    def hook(trainer, row: dict[str, Any]) -> None:
        if row["step"] == step:
            trainer.save()
            raise _StopAt(step)

    return hook


def source_commit() -> str | None:
    """The git commit of the anymoe source tree in use (None when not a git checkout)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def curve_meta(args: argparse.Namespace, cfg, backend, env, groups, items: list[str]) -> dict[str, Any]:
    from anymoe.backends.env import package_versions

    status = backend.availability()
    sizing = backend.sizing_policy()
    moe = cfg.model.moe
    return {
        "backend": backend.name, "device": status.reason, "machine": platform.machine(),
        "processor": platform.processor() or None, "precision": args.precision,
        "ep": groups.ep.size if groups is not None else 1, "world_size": env.world_size,
        "sizing": sizing.kind if sizing.kind != "multiple_of" else f"multiple_of:{sizing.multiple}",
        "expert_hidden": None if moe is None else [moe.expert_hidden, sizing.padded(moe.expert_hidden)],
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(), "config": str(args.config), "name": cfg.name,
        "steps": cfg.train.steps, "seed": cfg.train.seed, "data_seed": getattr(cfg.data, "seed", None),
        "resume_at": args.resume_at, "probe_tokens": PROBE_TOKENS, "overrides": list(args.overrides),
        "parity_overrides": items[len(args.overrides):], "recipe_sha256": recipe_sha256(cfg),
        "versions": package_versions(), "commit": source_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_curve_atomic(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from anymoe.trainers.curves import write_curve

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write_curve(tmp, meta, rows)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- the run
def _prepare(args: argparse.Namespace, cfg, world_size: int, run_dir: Path | None):
    """Every check that can fail on bad input, before any work: (backend, None) or (None, why)."""
    from anymoe.core.backend import BackendUnavailable, get_backend
    from anymoe.core.sizing import parse_policy
    from anymoe.trainers.checkpoint import CheckpointManager
    from anymoe.trainers.cli_train import preflight

    try:
        preflight(cfg, world_size)
    except ConfigError as err:
        return None, f"config error: {err}"
    try:
        sizing = parse_policy(args.sizing) if args.sizing else None
    except ValueError as err:
        return None, f"--sizing: {err}"
    try:
        backend = get_backend(cfg.backend, sizing=sizing)
    except BackendUnavailable as err:
        return None, f"backend: {err}"
    out_dir = Path(args.out).resolve().parent
    if out_dir.exists() and not os.access(out_dir, os.W_OK):
        return None, f"--out: cannot write to {out_dir}"
    if run_dir is not None and CheckpointManager(run_dir / "checkpoints").finished():
        return None, f"--run-dir {run_dir} already holds checkpoints; give an empty or new folder"
    return backend, None


def parity_run(args: argparse.Namespace) -> int:
    from anymoe.trainers.distributed import env_from_launcher, relaunch

    try:
        cfg, items = load_parity_config(args)
    except ConfigError as err:
        return _fail(f"config error: {err}")
    problem = _check_args(args, cfg.train.steps)
    if problem:
        return _fail(problem)
    nproc = args.nproc if args.nproc is not None else args.ep
    env = env_from_launcher()
    given = Path(args.run_dir) if getattr(args, "run_dir", None) else None
    if env.world_size == 1:  # under torchrun each worker checks in _run_here
        _, problem = _prepare(args, cfg, nproc, given)
        if problem:
            return _fail(problem)
    run_dir = given or Path(tempfile.mkdtemp(prefix="anymoe-parity-"))
    try:
        if nproc > 1 and env.world_size == 1:
            code = relaunch(nproc, _worker_argv(args, run_dir))
        else:
            code = _run_here(args, cfg, items, run_dir)
    finally:
        if given is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    return code


def _run_here(args: argparse.Namespace, cfg, items: list[str], run_dir: Path) -> int:
    from anymoe.core.parallel import build_parallel_groups
    from anymoe.trainers.checkpoint import CheckpointError
    from anymoe.trainers.distributed import env_from_launcher, init_distributed, shutdown
    from anymoe.trainers.loop import TrainingStopped
    from anymoe.trainers.pretrain import PretrainTrainer

    env = env_from_launcher()
    if args.nproc is not None and env.world_size != args.nproc:
        return _fail(f"started with WORLD_SIZE={env.world_size} but --nproc asks for {args.nproc} processes")
    # Every rank makes the same checks (an early exit of one rank alone would hang the others).
    backend, problem = _prepare(args, cfg, env.world_size, run_dir)
    if problem:
        return _fail(problem)
    if cfg.model.moe is not None and cfg.model.moe.router.kind == "noisy_topk" and env.is_main:
        print("anymoe parity run: warning: noisy_topk draws router noise from the device's random "
              "stream; curves of different backends will not agree", file=sys.stderr)
    recorder = CurveRecorder()
    finished = False
    try:
        env = init_distributed(backend)
        moe = cfg.model.moe
        groups = build_parallel_groups(cfg.parallel, backend.device_type,
                                       moe.num_experts if moe is not None else None)
        trainer = PretrainTrainer(cfg, run_dir, backend, dist=env, resume=False, groups=groups)
        trainer.add_hook("after_step", recorder)
        if args.resume_at is not None:
            trainer.add_hook("after_step", _stop_at(args.resume_at))
            try:
                trainer.fit()
            except _StopAt:
                pass
            trainer = PretrainTrainer(cfg, run_dir, backend, dist=env, resume=True, groups=groups)
            trainer.add_hook("after_step", recorder)
        trainer.fit()
        meta = curve_meta(args, cfg, backend, env, groups, items)
        finished = True
    except (ConfigError, CheckpointError, TrainingStopped) as err:  # Ctrl-C: the traceback (no resume)
        return fit_exit_code(PROG, err)
    finally:
        shutdown(wait_for_peers=finished)
    if env.is_main:
        out = Path(args.out)
        write_curve_atomic(out, meta, recorder.rows)
        last = recorder.rows[-1]
        print(f"parity curve: {len(recorder.rows)} steps ({meta['backend']}, {meta['precision']}, "
              f"ep {meta['ep']}, world {meta['world_size']}, sizing {meta['sizing']}), final loss "
              f"{last['loss']:.6f} -> {out}", flush=True)
    return 0


__all__ = ["CurveRecorder", "load_parity_config", "parity_overrides", "parity_run", "recipe_sha256"]
