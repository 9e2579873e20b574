"""Parameter-efficient fine-tuning switches for MoE models: which MoE parts train.

The trainers call these on a whole model; they walk it for ``MoELayer`` modules and flip
``requires_grad``. Frozen parameters get no gradient, so the optimizer (built from
``trainable_parameters``) never updates them and AdamW's weight decay never touches them.
A frozen router still routes (its aux-free bias still moves: it is a buffer, not a weight);
balance losses then only shape the parts that train.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from anymoe.core.moe import MoELayer


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _set(params: Iterator[nn.Parameter], flag: bool) -> int:
    n = 0
    for p in params:
        p.requires_grad_(flag)
        n += p.numel()
    return n


def freeze_router(model: nn.Module, frozen: bool = True) -> int:
    """Freeze (or unfreeze) every MoE router's weights; returns the number of elements touched."""
    return sum(_set(layer.router.parameters(), not frozen) for layer in moe_layers(model))


def freeze_experts(model: nn.Module, frozen: bool = True, include_shared: bool = True) -> int:
    """Freeze (or unfreeze) routed experts, and shared experts unless ``include_shared=False``."""
    n = 0
    for layer in moe_layers(model):
        n += _set(layer.experts.parameters(), not frozen)
        if include_shared and layer.shared is not None:
            n += _set(layer.shared.parameters(), not frozen)
    return n


def train_router_only(model: nn.Module) -> int:
    """Freeze everything except the MoE routers; returns the number of trainable elements."""
    _set(model.parameters(), False)
    return sum(_set(layer.router.parameters(), True) for layer in moe_layers(model))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should be built from after these switches."""
    return [p for p in model.parameters() if p.requires_grad]
