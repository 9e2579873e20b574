"""Checkpoint directories in and out: anymoe's own format and Hugging Face's.

anymoe format (what ``save_pretrained(model, path)`` writes)::

    path/config.json        {"anymoe_format": 1, "model": <ModelConfig as data>}
    path/model.safetensors  canonical state dict (unpadded experts, all E of them, float32
                            unless saved otherwise; a tied head is stored once)

``from_pretrained`` also reads a trainer run's checkpoint (``config.yaml`` with a ``model:``
section, weights ``model.safetensors`` or ``model.pt``, in the directory or a parent) and any
Hugging Face directory whose ``model_type`` has a module under ``anymoe/models/hf``.

Writes are atomic: files go to a temporary sibling directory that is renamed into place, so
an interrupted save never leaves a half-written checkpoint under the final name.

Expert parallelism: a model built with an EP dispatcher holds only its local experts.
``save_pretrained`` gathers them over each MoE layer's EP group (``gather_canonical_state``);
a trainer may instead pass the full canonical ``state_dict`` it already has.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anymoe.core.config import ConfigError, load_config, load_yaml, to_dict
from anymoe.models.config import ModelConfig
from anymoe.models.presets import preset_data
from anymoe.models.transformer import MoETransformer

FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ config
def model_config_from_data(data: dict[str, Any], path: str = "model") -> ModelConfig:
    """A ModelConfig from plain data; ``preset: name`` merges the named preset underneath."""
    data = dict(data)
    name = data.pop("preset", None)
    if name is not None:
        from anymoe.models.presets import _merge

        data = _merge(preset_data(name), data)
    return load_config(ModelConfig, data, path)


def _find_up(path: Path, names: tuple[str, ...], levels: int = 2) -> Path | None:
    for folder in [path, *list(path.parents)[:levels]]:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _anymoe_config(path: Path) -> ModelConfig:
    found = _find_up(path, ("config.json", "config.yaml", "config.yml"))
    if found is None:
        raise FileNotFoundError(
            f"{path} holds no config.json or config.yaml (nor do its parents); "
            "is this an anymoe or Hugging Face checkpoint directory?"
        )
    data = json.loads(found.read_text()) if found.suffix == ".json" else load_yaml(found)
    section = data.get("model", data)
    if not isinstance(section, dict):
        raise ConfigError("model", f"{found}: expected a mapping of model settings")
    return model_config_from_data(section)


def _anymoe_weights(path: Path) -> dict[str, Tensor]:
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    if (path / "model.pt").is_file():
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        return state.get("model", state) if isinstance(state, dict) else state
    raise FileNotFoundError(f"{path} has neither model.safetensors nor model.pt")


# ------------------------------------------------------------------------------------------ load
def load_state(model: MoETransformer, state: dict[str, Tensor]) -> None:
    """Load a canonical state dict, with errors that name the tensor at fault."""
    own = model.state_dict()
    if model.cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    for name, value in state.items():
        if name not in own:
            raise ValueError(
                f"tensor {name!r} in the checkpoint does not exist in this model (config mismatch?)"
            )
        if tuple(own[name].shape) != tuple(value.shape) and not _is_sharded_expert(model, name):
            raise ValueError(
                f"tensor {name!r} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(own[name].shape)} in the model built from its config"
            )
    optional = ("router.expert_bias", "lm_head.weight")
    missing = [n for n in own if n not in state and not n.endswith(optional)]
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is missing from the checkpoint ({len(missing)} missing)")
    state = _local_expert_slices(model, state)
    model.load_state_dict(state, strict=False)


def _is_sharded_expert(model: MoETransformer, name: str) -> bool:
    return ".ffn.experts." in name and any(
        layer.experts.num_local < layer.experts.num_experts for layer in model.moe_layers()
    )


def _local_expert_slices(model: MoETransformer, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Full (all-E) expert tensors -> this rank's slice, for a model built with EP > 1."""
    out = dict(state)
    for i, block in enumerate(model.blocks):
        if not block.is_moe:
            continue
        ex = block.ffn.experts
        if ex.num_local == ex.num_experts:
            continue
        for key in (f"blocks.{i}.ffn.experts.{n}" for n in ("w1", "w3", "w13", "w2")):
            if key in out and out[key].shape[0] == ex.num_experts:
                out[key] = out[key][ex.local_offset : ex.local_offset + ex.num_local]
    return out


