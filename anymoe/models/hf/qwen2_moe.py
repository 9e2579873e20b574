"""Qwen2-MoE (``model_type: qwen2_moe``): GQA with q/k/v biases, softmax top-k (optionally
renormalised) routed experts plus one shared expert behind a sigmoid gate.

Hugging Face names: ``mlp.gate.weight`` (router), ``mlp.experts.{e}.gate_proj|up_proj|down_proj``,
``mlp.shared_expert.*`` and ``mlp.shared_expert_gate.weight`` [1, D]; dense layers ``mlp.*_proj``.
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
    dense_mlp_links,
    expert_links,
    first_dense_from_layout,
    need,
    register_architecture,
    shared_links,
)
from anymoe.models.hf.checks import check_exportable


def qwen_moe_section(hf: dict[str, Any]) -> dict[str, Any]:
    return {
        # transformers >= 5 writes Qwen3-MoE's expert count as num_local_experts
        "num_experts": hf.get("num_experts") or need(hf, "num_local_experts"),
        "top_k": need(hf, "num_experts_per_tok"),
        "expert_hidden": need(hf, "moe_intermediate_size"),
        "router": {
            "kind": "topk",
            "score": "softmax",
            "normalize_topk": bool(hf.get("norm_topk_prob", False)),
        },
        "balance": {"aux_loss": float(hf.get("router_aux_loss_coef", 0.0) or 0.0)},
    }


def qwen_layout(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    return {
        "moe_intermediate_size": m.expert_hidden,
        "num_experts": m.num_experts,
        "num_local_experts": m.num_experts,
        "num_experts_per_tok": m.top_k,
        "norm_topk_prob": m.router.normalize_topk,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(cfg.first_dense_layers)),
        "intermediate_size": cfg.dense_hidden or m.expert_hidden,
        "router_aux_loss_coef": m.balance.aux_loss,
        "use_sliding_window": False,
        "sliding_window": None,
        "output_router_logits": False,
    }


def qwen_moe_links(cfg: ModelConfig, i: int) -> list[Link]:
    pre = f"model.layers.{i}.mlp."
    if not cfg.is_moe_layer(i):
        return dense_mlp_links(i)
    return [Link(f"blocks.{i}.ffn.router.weight", (pre + "gate.weight",))] + expert_links(
        cfg, i, pre + "experts.", ("gate_proj", "up_proj", "down_proj"), cfg.moe.fused_w13
    )


@register_architecture
class Qwen2Moe(HFArchitecture):
    model_type = "qwen2_moe"
    hf_class = "Qwen2MoeForCausalLM"

    def to_anymoe_config(self, hf: dict[str, Any]) -> ModelConfig:
        check_no_sliding_window(hf)
        data = base_anymoe_config(hf)
        data["attention_bias"] = "qkv" if hf.get("qkv_bias", True) else "none"
        data["first_dense_layers"] = first_dense_from_layout(hf, data["n_layers"])
        if data["first_dense_layers"]:
            data["dense_hidden"] = need(hf, "intermediate_size")
        data["moe"] = qwen_moe_section(hf)
        shared = int(hf.get("shared_expert_intermediate_size") or 0)
        if shared:
            data["moe"].update({"shared_experts": 1, "shared_hidden": shared, "shared_gate": True})
        return load_config(ModelConfig, data, "model")

    def to_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        check_exportable(
            cfg,
            self.model_type,
            attention="gqa",
            qk_norm=False,
            attention_bias=("qkv",),
            score="softmax",
            normalize=None,
            shared="gated",
            first_dense=True,
        )
        out = base_hf_config(cfg)
        out.update(qwen_layout(cfg))
        m = cfg.moe
        out.update(
            {
                "shared_expert_intermediate_size": m.shared_experts * (m.shared_hidden or m.expert_hidden),
                "qkv_bias": True,
            }
        )
        return out

    def links(self, cfg: ModelConfig) -> list[Link]:
        out = common_links(cfg)
        for i in range(cfg.n_layers):
            out += qwen_moe_links(cfg, i)
            if cfg.is_moe_layer(i):
                pre = f"model.layers.{i}.mlp."
                out += shared_links(i, pre + "shared_expert.", gate=pre + "shared_expert_gate.weight")
        return out
