"""Fine-tuning an MoE: which parameters train, adapters, expert growth, the starting weights.

Sparse MoEs overfit small fine-tuning sets (ST-MoE, Zoph et al. 2022, sec. 4): their remedy
is to fine-tune only part of the model. ``finetune.mode`` names the part:

    full            every parameter (plain SFT)
    freeze_router   everything but the routers (routing stays what pretraining learnt)
    freeze_experts  everything but the routed and shared experts
    non_moe_only    attention, norms, embeddings, dense FFNs: every MoE layer frozen
                    (ST-MoE's best fine-tuning recipe)
    router_only     the routers only
    lora            adapters only (Hu et al. 2021): on the attention projections and a grouped
                    LoRA on the stacked experts (anymoe.models.lora), merged back on export

``expand_experts_to`` grows every MoE layer before fine-tuning (anymoe.models.expansion: new
experts copied from existing ones with noise, the function preserved at growth).
``init_from`` names the weights to start from: a run directory (its newest intact
checkpoint), a checkpoint folder, or an anymoe / Hugging Face model folder.

Order inside the trainer's ``build``: model -> init_from weights -> expansion -> mode
(freeze / adapters) -> optimizer over the parameters that still train. Resume rebuilds the
same shapes the same way, then loads the checkpoint over them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from anymoe.core.config import ConfigError, param
from anymoe.core.peft import freeze_experts, freeze_router, moe_layers, train_router_only
from anymoe.models.lora import LoRAConfig, apply_lora, has_lora, merge_lora

Mode = Literal["full", "freeze_router", "freeze_experts", "non_moe_only", "router_only", "lora"]
MODES: tuple[str, ...] = ("full", "freeze_router", "freeze_experts", "non_moe_only", "router_only", "lora")


@dataclass(frozen=True)
class FinetuneConfig:
    mode: Mode = param("full", doc="which parameters train: full | freeze_router | freeze_experts | "
                                   "non_moe_only | router_only | lora")
    lora: LoRAConfig = param(default_factory=LoRAConfig, doc="adapters (mode: lora)")
    expand_experts_to: int | None = param(None, ge=2, doc="grow every MoE layer to this many experts "
                                                         "before training (function-preserving)")
    expand_noise_std: float = param(1e-3, ge=0, doc="noise on the copied experts, relative to the "
                                                    "weights' std")
    init_from: str | None = param(None, doc="start from these weights: a run dir, a checkpoint folder "
                                           "or a model folder (null: the seed's fresh weights)")

    def validate(self) -> None:
        if self.mode not in MODES:  # Literal is checked by the loader; this guards direct construction
            raise ConfigError("mode", f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")

    @property
    def active(self) -> bool:
        return self.mode != "full" or self.expand_experts_to is not None or self.init_from is not None


def check_finetune(cfg: FinetuneConfig, model_cfg: Any, ep: int, path: str = "finetune") -> None:
    """Refuse combinations that cannot work, before any model is built."""
    moe = getattr(model_cfg, "moe", None)
    if cfg.mode in ("freeze_router", "freeze_experts", "non_moe_only", "router_only") and moe is None:
        raise ConfigError(f"{path}.mode", f"{cfg.mode!r} needs an MoE model (model.moe); use full or lora")
    if cfg.expand_experts_to is not None:
        if moe is None:
            raise ConfigError(f"{path}.expand_experts_to", "needs an MoE model (model.moe)")
        if cfg.expand_experts_to <= moe.num_experts:
            raise ConfigError(f"{path}.expand_experts_to", f"({cfg.expand_experts_to}) must be larger than "
                              f"model.moe.num_experts ({moe.num_experts})")
        if ep > 1:
            raise ConfigError(f"{path}.expand_experts_to", f"experts are grown on a gathered model, but "
                              f"parallel.ep is {ep}; grow with ep: 1 (a short run or 1 step), then "
                              "fine-tune the saved checkpoint with any ep")
    if cfg.mode == "lora" and "experts" in cfg.lora.targets:
        if moe is not None and getattr(moe, "fused_w13", False):
            raise ConfigError(f"{path}.lora.targets", "LoRA on experts needs model.moe.fused_w13: false "
                              "(or targets: [attention])")
        if ep > 1:
            raise ConfigError(f"{path}.lora.targets", f"LoRA on the experts is not supported with "
                              f"parallel.ep {ep} yet (the adapters would need EP-aware gradient sync and "
                              "checkpoint gathering); use ep: 1 or targets: [attention]")


def resolve_weights(path: str | Path) -> Path:
    """A run dir -> its newest intact checkpoint folder; any other folder is returned as it is."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError("finetune.init_from", f"{str(path)!r} is not a directory; give a run dir, a "
                          "checkpoint folder (step_XXXXXXXX) or a model folder")
    if (path / "checkpoints").is_dir():
        from anymoe.trainers.checkpoint import CheckpointManager

        latest = CheckpointManager(path / "checkpoints").latest_valid()
        if latest is None:
            raise ConfigError("finetune.init_from", f"{path} has no intact checkpoint")
        return latest
    return path


def load_initial_weights(model: nn.Module, path: str | Path) -> Path:
    """Copy the weights at ``path`` into ``model`` (EP slices taken where the model is sharded)."""
    from anymoe.models.io import from_pretrained, load_state

    folder = resolve_weights(path)
    try:
        source = from_pretrained(folder)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError("finetune.init_from", f"cannot read weights from {folder}: {err}") from None
    try:
        load_state(model, source.state_dict())
    except ValueError as err:
        raise ConfigError("finetune.init_from", f"{folder} does not fit this model ({err}); the model "
                          "section must match the checkpoint's") from None
    return folder


def apply_finetune(model: nn.Module, cfg: FinetuneConfig, seed: int = 0) -> dict[str, Any]:
    """Grow experts (if asked), then set which parameters train. Returns a summary for the log."""
    summary: dict[str, Any] = {"mode": cfg.mode}
    if cfg.expand_experts_to is not None:
        from anymoe.models.expansion import expand_experts

        device = next(model.parameters()).device
        expand_experts(model, cfg.expand_experts_to, noise_std=cfg.expand_noise_std, seed=seed)
        model.to(device)
        summary["experts"] = cfg.expand_experts_to
    if cfg.mode == "freeze_router":
        freeze_router(model)
    elif cfg.mode == "freeze_experts":
        freeze_experts(model)
    elif cfg.mode == "non_moe_only":
        for layer in moe_layers(model):
            for p in layer.parameters():
                p.requires_grad_(False)
    elif cfg.mode == "router_only":
        train_router_only(model)
    elif cfg.mode == "lora":
        apply_lora(model, cfg.lora)
    total = sum(p.numel() for p in model.parameters())
    summary["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary["total"] = total
    if summary["trainable"] == 0:
        raise ConfigError("finetune.mode", f"{cfg.mode!r} leaves nothing to train in this model")
    return summary


def export_model(model: nn.Module) -> nn.Module:
    """The model to export: a copy with LoRA adapters merged in (the training model is untouched)."""
    if not has_lora(model):
        return model
    merged = copy.deepcopy(model)
    merge_lora(merged)
    return merged


__all__ = ["MODES", "FinetuneConfig", "apply_finetune", "check_finetune", "export_model",
           "load_initial_weights", "resolve_weights"]
