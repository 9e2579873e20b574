"""Shared machinery of the Hugging Face architecture modules: tensor links and the registry.

An architecture module says two things, both ways:
- config: ``to_anymoe_config(hf: dict) -> ModelConfig`` and ``to_hf_config(cfg) -> dict``;
- tensors: ``links(cfg)``, a list of :class:`Link` records, each tying one anymoe state-dict
  tensor to one or more Hugging Face tensors and saying how to turn one into the other.

Everything else (reading safetensors, checking every shape, naming the tensor at fault,
refusing leftovers) is done once, here and in ``hf/__init__.py``.

Expert layout: anymoe stores experts stacked, w1/w3 [E, D, F] and w2 [E, F, D] (x @ w); a
Hugging Face checkpoint stores one ``nn.Linear`` per expert, weight [F, D] (x @ W^T). So
w1[e] = gate_proj_e.weight^T, w3[e] = up_proj_e.weight^T, w2[e] = down_proj_e.weight^T.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from anymoe.core.config import ConfigError
from anymoe.models.config import ModelConfig


@dataclass(frozen=True)
class Link:
    """anymoe tensor ``ours`` <-> Hugging Face tensors ``theirs``.

    kind:
      copy       one tensor, same layout
      t          one tensor, transposed (a Linear weight [out, in] <-> our [in, out])
      row        one tensor, [1, D] there, [D] here (Qwen2-MoE shared-expert gate)
      stack_t    E tensors [F, D] (or [D, F]) there, transposed and stacked [E, D, F] here
      stack2_t   2E tensors (gate_e, up_e) there, stacked and concatenated [E, D, 2F] here (fused w13)
    """

    ours: str
    theirs: tuple[str, ...]
    kind: str = "copy"

    def to_ours(self, tensors: list[Tensor]) -> Tensor:
        if self.kind == "copy":
            return tensors[0]
        if self.kind == "t":
            return tensors[0].t().contiguous()
        if self.kind == "row":
            return tensors[0].reshape(-1)
        if self.kind == "stack_t":
            return torch.stack([w.t() for w in tensors]).contiguous()
        if self.kind == "stack2_t":
            E = len(tensors) // 2
            gate = torch.stack([w.t() for w in tensors[:E]])
            up = torch.stack([w.t() for w in tensors[E:]])
            return torch.cat([gate, up], dim=-1).contiguous()
        raise AssertionError(self.kind)

    def to_theirs(self, value: Tensor) -> list[Tensor]:
        if self.kind == "copy":
            return [value.contiguous()]
        if self.kind == "t":
            return [value.t().contiguous()]
        if self.kind == "row":
            return [value.reshape(1, -1).contiguous()]
        if self.kind == "stack_t":
            return [w.t().contiguous() for w in value]
        if self.kind == "stack2_t":
            F = value.shape[-1] // 2
            return [w.t().contiguous() for w in value[..., :F]] + [w.t().contiguous() for w in value[..., F:]]
        raise AssertionError(self.kind)


class HFArchitecture(ABC):
    """One Hugging Face ``model_type``: config mapping and tensor links, both ways."""

    model_type: str
    hf_class: str  # the transformers class name written to config.json "architectures"

    @abstractmethod
    def to_anymoe_config(self, hf: dict[str, Any]) -> ModelConfig:
        """The ModelConfig of a Hugging Face config.json; ConfigError for what anymoe cannot express."""

    @abstractmethod
    def to_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        """config.json data for ``cfg``; ConfigError when this architecture cannot express ``cfg``."""

    @abstractmethod
    def links(self, cfg: ModelConfig) -> list[Link]:
        """Every tensor of the model, anymoe name <-> Hugging Face names."""

    # Per-expert names of the gate / up / down projections, and the module holding experts and router.
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    moe_module: str = "mlp"

    def unfuse(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """transformers >= 5 in-memory layout -> the per-expert layout the links use.

        ``{layer}.mlp.experts.gate_up_proj`` [E, 2F, D] (gate rows, then up rows) and
        ``.down_proj`` [E, D, F] become ``{layer}.{moe_module}.experts.{e}.{gate|up|down}.weight``;
        ``{layer}.mlp.gate.*`` moves under ``moe_module`` too (Mixtral's ``block_sparse_moe``).
        """
        fused = [k for k in tensors if k.endswith(".mlp.experts.gate_up_proj")]
        if not fused:
            return tensors
        out = dict(tensors)
        gate_n, up_n, down_n = self.expert_names
        for key in fused:
            layer = key[: -len(".mlp.experts.gate_up_proj")]
            dst = f"{layer}.{self.moe_module}."
            gate_up, down = out.pop(key), out.pop(f"{layer}.mlp.experts.down_proj")
            half = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                out[f"{dst}experts.{e}.{gate_n}.weight"] = gate_up[e, :half]
                out[f"{dst}experts.{e}.{up_n}.weight"] = gate_up[e, half:]
                out[f"{dst}experts.{e}.{down_n}.weight"] = down[e]
            if self.moe_module != "mlp":
                for name in [k for k in out if k.startswith(f"{layer}.mlp.gate.")]:
                    out[dst + name[len(f"{layer}.mlp."):]] = out.pop(name)
        return out

    def ignored(self, name: str, cfg: ModelConfig) -> bool:
        """Checkpoint tensors anymoe does not use (e.g. rotary caches); never silently dropped otherwise."""
        # A tied head is the embedding; some checkpoints store the copy anyway.
        return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_embeddings)


ARCHITECTURES: dict[str, HFArchitecture] = {}


def register_architecture(cls: type[HFArchitecture]) -> type[HFArchitecture]:
    """Class decorator: add an architecture under its ``model_type``; duplicates are a bug."""
    if cls.model_type in ARCHITECTURES:
        raise ValueError(f"Hugging Face model_type {cls.model_type!r} is registered twice")
    ARCHITECTURES[cls.model_type] = cls()
    return cls


# ---------------------------------------------------------------------------------- config helpers
def need(hf: dict[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"config.json:{key}", "is missing; this checkpoint's config.json is incomplete")
    return hf[key]


def rope_theta(hf: dict[str, Any], default: float = 10000.0) -> float:
    """RoPE base from ``rope_parameters`` (transformers >= 5) or ``rope_theta``; only plain RoPE."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in (None, "default"):
        raise ConfigError(
            "config.json:rope_parameters.rope_type",
            f"RoPE scaling {kind!r} is not supported by anymoe; only the default RoPE is",
        )
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


def check_silu(hf: dict[str, Any]) -> None:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(
            "config.json:hidden_act", f"{act!r} is not supported; anymoe experts are SwiGLU (silu)"
        )


def check_no_sliding_window(hf: dict[str, Any]) -> None:
    if hf.get("use_sliding_window") or (hf.get("sliding_window") and "use_sliding_window" not in hf):
        raise ConfigError(
            "config.json:sliding_window",
            "sliding-window attention is not supported; anymoe attends over the full context",
        )


def first_dense_from_layout(hf: dict[str, Any], n_layers: int) -> int:
    """Qwen-MoE's mlp_only_layers / decoder_sparse_step as anymoe's "first N layers dense"."""
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = sorted(set(hf.get("mlp_only_layers") or []) | {i for i in range(n_layers) if (i + 1) % step})
    if dense != list(range(len(dense))):
        raise ConfigError(
            "config.json:mlp_only_layers",
            f"dense layers {dense} are not the first N layers; anymoe supports first_dense_layers only",
        )
    return len(dense)


def base_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def base_anymoe_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The fields every decoder shares, as ModelConfig data."""
    check_silu(hf)
    return {
        "vocab_size": need(hf, "vocab_size"),
        "d_model": need(hf, "hidden_size"),
        "n_layers": need(hf, "num_hidden_layers"),
        "n_heads": need(hf, "num_attention_heads"),
        "n_kv_heads": hf.get("num_key_value_heads") or need(hf, "num_attention_heads"),
        "head_dim": hf.get("head_dim"),
        "rope_theta": rope_theta(hf),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "max_seq_len": int(hf.get("max_position_embeddings", 2048)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(field, message)


# ---------------------------------------------------------------------------------- tensor helpers
def common_links(cfg: ModelConfig, mla_names: bool = False) -> list[Link]:
    """Embedding, final norm, head, per-layer norms and attention (names shared by all decoders)."""
    out = [Link("embed.weight", ("model.embed_tokens.weight",)), Link("norm.weight", ("model.norm.weight",))]
    if not cfg.tie_embeddings:
        out.append(Link("lm_head.weight", ("lm_head.weight",)))
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out.append(Link(ours + "attn_norm.weight", (theirs + "input_layernorm.weight",)))
        out.append(Link(ours + "ffn_norm.weight", (theirs + "post_attention_layernorm.weight",)))
        names = _mla_tensors(cfg) if cfg.attention == "mla" else _gqa_tensors(cfg)
        out += [Link(ours + "attn." + n, (theirs + "self_attn." + n,)) for n in names]
    return out


def _gqa_tensors(cfg: ModelConfig) -> list[str]:
    names = [f"{p}_proj.weight" for p in "qkvo"]
    if cfg.attention_bias in ("qkv", "all"):
        names += [f"{p}_proj.bias" for p in "qkv"]
    if cfg.attention_bias == "all":
        names.append("o_proj.bias")
    if cfg.qk_norm:
        names += ["q_norm.weight", "k_norm.weight"]
    return names


def _mla_tensors(cfg: ModelConfig) -> list[str]:
    m = cfg.mla
    bias = cfg.attention_bias != "none"
    names = ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"]
    names += ["kv_a_proj_with_mqa.bias", "o_proj.bias"] if bias else []
    if m.q_lora_rank > 0:
        names += ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"]
        names += ["q_a_proj.bias"] if bias else []
    else:
        names.append("q_proj.weight")
    return names


def dense_mlp_links(i: int, prefix: str = "mlp.") -> list[Link]:
    ours, theirs = f"blocks.{i}.ffn.", f"model.layers.{i}.{prefix}"
    return [Link(ours + f"{p}_proj.weight", (theirs + f"{p}_proj.weight",)) for p in ("gate", "up", "down")]


def expert_links(
    cfg: ModelConfig, i: int, theirs: str, names: tuple[str, str, str], fused_w13: bool = False
) -> list[Link]:
    """Stacked experts of layer i <-> per-expert Linear weights ``{theirs}{e}.{gate|up|down}.weight``."""
    E = cfg.moe.num_experts
    gate, up, down = ([f"{theirs}{e}.{n}.weight" for e in range(E)] for n in names)
    ours = f"blocks.{i}.ffn.experts."
    if fused_w13:
        return [Link(ours + "w13", tuple(gate + up), "stack2_t"), Link(ours + "w2", tuple(down), "stack_t")]
    return [
        Link(ours + "w1", tuple(gate), "stack_t"),
        Link(ours + "w3", tuple(up), "stack_t"),
        Link(ours + "w2", tuple(down), "stack_t"),
    ]


def shared_links(i: int, theirs: str, gate: str | None = None) -> list[Link]:
    """Shared experts (one SwiGLU of hidden n_shared * F) <-> a Hugging Face MLP module."""
    ours = f"blocks.{i}.ffn.shared."
    out = [
        Link(ours + "w1", (theirs + "gate_proj.weight",), "t"),
        Link(ours + "w3", (theirs + "up_proj.weight",), "t"),
        Link(ours + "w2", (theirs + "down_proj.weight",), "t"),
    ]
    if gate is not None:
        out.append(Link(ours + "gate", (gate,), "row"))
    return out


LinkFactory = Callable[[ModelConfig], list[Link]]

__all__ = [
    "ARCHITECTURES",
    "HFArchitecture",
    "Link",
    "base_anymoe_config",
    "base_hf_config",
    "check_no_sliding_window",
    "common_links",
    "dense_mlp_links",
    "expert_links",
    "first_dense_from_layout",
    "need",
    "register_architecture",
    "require",
    "rope_theta",
    "shared_links",
]
