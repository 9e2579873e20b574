"""The MoE decoder against a float64 plain-loop reference, plus its options (padding, cache,
checkpointing, replay, init) and config errors."""

import pytest
import torch
from model_reference import reference_logits

from anymoe.core.config import ConfigError, load_config
from anymoe.core.sizing import POW2
from anymoe.models import ModelConfig, MoETransformer, preset


def tiny(**over):
    base = {"vocab_size": 40, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64,
            "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 24,
                    "router": {"normalize_topk": True}, "balance": {"aux_loss": 0.01, "z_loss": 0.001}}}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return load_config(ModelConfig, base, "model")


VARIANTS = {
    "plain": {},
    "qk_norm_bias_sandwich": {"qk_norm": True, "attention_bias": "all", "sandwich_norm": True,
                              "init": "tiny"},
    "dense_first_shared_gate": {"first_dense_layers": 1, "dense_hidden": 48, "tie_embeddings": True,
                                "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 24,
                                        "shared_experts": 1, "shared_hidden": 16, "shared_gate": True}},
    "sigmoid_group_auxfree": {"moe": {"num_experts": 8, "top_k": 2, "expert_hidden": 16, "shared_experts": 1,
                                      "router": {"kind": "group_limited", "score": "sigmoid", "n_groups": 4,
                                                 "topk_groups": 2, "group_score": "top2_sum",
                                                 "normalize_topk": True, "scaling": 2.5},
                                      "balance": {"aux_free": True}}},
    "mla_interleaved": {"attention": "mla", "n_kv_heads": None,
                        "mla": {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                "qk_rope_head_dim": 4, "v_head_dim": 12}},
    "mla_plain_rope": {"attention": "mla", "n_kv_heads": None, "attention_bias": "all",
                       "mla": {"q_lora_rank": 0, "kv_lora_rank": 12, "qk_nope_head_dim": 6,
                               "qk_rope_head_dim": 6, "v_head_dim": 8, "rope_interleave": False}},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_float64_loop_reference(name):
    cfg = tiny(**VARIANTS[name])
    model = MoETransformer(cfg).double()
    if cfg.moe.balance.aux_free:  # a non-zero selection bias, so the reference must use it
        for layer in model.moe_layers():
            layer.router.expert_bias.copy_(torch.randn(cfg.moe.num_experts) * 0.05)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    got = model(ids)
    ref = reference_logits(model, ids)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["qk_norm_bias_sandwich", "dense_first_shared_gate", "sigmoid_group_auxfree",
                                  "mla_interleaved"])
def test_backward_matches_reference_gradients(name):
    cfg = tiny(**VARIANTS[name])
    model = MoETransformer(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    w = torch.randn(1, 5, cfg.vocab_size, dtype=torch.float64)
    (model(ids) * w).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    state = {**{n: b.double() for n, b in model.named_buffers()}, **leaves}
    (reference_logits(model, ids, state=state) * w).sum().backward()
    for n, leaf in leaves.items():
        torch.testing.assert_close(got[n], leaf.grad, rtol=1e-8, atol=1e-10, msg=n)


def test_left_padding_matches_unpadded():
    cfg = tiny()
    model = MoETransformer(cfg).double().eval()
    ids = torch.randint(1, cfg.vocab_size, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], dim=1).long()
    a = model(ids)
    b = model(padded, attention_mask=mask)[:, 3:]
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ref = reference_logits(model, padded, mask)[:, 3:]
    torch.testing.assert_close(b, ref, rtol=1e-9, atol=1e-9)


MLA = {"attention": "mla", "n_kv_heads": None,
       "mla": {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
               "v_head_dim": 12}}


