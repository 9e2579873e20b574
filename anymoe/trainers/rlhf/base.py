"""What every RLHF trainer shares on top of the loop skeleton (anymoe.trainers.loop.Trainer).

build_common(): device, determinism, data (preference pairs or prompts), tokenizer check,
the RL model config (balance aux off unless asked for); ``new_model()`` draws a model from
the seed on the CPU then moves it; ``load_policy_weights()`` reads ``rlhf.init_from`` (a run
directory or one checkpoint folder of `anymoe train` / `anymoe rlhf`). ``finish()`` writes
the trainer's PNGs and the RL ones (rl_plots.py). ``self.dp`` is the data-parallel view of the
ranks (data_parallel.py); ``fit()`` runs every forward under ``train.precision``'s autocast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anymoe.core.config import ConfigError, to_dict
from anymoe.core.parallel import ParallelGroups
from anymoe.trainers.checkpoint import CheckpointManager
from anymoe.trainers.distributed import DistEnv
from anymoe.trainers.loop import Trainer
from anymoe.trainers.pretrain import loop_settings, resolve_precision
from anymoe.trainers.profiling import StepProfiler, step_profiler
from anymoe.trainers.rlhf.config import RLHFConfig, rl_model_config
from anymoe.trainers.rlhf.data_parallel import DataParallel
from anymoe.trainers.rlhf.model_io import forward_precision
from anymoe.trainers.rlhf.routing import freeze_routers


def find_checkpoint(spec: str, field: str) -> Path:
    """A checkpoint folder from a run directory, a checkpoints/ folder or a step folder."""
    p = Path(spec).expanduser()
    if (p / "manifest.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir():
            found = CheckpointManager(root, log=lambda m: print(m, file=sys.stderr)).latest_valid()
            if found is not None:
                return found
    raise ConfigError(field, f"no intact checkpoint in {str(p)!r}; give a run directory of `anymoe train` / "
                             "`anymoe rlhf` or one of its checkpoints/step_* folders")


def load_module_state(module: nn.Module, spec: str, field: str, name: str = "model.pt") -> Path:
    """Load ``name`` of the checkpoint ``spec`` into ``module`` (strict: the shapes must match)."""
    path = find_checkpoint(spec, field)
    state = CheckpointManager.load(path, name)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(field, f"{path / name} does not fit this model ({first}); use the same model "
                                 "section as the run that wrote it") from None
    return path


class RLHFTrainer(Trainer):
    """Common build steps and end-of-run plots for rm / dpo / ppo / grpo."""

    algo = ""

    def __init__(self, cfg: RLHFConfig, run_dir: str | Path, backend: Any, resume: bool = False,
                 dist: DistEnv | None = None, groups: ParallelGroups | None = None) -> None:
        super().__init__(run_dir, loop_settings(cfg, resume), dist)
        self.cfg = cfg
        self.backend = backend
        self.device_type = backend.device_type
        self.dp = DataParallel(groups)
        self.amp_dtype = resolve_precision(cfg, backend)  # train.precision: auto (the backend's), bf16, fp32

    def fit(self) -> dict[str, Any]:
        with forward_precision(self.device_type, self.amp_dtype):  # every RL forward, not the backward
            return super().fit()

    def build_common(self) -> None:
        from anymoe.data import build_data, check_vocab

        cfg = self.cfg
        cfg.check_for(self.algo)
        cfg.check_world(self.algo, self.dp.size)
        self.device = self.backend.device(self.dist.local_rank)
        self.backend.set_deterministic(cfg.train.deterministic)
        self.bundle = build_data(cfg.data)
        self.tokenizer = self.bundle.tokenizer
        check_vocab(self.tokenizer, cfg.model.vocab_size)
        self.model_cfg = rl_model_config(cfg.model, cfg.rlhf)
        if len(self.bundle.eval) == 0 and self.algo in ("rm", "dpo"):
            self.message("note: no held-out pairs (data.eval_split is 0); "
                         "accuracy is measured on training pairs")

    def new_model(self, seed_offset: int = 0) -> nn.Module:
        """An MoE model drawn from train.seed on the CPU (bit-identical on every backend), then moved."""
        from anymoe.models.transformer import MoETransformer

        torch.manual_seed(self.cfg.train.seed + seed_offset)
        model = MoETransformer(self.model_cfg, backend=self.backend)
        if self.cfg.rlhf.moe.freeze_router:
            freeze_routers(model)
        return model.to(self.device)

    def load_policy_weights(self, model: nn.Module) -> None:
        if self.cfg.rlhf.init_from:
            path = load_module_state(model, self.cfg.rlhf.init_from, "rlhf.init_from")
            self.message(f"policy initialised from {path}")

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"config": to_dict(self.cfg), "algorithm": self.algo}

    def make_profiler(self) -> StepProfiler | None:
        return step_profiler(self.cfg.profile, self.backend, self.run_dir, self.dist.rank, self.step,
                             self.message)

    def finish(self) -> None:
        if not self.dist.is_main or not self.cfg.logging.plots:
            return
        try:
            from anymoe.trainers.plots import write_plots
            from anymoe.trainers.rlhf.rl_plots import write_rl_plots

            write_plots(self.run_dir)
            write_rl_plots(self.run_dir)
        except (ImportError, ValueError, OSError) as err:
            print(f"plots not written: {err}", file=sys.stderr)


__all__ = ["RLHFTrainer", "find_checkpoint", "load_module_state"]
