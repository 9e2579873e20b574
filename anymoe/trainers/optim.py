"""AdamW and the learning-rate schedules (cosine, WSD, constant).

Schedules are pure functions of the step (``lr_at(step)``), so a resumed run needs only the
step number to continue the same curve; the scheduler's "state" in a checkpoint is that step.

- cosine: linear warmup to ``lr``, then half a cosine down to ``min_lr``.
- wsd (warmup-stable-decay, MiniCPM / DeepSeek-V3's two-stage recipe): linear warmup, a
  constant stage at ``lr``, then a decay over the last ``decay_fraction`` of the steps down
  to ``min_lr`` (linear, cosine or 1-sqrt shape).
- constant: linear warmup then ``lr``.

AdamW (``optim.fused``): "auto" takes the backend's own AdamW class where it has one
(``Backend.adamw_class``: same math and state_dict as torch's, a faster step; the CUDA backend's
runs a Triton kernel), else torch's fused kernel where the backend's device type has one in this torch build
(asked of the backend first, then of torch's own list), else torch's foreach implementation;
"on" is torch's fused kernel, "off" torch's foreach one.
Norm weights, biases and 1-d parameters get no weight decay (the GPT-2/Llama convention).

Clipping: ``clipped_step`` takes the coefficient as a host float, after the step's host read.
An optimizer that says ``takes_device_coef()`` (TritonAdamW where every tensor goes to its
kernel or to torch's fused one) also takes it as a device tensor from ``device_grad_coef``,
NaN for a step to skip, so a trainer queues the step before its host read and, on a bad step,
calls ``undo_step()`` to take back the step's host half (the step counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from anymoe.core.config import ConfigError, param


@dataclass(frozen=True)
class OptimConfig:
    lr: float = param(3e-3, gt=0, le=1.0, doc="peak learning rate")
    min_lr: float = param(3e-4, ge=0, doc="final learning rate of the decay")
    weight_decay: float = param(0.1, ge=0, le=1.0, doc="AdamW decoupled weight decay")
    beta1: float = param(0.9, ge=0, lt=1.0, doc="AdamW beta1")
    beta2: float = param(0.95, ge=0, lt=1.0, doc="AdamW beta2")
    eps: float = param(1e-8, gt=0, le=1e-2, doc="AdamW epsilon")
    grad_clip: float = param(1.0, ge=0, doc="clip the global grad norm to this (0: off)")
    schedule: Literal["cosine", "wsd", "constant"] = param("cosine", doc="learning-rate schedule")
    warmup_steps: int = param(10, ge=0, doc="linear warmup steps")
    decay_fraction: float = param(0.2, gt=0, le=1.0, doc="wsd: share of the steps spent decaying")
    decay_shape: Literal["linear", "cosine", "sqrt"] = param("linear", doc="wsd: shape of the decay")
    moment_dtype: Literal["fp32", "bf16"] = param(
        "fp32", doc="AdamW's two moments under train.precision: bf16_master: bf16 halves their memory and "
                    "the optimizer's traffic (DeepSeek-V3 trained so); the math stays fp32")
    fused: Literal["auto", "on", "off"] = param(
        "auto", doc="AdamW kernel: auto = the backend's AdamW class, else torch's fused where the device has "
                    "it, else foreach; on = torch's fused; off = torch's foreach")

    def validate(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError("min_lr", f"must be <= optim.lr ({self.lr}); got {self.min_lr}; "
                                        "lower min_lr or raise lr")


class LRSchedule:
    """``lr_at(step)`` for step = 0, 1, ... (the step about to be taken)."""

    def __init__(self, cfg: OptimConfig, total_steps: int) -> None:
        self.cfg = cfg
        self.total = max(1, total_steps)

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if c.warmup_steps and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return c.lr
        if c.schedule == "cosine":
            span = max(1, self.total - c.warmup_steps)
            progress = min(1.0, (step - c.warmup_steps) / span)
            return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + math.cos(math.pi * progress))
        # wsd
        decay_steps = max(1, round(c.decay_fraction * self.total))
        decay_start = max(c.warmup_steps, self.total - decay_steps)
        if step < decay_start:
            return c.lr
        progress = min(1.0, (step - decay_start) / max(1, self.total - decay_start))
        if c.decay_shape == "linear":
            frac = 1.0 - progress
        elif c.decay_shape == "cosine":
            frac = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # "1 - sqrt" (Hägele et al. 2024, scaling laws beyond fixed training durations)
            frac = 1.0 - math.sqrt(progress)
        return c.min_lr + (c.lr - c.min_lr) * frac

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr


def fused_supported(backend) -> bool:
    """Whether AdamW has a fused kernel for the backend's device type in this torch build."""
    answer = getattr(backend, "supports_fused_optimizer", None)
    if answer is not None:
        return bool(answer() if callable(answer) else answer)
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # pragma: no cover - older torch
        return False
    return backend.device_type in _get_fused_kernels_supported_devices()


