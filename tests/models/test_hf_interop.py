"""Hugging Face interop against transformers' own classes (tiny random models, no network).

For Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3: a transformers model saved with
save_pretrained loads through anymoe.models.from_pretrained with the same logits (fp32, max
abs diff <= 1e-4), and anymoe -> HF -> transformers gives the same logits too. Plus the
anymoe format round trip and the errors for unsupported or mismatched checkpoints.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from anymoe.core.config import ConfigError, load_config  # noqa: E402
from anymoe.core.sizing import POW2  # noqa: E402
from anymoe.models import ModelConfig, MoETransformer, from_pretrained, save_pretrained  # noqa: E402
from anymoe.models.hf import CheckpointMismatch  # noqa: E402

TOL = 1e-4
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)

HF_CASES = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=24, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[0],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            num_key_value_heads=4,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=2.5,
        ),
    ),
}


def _hf_model(kind):
    cfg_cls, model_cls, kw = HF_CASES[kind]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**COMMON, **kw)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # a non-zero selection bias, so its mapping is exercised
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith(
                (
                    "shared_expert_gate.weight",
                    "q_norm.weight",
                    "k_norm.weight",
                    "layernorm.weight",
                    "norm.weight",
                )
            ):
                p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0, 0.2)
    return model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", list(HF_CASES))
def test_transformers_checkpoint_loads_with_same_logits(kind, tmp_path):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf").eval()
    for S in (5, 13):
        ids = torch.randint(0, 64, (2, S))
        with torch.no_grad():
            diff = (ours(ids) - _hf_logits(hf, ids)).abs().max().item()
        assert diff <= TOL, f"{kind} S={S}: max abs diff {diff}"
    # And back: anymoe -> HF directory -> transformers' own class.
    save_pretrained(ours, tmp_path / "back", format="hf", hf_arch=kind)
    again = getattr(transformers, HF_CASES[kind][1]).from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 64, (3, 9))
    assert (_hf_logits(again, ids) - _hf_logits(hf, ids)).abs().max().item() <= TOL


ANYMOE_CASES = {
    "mixtral": {
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 24, "router": {"normalize_topk": True}}
    },
    "qwen2_moe": {
        "attention_bias": "qkv",
        "first_dense_layers": 1,
        "dense_hidden": 40,
        "moe": {
            "num_experts": 4,
            "top_k": 2,
            "expert_hidden": 16,
            "shared_experts": 1,
            "shared_hidden": 24,
            "shared_gate": True,
        },
    },
    "qwen3_moe": {
        "qk_norm": True,
        "head_dim": 8,
        "moe": {
            "num_experts": 4,
            "top_k": 2,
            "expert_hidden": 16,
            "fused_w13": True,
            "router": {"normalize_topk": True},
        },
    },
    "deepseek_v3": {
        "attention": "mla",
        "n_kv_heads": None,
        "first_dense_layers": 1,
        "dense_hidden": 48,
        "mla": {
            "q_lora_rank": 0,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 4,
            "v_head_dim": 8,
        },
        "moe": {
            "num_experts": 8,
            "top_k": 2,
            "expert_hidden": 16,
            "shared_experts": 2,
            "router": {
                "kind": "group_limited",
                "score": "sigmoid",
                "n_groups": 4,
                "topk_groups": 2,
                "group_score": "top2_sum",
                "normalize_topk": True,
                "scaling": 2.5,
            },
            "balance": {"aux_free": True},
        },
    },
}


def _anymoe_cfg(kind, **over):
    base = {"vocab_size": 64, "d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128}
    return load_config(ModelConfig, {**base, **ANYMOE_CASES[kind], **over}, "model")


@pytest.mark.parametrize("kind", list(ANYMOE_CASES))
def test_anymoe_model_exports_to_transformers(kind, tmp_path):
    cfg = _anymoe_cfg(kind)
    torch.manual_seed(1)
    ours = MoETransformer(cfg).eval()
    with torch.no_grad():
        for layer in ours.moe_layers():
            layer.router.expert_bias.normal_(0, 0.1)
            if layer.shared is not None and layer.shared.gate is not None:
                layer.shared.gate.normal_(0, 0.3)
    if not cfg.moe.balance.aux_free:
        for layer in ours.moe_layers():
            layer.router.expert_bias.zero_()
    save_pretrained(ours, tmp_path / "hf", format="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == kind
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= TOL, f"{kind}: {diff}"
    back = from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (back(ids) - ours(ids)).abs().max().item() <= 1e-6


def test_anymoe_format_round_trip_is_exact_and_canonical(tmp_path):
    cfg = _anymoe_cfg("qwen2_moe")

    class Pow2Backend:
        def grouped_mm(self, x, w, c):
            from anymoe.core.grouped_mm import grouped_mm_loop

            return grouped_mm_loop(x, w, c)

        def sizing_policy(self):
            return POW2

    torch.manual_seed(2)
    padded = MoETransformer(cfg, backend=Pow2Backend()).eval()
    assert padded.blocks[1].ffn.experts.w1.shape[-1] == 16 and cfg.moe.expert_hidden == 16
    save_pretrained(padded, tmp_path / "ck")
    loaded = from_pretrained(tmp_path / "ck").eval()
    assert loaded.cfg == cfg
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), padded(ids))
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "ck" / "model.safetensors"))["blocks.1.ffn.experts.w1"]
    assert w1.shape == (4, 32, 16)


def test_unsupported_architecture_and_mismatched_tensor_errors(tmp_path):
    hf = _hf_model("mixtral")
    hf.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_bigcode"}))
    with pytest.raises(ConfigError, match="gpt_bigcode.*not supported"):
        from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 20}))
    with pytest.raises(CheckpointMismatch, match=r"block_sparse_moe\.experts\.0\.w1\.weight.*shape"):
        from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointMismatch, match=r"model\.layers\.2\..* is missing"):
        from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointMismatch, match=r"model\.layers\.1\..* not used"):
        from_pretrained(tmp_path / "m")


def test_export_refuses_what_the_architecture_cannot_express(tmp_path):
    model = MoETransformer(_anymoe_cfg("mixtral", sandwich_norm=True))
    with pytest.raises(ConfigError) as err:
        save_pretrained(model, tmp_path / "x", format="hf")
    assert err.value.field == "model.sandwich_norm"
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="mixtral"):
        save_pretrained(
            MoETransformer(_anymoe_cfg("qwen2_moe")), tmp_path / "y", format="hf", hf_arch="mixtral"
        )


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_transformers5_fused_expert_layout_loads(kind, tmp_path):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / "fused", save_original_format=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fused" / "model.safetensors"), "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())
    ours = from_pretrained(tmp_path / "fused").eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert (ours(ids) - _hf_logits(hf, ids)).abs().max().item() <= TOL


def test_tied_embeddings_both_ways(tmp_path):
    cfg_cls, model_cls, kw = HF_CASES["qwen3_moe"]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(
        getattr(transformers, cfg_cls)(**COMMON, **kw, tie_word_embeddings=True)
    )
    hf.eval().save_pretrained(tmp_path / "tied")
    ours = from_pretrained(tmp_path / "tied").eval()
    assert ours.cfg.tie_embeddings and ours.lm_head.weight is ours.embed.weight
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        assert (ours(ids) - _hf_logits(hf, ids)).abs().max().item() <= TOL
    save_pretrained(ours, tmp_path / "back", format="hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert (_hf_logits(again, ids) - _hf_logits(hf, ids)).abs().max().item() <= TOL
