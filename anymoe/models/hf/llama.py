"""Dense Llama (``model_type: llama``) and Qwen2 (``qwen2``) checkpoints: the sources of upcycling.

They load as anymoe dense models (``moe: null``, every layer a SwiGLU MLP of ``dense_hidden``),
which ``anymoe.models.upcycle`` turns into MoE models. Qwen2 has q/k/v biases; Llama's
``attention_bias`` adds o_proj's too.
"""

from __future__ import annotations

from typing import Any

from anymoe.core.config import ConfigError, load_config
from anymoe.models.config import ModelConfig
from anymoe.models.hf.base import (
    HFArchitecture,
    Link,
    base_anymoe_config,
    base_hf_config,
    check_no_sliding_window,
    common_links,
    dense_mlp_links,
    need,
    register_architecture,
)


def _dense_config(hf: dict[str, Any], bias: str) -> ModelConfig:
    check_no_sliding_window(hf)
    if hf.get("mlp_bias"):
        raise ConfigError("config.json:mlp_bias", "MLP biases are not supported")
    data = base_anymoe_config(hf)
    data.update({"attention_bias": bias, "dense_hidden": need(hf, "intermediate_size"), "moe": None})
    return load_config(ModelConfig, data, "model")


def _check_dense(cfg: ModelConfig, arch: str) -> None:
    if cfg.moe is not None:
        raise ConfigError(
            "model.moe",
            f"{arch} is a dense architecture; export MoE models as mixtral, "
            "qwen2_moe, qwen3_moe or deepseek_v3",
        )
    for field in ("sandwich_norm", "qk_norm"):
        if getattr(cfg, field):
            raise ConfigError(f"model.{field}", f"cannot be written as Hugging Face {arch!r}")
    if cfg.attention != "gqa":
        raise ConfigError("model.attention", f"{arch} uses gqa attention")


class _Dense(HFArchitecture):
    def links(self, cfg: ModelConfig) -> list[Link]:
        out = common_links(cfg)
        for i in range(cfg.n_layers):
            out += dense_mlp_links(i)
        return out


@register_architecture
class Llama(_Dense):
    model_type = "llama"
    hf_class = "LlamaForCausalLM"

    def to_anymoe_config(self, hf: dict[str, Any]) -> ModelConfig:
        return _dense_config(hf, "all" if hf.get("attention_bias") else "none")

    def to_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        _check_dense(cfg, self.model_type)
        if cfg.attention_bias == "qkv":
            raise ConfigError("model.attention_bias", "llama has all four biases or none; export as qwen2")
        out = base_hf_config(cfg)
        out.update(
            {
                "head_dim": cfg.dim_per_head,
                "intermediate_size": cfg.dense_hidden,
                "attention_bias": cfg.attention_bias == "all",
                "mlp_bias": False,
            }
        )
        return out


@register_architecture
class Qwen2(_Dense):
    model_type = "qwen2"
    hf_class = "Qwen2ForCausalLM"

    def to_anymoe_config(self, hf: dict[str, Any]) -> ModelConfig:
        return _dense_config(hf, "qkv")

    def to_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        _check_dense(cfg, self.model_type)
        if cfg.attention_bias != "qkv":
            raise ConfigError(
                "model.attention_bias", "qwen2 always has q/k/v biases; set attention_bias: qkv"
            )
        out = base_hf_config(cfg)
        out.update(
            {"intermediate_size": cfg.dense_hidden, "use_sliding_window": False, "sliding_window": None}
        )
        return out
