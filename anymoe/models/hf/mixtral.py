"""Mixtral (``model_type: mixtral``): GQA attention, 8 softmax-routed experts, top-2 renormalised.

Hugging Face names: ``model.layers.{i}.block_sparse_moe.gate.weight`` (router) and
``...block_sparse_moe.experts.{e}.w1|w3|w2.weight`` (gate | up | down of expert e).
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
    expert_links,
    need,
    register_architecture,
)
from anymoe.models.hf.checks import check_exportable


@register_architecture
class Mixtral(HFArchitecture):
    model_type = "mixtral"
    hf_class = "MixtralForCausalLM"
    expert_names = ("w1", "w3", "w2")
    moe_module = "block_sparse_moe"

    def to_anymoe_config(self, hf: dict[str, Any]) -> ModelConfig:
        check_no_sliding_window(hf)
        data = base_anymoe_config(hf)
        data["moe"] = {
            "num_experts": need(hf, "num_local_experts"),
            "top_k": need(hf, "num_experts_per_tok"),
            "expert_hidden": need(hf, "intermediate_size"),
            # Mixtral: softmax over all experts, top-2, renormalised (== softmax over the two logits).
            "router": {"kind": "topk", "score": "softmax", "normalize_topk": True},
            "balance": {"aux_loss": float(hf.get("router_aux_loss_coef", 0.0) or 0.0)},
        }
        return load_config(ModelConfig, data, "model")

    def to_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        check_exportable(
            cfg,
            self.model_type,
            attention="gqa",
            qk_norm=False,
            attention_bias=("none",),
            score="softmax",
            normalize=True,
            shared=False,
            first_dense=False,
        )
        out = base_hf_config(cfg)
        out.update(
            {
                "head_dim": cfg.dim_per_head,
                "intermediate_size": cfg.moe.expert_hidden,
                "num_local_experts": cfg.moe.num_experts,
                "num_experts_per_tok": cfg.moe.top_k,
                "router_aux_loss_coef": cfg.moe.balance.aux_loss,
                "router_jitter_noise": 0.0,
                "sliding_window": None,
                "output_router_logits": False,
            }
        )
        return out

    def links(self, cfg: ModelConfig) -> list[Link]:
        out = common_links(cfg)
        for i in range(cfg.n_layers):
            pre = f"model.layers.{i}.block_sparse_moe."
            out.append(Link(f"blocks.{i}.ffn.router.weight", (pre + "gate.weight",)))
            out += expert_links(cfg, i, pre + "experts.", ("w1", "w3", "w2"), cfg.moe.fused_w13)
        return out
