"""DeepSeek-V3 (``model_type: deepseek_v3``): multi-head latent attention, first k layers dense,
sigmoid-scored, group-limited routing with the auxiliary-loss-free selection bias
(``e_score_correction_bias``), renormalised weights times ``routed_scaling_factor``, plus
ungated shared experts.

Supported subset: the default RoPE (the released DeepSeek-V3 weights use YaRN scaling: refused
with a clear error), ``topk_method: noaux_tc``, SwiGLU; the multi-token-prediction layers
(``model.layers.{n_layers}...``) are skipped on load, as transformers does.
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
    common_links,
    dense_mlp_links,
    expert_links,
    need,
    register_architecture,
    shared_links,
)
from anymoe.models.hf.checks import check_exportable


@register_architecture
class DeepseekV3(HFArchitecture):
    model_type = "deepseek_v3"
    hf_class = "DeepseekV3ForCausalLM"

    def to_anymoe_config(self, hf: dict[str, Any]) -> ModelConfig:
        if hf.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ConfigError(
                "config.json:topk_method", f"{hf['topk_method']!r} is not supported; only noaux_tc"
            )
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise ConfigError("config.json:scoring_func", "only sigmoid scoring (DeepSeek-V3) is supported")
        if (hf.get("moe_layer_freq") or 1) != 1:
            raise ConfigError(
                "config.json:moe_layer_freq", "only 1 (every layer after the dense ones) is supported"
            )
        data = base_anymoe_config(hf)
        H = data["n_heads"]
        data["n_kv_heads"] = None  # MLA: every head has its own keys and values
        data["head_dim"] = None if data["d_model"] % H == 0 else need(hf, "v_head_dim")
        data["attention"] = "mla"
        data["attention_bias"] = "all" if hf.get("attention_bias", False) else "none"
        data["mla"] = {
            "q_lora_rank": int(hf.get("q_lora_rank") or 0),
            "kv_lora_rank": need(hf, "kv_lora_rank"),
            "qk_nope_head_dim": need(hf, "qk_nope_head_dim"),
            "qk_rope_head_dim": need(hf, "qk_rope_head_dim"),
            "v_head_dim": need(hf, "v_head_dim"),
            "rope_interleave": bool(hf.get("rope_interleave", True)),
        }
        data["first_dense_layers"] = int(hf.get("first_k_dense_replace", 0))
        if data["first_dense_layers"]:
            data["dense_hidden"] = need(hf, "intermediate_size")
        groups = int(hf.get("n_group") or 1)
        router = {
            "kind": "group_limited" if groups > 1 else "topk",
            "score": "sigmoid",
            "normalize_topk": bool(hf.get("norm_topk_prob", True)),
            "scaling": float(hf.get("routed_scaling_factor", 1.0)),
        }
        if groups > 1:
            router.update(
                {"n_groups": groups, "topk_groups": int(need(hf, "topk_group")), "group_score": "top2_sum"}
            )
        data["moe"] = {
            "num_experts": need(hf, "n_routed_experts"),
            "top_k": need(hf, "num_experts_per_tok"),
            "expert_hidden": need(hf, "moe_intermediate_size"),
            "shared_experts": int(hf.get("n_shared_experts") or 0),
            "router": router,
            "balance": {"aux_free": True},
        }
        return load_config(ModelConfig, data, "model")

    def to_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        check_exportable(
            cfg,
            self.model_type,
            attention="mla",
            qk_norm=False,
            attention_bias=("none", "all"),
            score="sigmoid",
            normalize=None,
            shared="plain",
            first_dense=True,
            router_kinds=("topk", "group_limited"),
            scaling=True,
        )
        r, m, a = cfg.moe.router, cfg.moe, cfg.mla
        if r.kind == "group_limited" and r.group_score != "top2_sum":
            raise ConfigError("model.moe.router.group_score", "DeepSeek-V3 scores groups by top2_sum")
        if not m.balance.aux_free:
            raise ConfigError(
                "model.moe.balance.aux_free",
                "DeepSeek-V3 always applies the selection bias; "
                "set aux_free: true (a zero bias changes nothing)",
            )
        out = base_hf_config(cfg)
        out.update(
            {
                "num_key_value_heads": cfg.n_heads,
                "head_dim": a.qk_rope_head_dim,
                "q_lora_rank": a.q_lora_rank or None,
                "kv_lora_rank": a.kv_lora_rank,
                "qk_nope_head_dim": a.qk_nope_head_dim,
                "qk_rope_head_dim": a.qk_rope_head_dim,
                "v_head_dim": a.v_head_dim,
                "rope_interleave": a.rope_interleave,
                "attention_bias": cfg.attention_bias == "all",
                "first_k_dense_replace": cfg.first_dense_layers,
                "intermediate_size": cfg.dense_hidden or m.expert_hidden,
                "moe_intermediate_size": m.expert_hidden,
                "n_routed_experts": m.num_experts,
                "num_experts_per_tok": m.top_k,
                "n_shared_experts": m.shared_experts,
                "n_group": r.n_groups if r.kind == "group_limited" else 1,
                "topk_group": r.topk_groups if r.kind == "group_limited" else 1,
                "norm_topk_prob": r.normalize_topk,
                "routed_scaling_factor": r.scaling,
                "topk_method": "noaux_tc",
                "scoring_func": "sigmoid",
                "num_nextn_predict_layers": 0,
            }
        )
        return out

    def links(self, cfg: ModelConfig) -> list[Link]:
        out = common_links(cfg)
        for i in range(cfg.n_layers):
            if not cfg.is_moe_layer(i):
                out += dense_mlp_links(i)
                continue
            pre = f"model.layers.{i}.mlp."
            out += [
                Link(f"blocks.{i}.ffn.router.weight", (pre + "gate.weight",)),
                Link(f"blocks.{i}.ffn.router.expert_bias", (pre + "gate.e_score_correction_bias",)),
            ]
            out += expert_links(
                cfg, i, pre + "experts.", ("gate_proj", "up_proj", "down_proj"), cfg.moe.fused_w13
            )
            out += shared_links(i, pre + "shared_experts.")
        return out

    def ignored(self, name: str, cfg: ModelConfig) -> bool:
        if super().ignored(name, cfg):
            return True
        # Multi-token-prediction modules sit after the last decoder layer; transformers skips them too.
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) >= cfg.n_layers
        return False
