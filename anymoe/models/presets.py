"""Named model shapes. Each preset is plain config data, loaded through the same ``load_config``
as a YAML ``model:`` section, so a preset and a YAML file can never disagree on a field.

    tiny                trains in seconds on a CPU (tests, CI, parity runs)
    small               94M total / 16M active, for quick CPU/GPU experiments
    mixtral-style       8 experts, top-2, softmax then renormalised top-2 (Mixtral 8x7B, scaled down)
    deepseek-moe-style  fine-grained routed experts + shared experts, sigmoid router, group-limited
                        top-k, auxiliary-loss-free bias, MLA attention, first layer dense (DeepSeek-V3)
    qwen3-moe-style     128 fine-grained experts, top-8 renormalised, qk-norm, no shared expert (Qwen3-MoE)
    moe-1b              the GPU benchmark model: d=1024, 12 layers, 16 heads / 4 KV heads, 64 experts,
                        top-8, expert hidden 512, vocab 32000, untied: 1.306B total, 216M active

``preset(name, **overrides)`` returns a ModelConfig; ``preset_data(name)`` the raw mapping, for a
trainer that merges a YAML ``model:`` section over a preset.
"""

from __future__ import annotations

import copy
from typing import Any

from anymoe.core.config import ConfigError, load_config
from anymoe.models.config import ModelConfig

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128,
        "moe": {"num_experts": 8, "top_k": 2, "expert_hidden": 64,
                "router": {"kind": "topk", "score": "softmax", "normalize_topk": True},
                "balance": {"aux_loss": 0.01, "z_loss": 0.001}},
    },
    "small": {
        "vocab_size": 8192, "d_model": 384, "n_layers": 6, "n_heads": 6, "n_kv_heads": 2, "max_seq_len": 1024,
        "moe": {"num_experts": 16, "top_k": 2, "expert_hidden": 768,
                "router": {"kind": "topk", "score": "softmax", "normalize_topk": True},
                "balance": {"aux_loss": 0.01, "z_loss": 0.001}},
    },
    "mixtral-style": {
        "vocab_size": 32000, "d_model": 1024, "n_layers": 16, "n_heads": 16, "n_kv_heads": 4,
        "rope_theta": 1.0e6, "norm_eps": 1.0e-5, "max_seq_len": 4096,
        "moe": {"num_experts": 8, "top_k": 2, "expert_hidden": 3584,
                "router": {"kind": "topk", "score": "softmax", "normalize_topk": True},
                "balance": {"aux_loss": 0.02}},
    },
    "deepseek-moe-style": {
        "vocab_size": 32000, "d_model": 1024, "n_layers": 12, "n_heads": 16, "first_dense_layers": 1,
        "dense_hidden": 2816, "max_seq_len": 4096, "attention": "mla",
        "mla": {"q_lora_rank": 384, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
                "v_head_dim": 64},
        "moe": {"num_experts": 64, "top_k": 6, "expert_hidden": 352, "shared_experts": 2,
                "router": {"kind": "group_limited", "score": "sigmoid", "normalize_topk": True,
                           "scaling": 2.5, "n_groups": 8, "topk_groups": 3, "group_score": "top2_sum"},
                "balance": {"aux_free": True, "bias_update_rate": 1.0e-3, "seq_aux_loss": 1.0e-4}},
    },
    "qwen3-moe-style": {
        "vocab_size": 32000, "d_model": 1024, "n_layers": 12, "n_heads": 16, "n_kv_heads": 4, "head_dim": 64,
        "qk_norm": True, "rope_theta": 1.0e6, "max_seq_len": 4096,
        "moe": {"num_experts": 128, "top_k": 8, "expert_hidden": 384,
                "router": {"kind": "topk", "score": "softmax", "normalize_topk": True},
                "balance": {"aux_loss": 0.001, "global_batch": True}},
    },
    "moe-1b": {
        "vocab_size": 32000, "d_model": 1024, "n_layers": 12, "n_heads": 16, "n_kv_heads": 4, "head_dim": 64,
        "tie_embeddings": False, "max_seq_len": 4096,
        "moe": {"num_experts": 64, "top_k": 8, "expert_hidden": 512, "fused_w13": True,
                "router": {"kind": "topk", "score": "softmax", "normalize_topk": True},
                "balance": {"aux_loss": 0.01, "z_loss": 0.001}},
    },
}


def preset_data(name: str) -> dict[str, Any]:
    """A deep copy of preset ``name`` as plain data."""
    if name not in PRESETS:
        raise ConfigError("model.preset", f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset(name: str, **overrides: Any) -> ModelConfig:
    """ModelConfig of preset ``name``; keyword overrides merge into it (nested dicts merge too)."""
    return load_config(ModelConfig, _merge(preset_data(name), overrides), "model")


__all__ = ["PRESETS", "preset", "preset_data"]
