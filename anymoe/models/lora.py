"""LoRA adapters for MoE models: on attention projections and on the stacked experts.

Sparse MoEs overfit small fine-tuning sets (ST-MoE, Zoph et al. 2022), so fine-tuning
often trains adapters only. ``LoRALinear`` adds ``scale * (x A) B`` to an ``nn.Linear``
(Hu et al. 2021, A ~ N(0, 1/r), B = 0 so the model is unchanged at start).
``LoRAExperts`` is the grouped version for stacked experts: every expert e has its own
A_e [D, r], B_e [r, F] for each of w1/w3/w2, and the low-rank path runs through the same
grouped matmul as the experts (rows sorted by expert), so it works with every backend's
kernel. ``merge_lora`` folds the adapters into the base weights (W + scale * A B) and
removes them, for export.

Padded expert sizing: B columns (w1/w3) and A rows (w2) that fall in the pad start at zero
and receive zero gradient (the pad's activations are exactly zero), so the pad stays inert.

Legend: N rows sorted by expert, D model dim, F expert hidden (stored, maybe padded), r rank, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anymoe.core.config import ConfigError, param
from anymoe.core.experts import Experts

ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = param(8, ge=1, doc="adapter rank r")
    alpha: float = param(16.0, gt=0, doc="scale = alpha / rank")
    targets: tuple[str, ...] = param(("attention", "experts"), doc="attention and/or experts")

    def validate(self) -> None:
        for i, t in enumerate(self.targets):
            if t not in ("attention", "experts"):
                raise ConfigError(f"targets[{i}]", f"unknown LoRA target {t!r}; use attention or experts")
        if not self.targets:
            raise ConfigError("targets", "name at least one of attention, experts")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """y = base(x) + scale * (x A) B, with the base frozen."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        dev, dt = base.weight.device, base.weight.dtype
        # Drawn on the CPU from the global generator (same adapters on every backend), then moved.
        self.lora_A = nn.Parameter((torch.randn(base.in_features, rank) / math.sqrt(rank)).to(dev, dt))
        self.lora_B = nn.Parameter(torch.zeros(rank, base.out_features, device=dev, dtype=dt))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_A.to(x.dtype)) @ self.lora_B.to(x.dtype) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.lora_A @ self.lora_B).t().to(self.base.weight.dtype) * self.scale
        return self.base


class LoRAExperts(nn.Module):
    """Grouped LoRA around an ``Experts`` module; same forward signature (x_ND, counts_E)."""

    def __init__(self, base: Experts, rank: int, scale: float) -> None:
        super().__init__()
        if base.fused_w13:
            raise ValueError("LoRA on experts needs separate w1/w3 (moe.fused_w13: false)")
        self.base = base
        self.scale = scale
        E, D, P, Fh = base.num_local, base.d_model, base.padded_hidden, base.hidden
        dev, dt = base.w1.device, base.w1.dtype

        def a(rows: int, live: int) -> nn.Parameter:
            w = torch.randn(E, rows, rank) / math.sqrt(rank)
            w[:, live:] = 0  # pad rows of w2's A stay zero (see module docstring)
            return nn.Parameter(w.to(dev, dt))

        def b(cols: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(E, rank, cols, dtype=dt, device=dev))

        self.A1, self.B1 = a(D, D), b(P)
        self.A3, self.B3 = a(D, D), b(P)
        self.A2, self.B2 = a(P, Fh), b(D)

    def _low_rank(self, x_ND: Tensor, A: Tensor, B: Tensor, counts_E: Tensor) -> Tensor:
        mm = self.base.grouped_mm
        return mm(mm(x_ND, A.to(x_ND.dtype), counts_E), B.to(x_ND.dtype), counts_E) * self.scale

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        mm, b = self.base.grouped_mm, self.base
        gate = mm(x_ND, b.w1, counts_E) + self._low_rank(x_ND, self.A1, self.B1, counts_E)
        up = mm(x_ND, b.w3, counts_E) + self._low_rank(x_ND, self.A3, self.B3, counts_E)
        h = F.silu(gate) * up
        return mm(h, b.w2, counts_E) + self._low_rank(h, self.A2, self.B2, counts_E)

    @torch.no_grad()
    def merged(self) -> Experts:
        b = self.base
        for w, A, B in ((b.w1, self.A1, self.B1), (b.w3, self.A3, self.B3), (b.w2, self.A2, self.B2)):
            w += torch.bmm(A, B).to(w.dtype) * self.scale
        return b


def _replace(parent: nn.Module, name: str, new: nn.Module) -> None:
    setattr(parent, name, new)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> int:
    """Freeze the model and add adapters to the targets; returns the number of trainable elements."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if "attention" in cfg.targets and name in ATTENTION_NAMES and isinstance(child, nn.Linear):
                _replace(module, name, LoRALinear(child, cfg.rank, cfg.scale))
            elif "experts" in cfg.targets and isinstance(child, Experts):
                _replace(module, name, LoRAExperts(child, cfg.rank, cfg.scale))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weights and unwrap it; returns how many were merged."""
    merged = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (LoRALinear, LoRAExperts)):
                _replace(module, name, child.merged())
                merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return merged


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())