def from_pretrained(
    path: str | os.PathLike, backend: Any = None, parallel: Any = None, dtype: torch.dtype | None = None
) -> MoETransformer:
    """Load an anymoe or Hugging Face checkpoint directory into a MoETransformer (on the CPU).

    The caller moves it: ``model.to(backend.device())``. ``dtype`` casts after loading.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    from anymoe.models import hf

    if hf.is_hf_dir(path):
        hf_cfg = json.loads((path / "config.json").read_text())
        cfg = hf.architecture(hf_cfg.get("model_type", "")).to_anymoe_config(hf_cfg)
        model = MoETransformer(cfg, backend=backend, parallel=parallel)
        _, state = hf.read_hf(path, expected=_full_shapes(model))
    else:
        cfg = _anymoe_config(path)
        model = MoETransformer(cfg, backend=backend, parallel=parallel)
        state = _anymoe_weights(path)
    load_state(model, state)
    return model.to(dtype) if dtype is not None else model


def _full_shapes(model: MoETransformer) -> dict[str, Tensor]:
    """The canonical shape of every tensor with all E experts (an EP model holds a slice)."""
    shapes = dict(model.state_dict())
    for i, block in enumerate(model.blocks):
        if block.is_moe:
            ex = block.ffn.experts
            for n, v in ex.canonical().items():
                shapes[f"blocks.{i}.ffn.experts.{n}"] = v.new_empty(
                    (ex.num_experts, *v.shape[1:]), device="meta"
                )
    return shapes


# ------------------------------------------------------------------------------------------ save
def gather_canonical_state(model: MoETransformer) -> dict[str, Tensor]:
    """The full canonical state dict on the CPU, experts gathered over each layer's EP group."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.blocks):
        if not block.is_moe or block.ffn.experts.num_local == block.ffn.experts.num_experts:
            continue
        group = block.ffn.ep_group
        if group is None:
            raise RuntimeError(
                f"MoE layer {i} holds {block.ffn.experts.num_local} of "
                f"{block.ffn.experts.num_experts} experts but has no EP group set; "
                "call set_process_groups or pass the gathered state_dict"
            )
        import torch.distributed as dist

        for key in [k for k in state if k.startswith(f"blocks.{i}.ffn.experts.")]:
            local = state[key].contiguous()
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, local, group=group)
            state[key] = torch.cat(parts, dim=0)
    return {k: v.cpu() for k, v in state.items()}


def _write_dir_atomic(path: Path, files: dict[str, Any]) -> None:
    """files: name -> bytes or a callable(path) that writes the file. Temp dir, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        for name, content in files.items():
            target = tmp / name
            if callable(content):
                content(target)
            else:
                target.write_bytes(content)
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _safetensors_writer(tensors: dict[str, Tensor], metadata: dict[str, str]):
    from safetensors.torch import save_file

    return lambda target: save_file(tensors, str(target), metadata=metadata)


def save_pretrained(
    model: MoETransformer,
    path: str | os.PathLike,
    format: str = "anymoe",
    state_dict: dict[str, Tensor] | None = None,
    hf_arch: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` as an anymoe (default) or Hugging Face (``format="hf"``) checkpoint directory.

    state_dict: a full canonical state dict to write instead of gathering from ``model``.
    Under torch.distributed every rank must call this (the expert gather is collective); rank 0 writes.
    hf_arch: the Hugging Face model_type (default: the one that expresses the config).
    dtype: cast floating tensors (e.g. torch.bfloat16) on the way out.
    """
    path = Path(path)
    cfg: ModelConfig = model.cfg
    state = state_dict if state_dict is not None else gather_canonical_state(model)
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in state.items()
    }
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    out_dtype = dtype or next(iter(state.values())).dtype
    if format == "anymoe":
        config = {"anymoe_format": FORMAT_VERSION, "model": to_dict(cfg)}
        files = {
            "config.json": json.dumps(config, indent=2).encode(),
            "model.safetensors": _safetensors_writer(state, {"format": "pt"}),
        }
    elif format == "hf":
        from anymoe.models import hf

        arch = hf.architecture(hf_arch or hf.default_architecture(cfg))
        config = hf.hf_config_json(arch, cfg, out_dtype)
        tensors = hf.to_hf_state(arch, cfg, state)
        files = {
            "config.json": json.dumps(config, indent=2).encode(),
            "model.safetensors": _safetensors_writer(tensors, {"format": "pt"}),
        }
    else:
        raise ConfigError("format", f"unknown checkpoint format {format!r}; use anymoe or hf")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        _write_dir_atomic(path, files)  # every rank gathered (collective); one writes
    return path


__all__ = [
    "from_pretrained",
    "gather_canonical_state",
    "load_state",
    "model_config_from_data",
    "save_pretrained",
]