@pytest.mark.parametrize("name", ["plain", "qk_norm_bias_sandwich", "mla"])
def test_kv_cache_incremental_equals_full(name):
    cfg = tiny(**(MLA if name == "mla" else VARIANTS[name]))
    model = MoETransformer(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    full = model(ids)
    cache = model.new_cache()
    parts = [model(ids[:, :4], kv_cache=cache)]
    parts += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_shared_rope_tables_are_cached_and_equal_per_row_tables():
    """The tables for positions shared by every row come from a cache (the same two tensors on
    every step, for CUDA-graph replays), equal the per-row computation, and are not cached
    under inference mode; the model's logits equal those with explicit position ids."""
    torch.manual_seed(0)
    model = MoETransformer(tiny()).double()
    rope = model.rope
    for dtype in (torch.float32, torch.float64):
        first = rope.shared_positions(3, 11, dtype, torch.device("cpu"))
        again = rope.shared_positions(3, 11, dtype, torch.device("cpu"))
        assert first[0] is again[0] and first[1] is again[1]
        pos = torch.arange(3, 11).expand(5, 8)
        for shared, per_row in zip(first, rope(pos, dtype)):
            assert shared.shape == (1, 8, rope.dim) and shared.dtype == dtype
            assert torch.equal(shared.expand_as(per_row), per_row)
    with torch.inference_mode():
        a = rope.shared_positions(0, 4, torch.float32, torch.device("cpu"))
        assert a[0] is not rope.shared_positions(0, 4, torch.float32, torch.device("cpu"))[0]
    assert len(rope._tables) <= rope._CACHED
    ids = torch.randint(0, 40, (3, 9))
    explicit = model(ids, position_ids=torch.arange(9).expand(3, 9))
    assert torch.equal(model(ids), explicit)
    for n in range(2 * rope._CACHED):  # bounded: old lengths are dropped
        rope.shared_positions(0, n + 1, torch.float64, torch.device("cpu"))
    assert len(rope._tables) == rope._CACHED


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_same_loss_and_grads(mode):
    cfg = tiny(first_dense_layers=1, dense_hidden=32)
    torch.manual_seed(1)
    a = MoETransformer(cfg).double()
    b = MoETransformer(cfg).double()
    b.load_state_dict(a.state_dict())
    b.set_checkpointing(mode)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    outs = []
    for m in (a, b):
        out = m(ids, return_aux=True)
        loss = out.logits.logsumexp(-1).mean() + out.aux_loss
        loss.backward()
        outs.append(loss.detach())
    torch.testing.assert_close(outs[0], outs[1])
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("mode, calls_per_block", [("selective", 2), ("full", 1)])
def test_checkpoints_keep_one_residual_tensor_per_call(mode, calls_per_block, monkeypatch):
    """The residual stream travels as a pair (h, f); a checkpoint is handed their sum, so it keeps
    one [B, S, D] tensor as it did before the pair (not two)."""
    from anymoe.models import transformer

    cfg = tiny(first_dense_layers=1, dense_hidden=32)
    model = MoETransformer(cfg)
    model.set_checkpointing(mode)
    kept: list[int] = []
    real = transformer.checkpoint

    def counting(fn, *args, **kwargs):
        kept.append(sum(isinstance(a, torch.Tensor) and a.shape == (2, 6, cfg.d_model) for a in args))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(transformer, "checkpoint", counting)
    model(torch.randint(0, cfg.vocab_size, (2, 6))).sum().backward()
    # selective: attention in every block, the dense FFN of the first; full: each block once
    expected = cfg.n_layers * calls_per_block - (cfg.n_layers - 1 if mode == "selective" else 0)
    assert kept == [1] * expected, kept


def test_return_aux_and_replay():
    cfg = tiny()
    model = MoETransformer(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    out = model(ids, return_aux=True, return_hidden=True)
    assert out.logits.shape == (2, 5, cfg.vocab_size)
    assert len(out.moe_aux) == 2 and out.expert_ids[0].shape == (10, 2)
    torch.testing.assert_close(out.aux_loss, out.moe_aux[0].loss + out.moe_aux[1].loss)
    assert len(out.hidden_states) == cfg.n_layers + 1
    # Replaying the model's own choices reproduces the logits; replaying other experts changes them.
    same = model(ids, replay_ids=out.expert_ids)
    torch.testing.assert_close(same, out.logits)
    other = [(e + 1) % cfg.moe.num_experts for e in out.expert_ids]
    assert not torch.allclose(model(ids, replay_ids=other), out.logits)
    with pytest.raises(ValueError, match="one .* per MoE layer"):
        model(ids, replay_ids=out.expert_ids[:1])


def test_init_is_seeded_and_policy_independent():
    cfg = tiny(moe={"num_experts": 4, "top_k": 2, "expert_hidden": 24})

    class Pow2:
        def grouped_mm(self, x, w, c):
            from anymoe.core.grouped_mm import grouped_mm_loop
            return grouped_mm_loop(x, w, c)

        def sizing_policy(self):
            return POW2

    torch.manual_seed(3)
    a = MoETransformer(cfg)
    torch.manual_seed(3)
    b = MoETransformer(cfg, backend=Pow2())
    assert b.blocks[0].ffn.experts.padded_hidden == 32
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    torch.testing.assert_close(a(ids), b(ids), rtol=1e-6, atol=1e-6)


def test_tiny_init_and_sandwich_gain():
    cfg = tiny(init="tiny", sandwich_norm=True, d_model=64, n_layers=4, n_heads=4)
    model = MoETransformer(cfg)
    std = (1 / (2 * 64 * 4)) ** 0.5
    w = model.blocks[1].ffn.experts.w1
    assert abs(w.std().item() - std) / std < 0.1
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - std) / std < 0.1
    assert torch.allclose(model.blocks[0].post_attn_norm.weight, torch.full((64,), 0.5))


def test_update_router_biases_moves_aux_free_bias():
    cfg = tiny(moe={"num_experts": 4, "top_k": 1, "expert_hidden": 8, "balance": {"aux_free": True,
                                                                                  "aux_loss": 0.0}})
    model = MoETransformer(cfg)
    model(torch.randint(0, cfg.vocab_size, (2, 8)))
    model.update_router_biases()
    assert any(layer.router.expert_bias.abs().sum() > 0 for layer in model.moe_layers())


@pytest.mark.parametrize("over,field", [
    ({"n_kv_heads": 3}, "model.n_kv_heads"),
    ({"first_dense_layers": 1}, "model.dense_hidden"),
    ({"attention": "mla"}, "model.mla"),
    ({"head_dim": 7}, "model.head_dim"),
    ({"d_modle": 8}, "model.d_modle"),
])
def test_config_errors_name_the_field(over, field):
    with pytest.raises(ConfigError) as err:
        tiny(**over)
    assert err.value.field == field


def test_presets_build_and_count():
    for name in ("tiny",):
        m = MoETransformer(preset(name))
        assert m(torch.randint(0, 256, (1, 4))).shape == (1, 4, 256)
    with torch.device("meta"):
        big = MoETransformer(preset("moe-1b"))
    assert round(big.num_parameters() / 1e9, 3) == 1.306
    assert round(big.num_parameters(active=True) / 1e6) == 216
    # a padded sizing policy stores more numbers but the model has as many parameters
    from anymoe.core.backend import get_backend
    from anymoe.core.sizing import POW2

    cfg = preset("tiny", moe={"expert_hidden": 48})
    plain, padded = MoETransformer(cfg), MoETransformer(cfg, backend=get_backend("cpu", sizing=POW2))
    assert padded.blocks[0].ffn.experts.padded_hidden == 64
    assert sum(p.numel() for p in padded.parameters()) > sum(p.numel() for p in plain.parameters())
    for active in (False, True):
        assert padded.num_parameters(active) == plain.num_parameters(active)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")
