"""The root config of a training run: one YAML file, the same on every backend.

    model:       anymoe.models.ModelConfig (or ``preset: tiny`` plus fields to override)
    data:        anymoe.data.DataConfig
    optim:       OptimConfig (anymoe.trainers.optim)
    parallel:    anymoe.core.parallel.ParallelConfig (DP x EP)
    backend:     auto | cpu | cuda | npu ...
    train:       steps, batch sizes, seed, precision, bad-step / spike policy
    logging:     log interval, TensorBoard, progress bar, plots
    checkpoint:  interval, keep_last, HF export
    eval:        interval and batches

Device-specific choices (expert sizing, kernels, mixed-precision dtype for ``auto``) come
from the backend at run time, never from this file, so one file runs everywhere.

Batch sizes: ``global_batch = micro_batch x grad_accum x data-parallel size``. Give
``global_batch`` (and ``micro_batch``) and the number of accumulation steps follows from the
world size, so the same file gives the same global batch (and loss curve) on 1 or N ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from anymoe.core.backend import backend_names
from anymoe.core.config import ConfigError, apply_overrides, load_config, load_yaml, param
from anymoe.core.parallel import ParallelConfig
from anymoe.data.config import DataConfig
from anymoe.models.config import ModelConfig
from anymoe.models.presets import _merge, preset_data
from anymoe.trainers.compile import check_compile_config
from anymoe.trainers.deepspeed_engine import DeepSpeedConfig, check_deepspeed
from anymoe.trainers.distill import DistillConfig
from anymoe.trainers.finetune import FinetuneConfig, check_finetune
from anymoe.trainers.optim import OptimConfig
from anymoe.trainers.profiling import ProfileConfig


@dataclass(frozen=True)
class TrainConfig:
    steps: int = param(100, ge=1, doc="optimizer steps of the run")
    micro_batch: int = param(8, ge=1, doc="sequences per forward/backward on one rank")
    grad_accum: int | None = param(None, ge=1, doc="micro-batches per rank and step (null: global_batch)")
    global_batch: int | None = param(None, ge=1, doc="sequences per optimizer step, all ranks together")
    seed: int = param(1234, ge=0, doc="seed of weights, data order and dropout")
    precision: Literal["auto", "fp32", "bf16", "bf16_master"] = param(
        "auto", doc="auto: the backend's mixed-precision dtype (fp32 on the CPU); fp32 for parity runs; "
                    "bf16: autocast over fp32 weights; bf16_master: bf16 weights, activations and "
                    "gradients, fp32 master weights and moments in the optimizer")
    deterministic: bool = param(True, doc="deterministic algorithms where the backend has them")
    host_threads: int | None = param(None, ge=1, doc="intra-op CPU threads per process (null: "
                                                      "OMP_NUM_THREADS, else torch's default)")
    compile: Literal["none", "auto", "blocks", "blocks_cudagraphs"] = param(
        "none", doc="none: eager; auto: the backend's preferred mode that this config allows (CUDA: "
                    "blocks_cudagraphs, else blocks, else none; CPU and NPU: none); blocks: "
                    "torch.compile each decoder block separately (regional: one "
                    "graph reused by every block, short compile); blocks_cudagraphs: the same with mode "
                    "reduce-overhead (CUDA graphs, no launch gaps; needs fixed shapes: packed data.seq_len "
                    "rows). Which modes run depends on the backend (anymoe.trainers.compile)")
    max_bad_steps: int = param(5, ge=1, doc="stop after this many consecutive non-finite steps")
    spike_factor: float = param(0.0, ge=0, doc="loss > factor x running mean rolls back (0: off)")
    spike_window: int = param(20, ge=1, doc="steps in the running mean of the spike detector")
    max_rollbacks: int = param(3, ge=0, doc="loss-spike rollbacks allowed in one run")

    def validate(self) -> None:
        if self.spike_factor and self.spike_factor <= 1.0:
            raise ConfigError("spike_factor", f"must be > 1 (a loss this many times the mean) or 0 to turn "
                                              f"spike detection off; got {self.spike_factor}")
        if self.global_batch is not None and self.global_batch % self.micro_batch:
            raise ConfigError("global_batch", f"({self.global_batch}) must be a multiple of micro_batch "
                                              f"({self.micro_batch})")

    def accumulation(self, dp_size: int) -> int:
        """Micro-batches per step on each rank for ``dp_size`` data-parallel ranks."""
        if self.global_batch is None:
            return self.grad_accum or 1
        per_step = self.micro_batch * dp_size
        if self.global_batch % per_step:
            raise ConfigError("train.global_batch", f"({self.global_batch}) must be a multiple of "
                              f"micro_batch x data-parallel size ({self.micro_batch} x {dp_size} = "
                              f"{per_step}); change global_batch or micro_batch, or the number of processes")
        accum = self.global_batch // per_step
        if self.grad_accum is not None and self.grad_accum != accum:
            raise ConfigError("train.grad_accum", f"is {self.grad_accum} but global_batch "
                              f"{self.global_batch} / (micro_batch {self.micro_batch} x dp {dp_size}) = "
                              f"{accum}; set only one of grad_accum and global_batch")
        return accum


@dataclass(frozen=True)
class LoggingConfig:
    every: int = param(1, ge=1, doc="write a metrics line every N steps")
    tensorboard: bool = param(True, doc="write TensorBoard event files (if tensorboard is installed)")
    progress: bool = param(True, doc="show a progress bar with ETA")
    plots: bool = param(True, doc="write loss / lr / expert-load PNGs at the end")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = param(0, ge=0, doc="save every N steps (0: only at the end)")
    keep_last: int = param(3, ge=1, doc="finished checkpoints to keep")
    at_end: bool = param(True, doc="save when the run ends")
    export_hf: bool = param(False, doc="also write a Hugging Face model folder at the end")


@dataclass(frozen=True)
class EvalConfig:
    every: int = param(0, ge=0, doc="evaluate every N steps (0: only at the end)")
    batches: int = param(4, ge=1, doc="global batches of held-out data per evaluation")
    at_end: bool = param(True, doc="evaluate when the run ends")


TOP_SECTIONS = ("name", "out_dir", "backend", "model", "data", "optim", "parallel", "train", "logging",
                "checkpoint", "eval", "profile", "engine", "deepspeed", "finetune", "distill")


@dataclass(frozen=True)
class RunConfig:
    """The whole run: model, data, optimisation, parallelism, backend, loop settings."""

    model: ModelConfig = param(doc="the model (or `preset: NAME` plus fields to override)")
    data: DataConfig = param(default_factory=DataConfig, doc="the data")
    name: str = param("run", doc="run name (default RUN_DIR: runs/<name>)")
    out_dir: str | None = param(None, doc="run directory (the --out flag wins)")
    backend: str = param("auto", doc="auto, or a backend name (see `anymoe env`)")
    optim: OptimConfig = param(default_factory=OptimConfig)
    parallel: ParallelConfig = param(default_factory=ParallelConfig)
    train: TrainConfig = param(default_factory=TrainConfig)
    logging: LoggingConfig = param(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = param(default_factory=CheckpointConfig)
    eval: EvalConfig = param(default_factory=EvalConfig)
    profile: ProfileConfig = param(default_factory=ProfileConfig, doc="record a few steps with the "
                                                                      "backend's profiler")
    engine: Literal["native", "deepspeed"] = param("native", doc="native: anymoe's loop; deepspeed: "
                                                                 "DeepSpeed ZeRO (the deepspeed section)")
    deepspeed: DeepSpeedConfig = param(default_factory=DeepSpeedConfig, doc="engine: deepspeed settings")
    finetune: FinetuneConfig = param(default_factory=FinetuneConfig, doc="which parameters train, "
                                                                         "LoRA, expert growth, init weights")
    distill: DistillConfig | None = param(None, doc="knowledge distillation from a teacher (null: off)")

    @property
    def ep(self) -> int:
        return int(getattr(self.parallel, "ep", getattr(self.parallel, "ep_size", 1)))

    def validate(self) -> None:
        names = ["auto", *backend_names()]
        if self.backend not in names:
            raise ConfigError("backend", f"unknown backend {self.backend!r}; "
                                         f"choose one of {', '.join(names)}")
        moe = self.model.moe
        if moe is not None and self.ep > 1 and moe.num_experts % self.ep:
            raise ConfigError("parallel.ep", f"model.moe.num_experts ({moe.num_experts}) is not divisible by "
                              f"the expert-parallel size {self.ep}; pick an ep that divides it")
        if moe is None and self.ep > 1:
            raise ConfigError("parallel.ep", "expert parallelism needs an MoE model (model.moe); set ep: 1")
        if self.engine == "deepspeed":
            check_deepspeed(self.deepspeed, self.model)
            if self.train.precision == "bf16_master":
                raise ConfigError("train.precision", "bf16_master is the native engine's; DeepSpeed keeps "
                                  "its own fp32 masters under bf16: set train.precision: bf16")
        if self.optim.moment_dtype == "bf16" and self.train.precision != "bf16_master":
            raise ConfigError("optim.moment_dtype", "bf16 moments are kept by the master-weights optimizer "
                              "of train.precision: bf16_master; set it, or optim.moment_dtype: fp32")
        last = self.profile.start_step + self.profile.steps - 1
        if self.profile.enabled and last > self.train.steps:
            raise ConfigError("profile.start_step", f"steps {self.profile.start_step}-{last} are not all in "
                              f"the run's {self.train.steps} steps; lower profile.start_step or "
                              "profile.steps, or raise train.steps")
        check_finetune(self.finetune, self.model, self.ep)
        check_compile_config(self)
        seq = getattr(self.data, "seq_len", None)
        if seq is not None and seq > self.model.max_seq_len:
            raise ConfigError("data.seq_len", f"({seq}) is longer than model.max_seq_len "
                              f"({self.model.max_seq_len}); shorten seq_len or raise max_seq_len")


def _expand_preset(model: Any) -> Any:
    """``model: {preset: tiny, d_model: 128}`` -> the preset's fields with the overrides merged in."""
    if not isinstance(model, dict) or "preset" not in model:
        return model
    rest = {k: v for k, v in model.items() if k != "preset"}
    name = model["preset"]
    if not isinstance(name, str):
        raise ConfigError("model.preset", f"expected a preset name, got {name!r}")
    return _merge(preset_data(name), rest)


def with_model_expanded(data: Any, what: str) -> dict[str, Any]:
    """A copy of a parsed config file with its required ``model`` section's preset expanded
    (shared by the run and the RLHF configs; ``what`` names the file kind in the error)."""
    if not isinstance(data, dict):
        raise ConfigError("", f"{what} must be a mapping of sections, not {type(data).__name__}")
    data = dict(data)
    if "model" not in data:
        raise ConfigError("model", "is required: give a model section, e.g. `model: {preset: tiny}`")
    data["model"] = _expand_preset(data["model"])
    return data


def config_from_data(data: dict[str, Any]):
    """Validate plain data (a parsed YAML file) into a RunConfig."""
    return load_config(RunConfig, with_model_expanded(data, "a run config"))


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """Read a YAML file, apply ``--set key=value`` overrides, validate into a RunConfig."""
    data = load_yaml(path)
    if overrides:
        data = apply_overrides(data, list(overrides))
    return config_from_data(data)


__all__ = ["CheckpointConfig", "EvalConfig", "LoggingConfig", "RunConfig", "TrainConfig", "config_from_data",
           "load_run_config", "with_model_expanded"]
