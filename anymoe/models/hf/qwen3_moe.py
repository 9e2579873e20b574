"""Qwen3-MoE (``model_type: qwen3_moe``): GQA with per-head q/k RMSNorm, softmax top-k routed
experts (renormalised when ``norm_topk_prob``), no shared expert.

Hugging Face names as Qwen2-MoE, plus ``self_attn.q_norm|k_norm.weight``.
"""

from __future__ import annotations

from typing import Any

from anymoe.core.config import load_config
from anymoe.models.config import ModelConfig
from anymoe.models.hf.base import (
    HFArchitecture,
    Link,
    base_anymoe_config,
    base_hf_config,
    check_no_sliding_window,
    common_links,
    first_dense_from_layout,
    need,
    register_architecture,
)
from anymoe.models.hf.checks import check_exportable
from anymoe.models.hf.qwen2_moe import qwen_layout, qwen_moe_links, qwen_moe_section


@register_architecture
class Qwen3Moe(HFArchitecture):
    model_type = "qwen3_moe"
    hf_class = "Qwen3MoeForCausalLM"

    def to_anymoe_config(self, hf: dict[str, Any]) -> ModelConfig:
        check_no_sliding_window(hf)
        data = base_anymoe_config(hf)
        data["qk_norm"] = True
        data["attention_bias"] = "all" if hf.get("attention_bias", False) else "none"
        data["first_dense_layers"] = first_dense_from_layout(hf, data["n_layers"])
        if data["first_dense_layers"]:
            data["dense_hidden"] = need(hf, "intermediate_size")
        data["moe"] = qwen_moe_section(hf)
        return load_config(ModelConfig, data, "model")

    def to_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        check_exportable(
            cfg,
            self.model_type,
            attention="gqa",
            qk_norm=True,
            attention_bias=("none", "all"),
            score="softmax",
            normalize=None,
            shared=False,
            first_dense=True,
        )
        out = base_hf_config(cfg)
        out.update(qwen_layout(cfg))
        out.update({"head_dim": cfg.dim_per_head, "attention_bias": cfg.attention_bias == "all"})
        return out

    def links(self, cfg: ModelConfig) -> list[Link]:
        out = common_links(cfg)
        for i in range(cfg.n_layers):
            out += qwen_moe_links(cfg, i)
        return out