def _no_decay(name: str, p: nn.Parameter) -> bool:
    lowered = name.lower()
    return p.ndim < 2 or "norm" in lowered or lowered.endswith(".bias") or "embed" in lowered


def build_optimizer(model: nn.Module, cfg: OptimConfig, backend,
                    master_weights: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, no decay on norms/biases/embeddings; the implementation
    as ``cfg.fused`` says (module docstring). ``master_weights``: the backend's AdamW that keeps fp32
    masters of the parameters (``train.precision: bf16_master``), whatever ``cfg.fused`` says."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    hyper = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if master_weights:
        master_class = backend.adamw_class(master_weights=True)
        if master_class is None:
            raise ConfigError("train.precision", f"bf16_master needs an AdamW with master weights, which the "
                              f"{backend.name} backend lacks; use bf16 (autocast) or fp32")
        moments = torch.bfloat16 if cfg.moment_dtype == "bf16" else torch.float32
        return master_class(groups, **hyper, master_weights=True, moment_dtype=moments)
    backend_class = backend.adamw_class() if cfg.fused == "auto" else None
    if backend_class is not None:
        return backend_class(groups, **hyper)
    fused = cfg.fused == "on" or (cfg.fused == "auto" and fused_supported(backend))
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, **hyper, **kwargs)


def clipped_step(optimizer: torch.optim.Optimizer, params, coef: float) -> None:
    """``optimizer.step()`` on every gradient times ``coef`` (gradient clipping; 1 = as they are).

    An optimizer that says ``takes_grad_coef`` (the CUDA backend's TritonAdamW) multiplies as it
    reads the gradients; any other gets them scaled in place first, one multi-tensor pass. On
    the H100 (moe-1b, fp32 gradients) that pass was 3.5 ms of a 127 ms step
    (bench/results/gpu_h100/session6/).
    """
    if coef != 1.0 and getattr(optimizer, "takes_grad_coef", False):
        optimizer.step(grad_coef=coef)
        return
    if coef != 1.0:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef)
    optimizer.step()


def takes_device_coef(optimizer) -> bool:
    """Whether ``optimizer.step(grad_coef=device_grad_coef(...))`` queues the step without a host read
    and skips it on a NaN coef, with ``undo_step()`` for its host half (module docstring)."""
    check = getattr(optimizer, "takes_device_coef", None)
    return bool(check()) if callable(check) else False


def device_grad_coef(dense_sq: Tensor, expert_sq: Tensor, loss: Tensor, clip: float) -> Tensor:
    """``clipped_step``'s coefficient on the device: clip / (norm + 1e-6) where clip > 0 and the
    norm sqrt(dense_sq + expert_sq) exceeds it, else 1; NaN where the norm or ``loss`` is not finite
    (the step to skip). A float64 scalar from the float64 squares the host reads, by the host's
    operations in its order: ``clip / (math.sqrt(a + b) + 1e-6)`` bit for bit where the device's
    float64 sqrt is correctly rounded, as math.sqrt is (CUDA's is). torch's CPU sqrt (MKL's vector
    math) can be 1 ulp off in float64; the fp32 value the optimizer multiplies by then differs only
    where that crosses an fp32 rounding boundary, about once in 10**8 clipped steps."""
    norm = (dense_sq + expert_sq).sqrt()
    coef = torch.ones_like(norm)
    if clip > 0:
        clip_t = torch.full_like(norm, clip)  # not clip / t: torch computes that as t.reciprocal() * clip
        coef = torch.where(norm > clip, clip_t / (norm + 1e-6), coef)
    return torch.where(torch.isfinite(norm) & torch.isfinite(loss), coef, torch.nan)


def build_optimized(model: nn.Module, cfg: OptimConfig, backend,
                    master_weights: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``build_optimizer``, then the backend's vendor optimiser (``Backend.optimize``; a no-op where
    the backend has none; skipped with master weights). Train the returned model and optimizer,
    not the inputs."""
    optimizer = build_optimizer(model, cfg, backend, master_weights)
    return (model, optimizer) if master_weights else backend.optimize(model, optimizer)


__all__ = ["LRSchedule", "OptimConfig", "build_optimized", "build_optimizer", "clipped_step",
           "device_grad_coef", "fused_supported", "takes_device_coef"]
