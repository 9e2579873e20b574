"""Upcycled MoE models start with exactly the dense model's output (fp32, <= 1e-5), from an
anymoe dense model and from Hugging Face Llama / Qwen2 directories, for copies and for
fine-grained splits; and training then moves the router."""

import pytest
import torch

from anymoe.core.config import ConfigError, load_config
from anymoe.models import ModelConfig, MoETransformer, from_pretrained
from anymoe.models.upcycle import upcycle

TOL = 1e-5


def _dense():
    torch.manual_seed(0)
    cfg = load_config(
        ModelConfig,
        {
            "vocab_size": 50,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "dense_hidden": 48,
            "moe": None,
        },
        "model",
    )
    return MoETransformer(cfg).eval()


@pytest.mark.parametrize("E,K,g,first", [(4, 2, 1, 0), (8, 1, 1, 1), (8, 2, 2, 0), (16, 8, 4, 0)])
def test_upcycled_output_equals_dense(E, K, g, first):
    dense = _dense()
    moe = upcycle(dense, num_experts=E, top_k=K, granularity=g, first_dense_layers=first, seed=3).eval()
    assert moe.num_moe_layers == 2 - first and moe.cfg.moe.expert_hidden == 48 // g
    ids = torch.randint(0, 50, (3, 10))
    with torch.no_grad():
        diff = (moe(ids) - dense(ids)).abs().max().item()
    assert diff <= TOL, diff


def test_upcycled_router_learns_after_one_step():
    dense = _dense()
    moe = upcycle(dense, num_experts=8, top_k=2, granularity=2).train()
    ids = torch.randint(0, 50, (4, 12))
    out = moe(ids, return_aux=True)
    # Fine-grained start: every token on experts 0..K-1 with equal weights; the router still gets gradient.
    assert set(out.expert_ids[0].flatten().tolist()) == {0, 1}
    out.logits.logsumexp(-1).mean().backward()
    grads = [layer.router.weight.grad for layer in moe.moe_layers()]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)
    with torch.no_grad():
        for layer in moe.moe_layers():
            layer.router.weight.sub_(10.0 * layer.router.weight.grad)
    later = moe(ids, return_aux=True).expert_ids[0]
    assert len(set(later.flatten().tolist())) > 2


@pytest.mark.parametrize("kind", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_upcycle_from_hugging_face_dense_dir(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg_cls = getattr(transformers, kind.replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    hf = getattr(transformers, kind)(
        cfg_cls(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    hf.save_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        want = hf(ids).logits
        assert (from_pretrained(tmp_path / "dense")(ids) - want).abs().max() <= 1e-4
        for g in (1, 2):
            moe = upcycle(tmp_path / "dense", num_experts=4, top_k=2, granularity=g).eval()
            dense_ours = from_pretrained(tmp_path / "dense").eval()
            assert (moe(ids) - dense_ours(ids)).abs().max().item() <= TOL


def test_upcycle_rejects_non_preserving_settings():
    dense = _dense()
    with pytest.raises(ConfigError) as err:
        upcycle(dense, num_experts=8, top_k=3, granularity=2)
    assert err.value.field == "top_k"
    with pytest.raises(ConfigError) as err:
        upcycle(dense, num_experts=4, top_k=2, moe={"router": {"normalize_topk": False}})
    assert err.value.field == "moe.router"
    with pytest.raises(ConfigError, match="already an MoE"):
        upcycle(upcycle(dense, 4, 2), 4, 2)
