"""Hugging Face checkpoints both ways: one module per ``model_type``, found through a registry.

``read_hf(path)`` turns a Hugging Face directory (config.json + safetensors, sharded or not)
into (ModelConfig, canonical anymoe state dict); ``hf_files(cfg, state)`` does the reverse.
Each architecture module (mixtral, qwen2_moe, qwen3_moe, deepseek_v3, llama/qwen2 dense)
only declares its config mapping and tensor links (``hf/base.py``); the checks live here:
every tensor must be found, have the shape the config implies, and be used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anymoe.core.config import ConfigError
from anymoe.models.config import ModelConfig
from anymoe.models.hf import deepseek_v3, llama, mixtral, qwen2_moe, qwen3_moe  # noqa: F401  (registration)
from anymoe.models.hf.base import ARCHITECTURES, HFArchitecture, Link


class CheckpointMismatch(ValueError):
    """A tensor is missing, extra or of the wrong shape; the message names it."""


def architecture(model_type: str) -> HFArchitecture:
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            "config.json:model_type",
            f"{model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}",
        )
    return ARCHITECTURES[model_type]


def default_architecture(cfg: ModelConfig) -> str:
    """The Hugging Face model_type that expresses ``cfg`` (explicit ``hf_arch`` overrides it)."""
    if cfg.moe is None:
        return "qwen2" if cfg.attention_bias == "qkv" else "llama"
    if cfg.attention == "mla" or cfg.moe.router.score == "sigmoid":
        return "deepseek_v3"
    if cfg.moe.shared_experts:
        return "qwen2_moe"
    if cfg.qk_norm:
        return "qwen3_moe"
    return "mixtral"


def is_hf_dir(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and "model_type" in json.loads(cfg.read_text())


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face directory (single file or sharded with an index)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{path} has no *.safetensors weights (pytorch_model.bin is not read; "
            "re-save the model with safe_serialization=True)"
        )
    out: dict[str, Tensor] = {}
    for name in files:
        out.update(load_file(str(path / name)))
    return out


def read_hf(
    path: str | Path, expected: dict[str, Tensor] | None = None
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(ModelConfig, anymoe canonical state dict) of a Hugging Face checkpoint directory."""
    path = Path(path)
    hf_cfg = json.loads((path / "config.json").read_text())
    arch = architecture(hf_cfg.get("model_type", ""))
    cfg = arch.to_anymoe_config(hf_cfg)
    tensors = read_safetensors(path)
    return cfg, to_anymoe_state(arch, cfg, tensors, expected)


def to_anymoe_state(
    arch: HFArchitecture,
    cfg: ModelConfig,
    tensors: dict[str, Tensor],
    expected: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Apply the links; ``expected`` (name -> tensor of the right shape) checks every shape."""
    tensors = arch.unfuse(tensors)
    used: set[str] = set()
    state: dict[str, Tensor] = {}
    for link in arch.links(cfg):
        missing = [n for n in link.theirs if n not in tensors]
        if missing:
            raise CheckpointMismatch(
                f"tensor {missing[0]!r} is missing from the checkpoint (needed for anymoe "
                f"{link.ours!r}; {arch.model_type} config implies it)"
            )
        value = link.to_ours([tensors[n] for n in link.theirs])
        if (
            expected is not None
            and link.ours in expected
            and tuple(expected[link.ours].shape) != tuple(value.shape)
        ):
            raise CheckpointMismatch(
                f"tensor {link.theirs[0]!r}{' (and its siblings)' if len(link.theirs) > 1 else ''} "
                f"gives shape {tuple(value.shape)} for anymoe {link.ours!r}, but the config "
                f"implies {tuple(expected[link.ours].shape)}"
            )
        state[link.ours] = value
        used.update(link.theirs)
    extra = [n for n in tensors if n not in used and not arch.ignored(n, cfg)]
    if extra:
        raise CheckpointMismatch(
            f"tensor {extra[0]!r} in the checkpoint is not used by the {arch.model_type} "
            f"mapping ({len(extra)} unused in all); is config.json the right one?"
        )
    return state


def to_hf_state(arch: HFArchitecture, cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The Hugging Face tensors of an anymoe canonical state dict."""
    out: dict[str, Tensor] = {}
    links: list[Link] = arch.links(cfg)
    linked = {link.ours for link in links}
    for name, value in state.items():
        if name in linked:
            continue
        if name.endswith("router.expert_bias"):
            if cfg.moe is not None and cfg.moe.balance.aux_free and bool(value.ne(0).any()):
                raise CheckpointMismatch(
                    f"tensor {name!r} (aux-free selection bias) is non-zero and "
                    f"{arch.model_type} has no place for it"
                )
            continue
        raise CheckpointMismatch(f"tensor {name!r} has no counterpart in {arch.model_type}")
    for link in links:
        if link.ours not in state:
            raise CheckpointMismatch(
                f"tensor {link.ours!r} is missing from the anymoe state dict "
                "(an expert-parallel shard? pass the gathered canonical state dict)"
            )
        for name, value in zip(link.theirs, link.to_theirs(state[link.ours])):
            out[name] = value.detach().contiguous()
    return out


def hf_config_json(arch: HFArchitecture, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:  # the version only, without importing transformers (slow, and not needed to write files)
        tf_version = version("transformers")
    except PackageNotFoundError:
        tf_version = "5.0.0"
    data = arch.to_hf_config(cfg)
    name = str(dtype).replace("torch.", "")
    data.update(
        {
            "model_type": arch.model_type,
            "architectures": [arch.hf_class],
            "torch_dtype": name,
            "dtype": name,
            "transformers_version": tf_version,
        }
    )
    return data


def save_pretrained(model: Any, cfg: ModelConfig | None, path: str | Path, **kwargs: Any) -> Path:
    """Write ``model`` as a Hugging Face directory (``anymoe.models.save_pretrained(..., format="hf")``).

    Kept for callers that pass the config beside the model; ``cfg`` must be the model's own.
    """
    from anymoe.models.io import save_pretrained as save

    inner = getattr(model, "module", model)
    if cfg is not None and cfg != inner.cfg:
        raise ValueError("cfg differs from the model's own config; pass the model's cfg (or None)")
    return save(inner, path, format="hf", **kwargs)


__all__ = [
    "ARCHITECTURES",
    "CheckpointMismatch",
    "architecture",
    "default_architecture",
    "hf_config_json",
    "is_hf_dir",
    "read_hf",
    "read_safetensors",
    "save_pretrained",
    "to_anymoe_state",
    "to_hf_state",
]
