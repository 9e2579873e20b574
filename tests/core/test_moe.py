"""MoELayer against a naive per-token float64 reference, forward and backward.

The reference walks token by token: logits by dot products, scores, a Python sort for the
top-k, the combine weights, and each chosen expert's SwiGLU on that one token. It reads
the same parameter tensors as the layer (canonical views), so autograd gives reference
gradients for the input, the router weight and every expert weight.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from anymoe.core.config import ConfigError, load_config
from anymoe.core.grouped_mm import grouped_mm_padded
from anymoe.core.moe import MoEAux, MoEConfig, MoELayer, moe_stats
from anymoe.core.moe import replace as moe_replace
from anymoe.core.sizing import POW2, ExpertSizingPolicy


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls on a shared 2-core box: OpenMP threads spin against each other (30 ms per
    # 30x16 @ 16x4 with 2 threads under load, 3 us with one).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_cfg(**kw) -> MoEConfig:
    base = {"num_experts": 6, "top_k": 2, "expert_hidden": 5}
    base.update(kw)
    return load_config(MoEConfig, base)


def ref_select(scores, sel, rc, K, E):
    """Python top-k over selection scores with optional group limiting."""
    sel = list(map(float, sel))
    allowed = list(range(E))
    if rc.kind == "group_limited":
        G = rc.n_groups
        per = E // G
        gscore = []
        for g in range(G):
            vals = sorted(sel[g * per:(g + 1) * per], reverse=True)
            gscore.append(vals[0] if rc.group_score == "max" else vals[0] + vals[1])
        groups = sorted(range(G), key=lambda g: -gscore[g])[: rc.topk_groups]
        allowed = [e for e in range(E) if e // per in groups]
    return sorted(allowed, key=lambda e: -sel[e])[:K]


def reference(layer: MoELayer, x_TD, token_ids=None, replay=None, dropped_mask=None):
    """Per-token float64 forward; returns [T, D] output."""
    cfg, rc = layer.cfg, layer.cfg.router
    E, K = cfg.num_experts, cfg.top_k
    canon = layer.experts.canonical()
    Fh = cfg.expert_hidden
    if "w13" in canon:
        w1, w3 = canon["w13"][..., :Fh], canon["w13"][..., Fh:]
    else:
        w1, w3 = canon["w1"], canon["w3"]
    w2 = canon["w2"]
    rows = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        if rc.kind == "hash":
            v = int(token_ids.reshape(-1)[t]) % rc.hash_vocab
            ids = [int(layer.router.table[v, k]) for k in range(K)]
            ws = [rc.scaling / K] * K
        else:
            logits = torch.stack([x @ layer.router.weight[e] for e in range(E)])
            if rc.score == "sigmoid":
                scores = torch.sigmoid(logits)
            else:
                scores = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
            bias = layer.router.expert_bias.double() if cfg.balance.aux_free else torch.zeros(E)
            ids = ref_select(scores, scores.detach() + bias, rc, K, E) if replay is None else \
                [int(i) for i in replay[t]]
            if rc.score == "softmax" and not rc.softmax_before_topk:
                chosen = torch.stack([logits[e] for e in ids])
                ws = list(torch.exp(chosen - chosen.max()) / torch.exp(chosen - chosen.max()).sum())
            else:
                ws = [scores[e] for e in ids]
                if rc.normalize_topk:
                    total = sum(ws)
                    ws = [w / (total + 1e-20) for w in ws]
            ws = [w * rc.scaling for w in ws]
        y = torch.zeros_like(x)
        for k, e in enumerate(ids):
            if dropped_mask is not None and dropped_mask[t, k]:
                continue
            h = F.silu(x @ w1[e]) * (x @ w3[e])
            y = y + ws[k] * (h @ w2[e])
        if layer.shared is not None:
            s = layer.shared
            ys = (F.silu(x @ s.w1) * (x @ s.w3)) @ s.w2
            if s.gate is not None:
                ys = ys * torch.sigmoid(x @ s.gate)
            y = y + ys
        rows.append(y)
    return torch.stack(rows)


def grads_of(layer, x, fn):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out = fn()
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    (out * g_out).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    return out.detach(), grads


CASES = {
    "softmax_topk": {},
    "softmax_after_topk": {"router": {"softmax_before_topk": False}},
    "softmax_norm_scaled": {"router": {"normalize_topk": True, "scaling": 2.5}},
    "sigmoid_norm": {"router": {"score": "sigmoid", "normalize_topk": True}},
    "sigmoid_aux_free": {"router": {"score": "sigmoid", "normalize_topk": True},
                         "balance": {"aux_free": True}},
    "group_limited_max": {"router": {"kind": "group_limited", "n_groups": 3, "topk_groups": 1}},
    "group_limited_top2": {"router": {"kind": "group_limited", "n_groups": 3, "topk_groups": 2,
                                      "group_score": "top2_sum", "score": "sigmoid"}, "top_k": 3},
    "shared_gated": {"shared_experts": 2, "shared_hidden": 3, "shared_gate": True},
    "fused_pow2": {"fused_w13": True},
    "hash": {"router": {"kind": "hash", "hash_vocab": 11}},
    "top1": {"top_k": 1},
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("sizing", [None, POW2])
def test_layer_matches_per_token_reference(name, sizing):
    torch.manual_seed(hash(name) % 1000)
    cfg = make_cfg(**CASES[name])
    layer = MoELayer(cfg, 4, sizing=sizing).double()
    if cfg.balance.aux_free:
        layer.router.expert_bias.copy_(torch.randn(cfg.num_experts) * 0.3)
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    tok = torch.randint(0, 50, (3, 5))
    out, g = grads_of(layer, x, lambda: layer(x, token_ids=tok)[0])
    ref, g_ref = grads_of(layer, x, lambda: reference(layer, x.reshape(15, 4), token_ids=tok).view(3, 5, 4))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert set(g) == set(g_ref)
    for key in g:
        torch.testing.assert_close(g[key], g_ref[key], rtol=1e-9, atol=1e-12, msg=key)


def test_replay_ids_replace_choice_and_keep_router_grads():
    torch.manual_seed(1)
    cfg = make_cfg(router={"normalize_topk": True})
    layer = MoELayer(cfg, 4).double()
    x = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    replay = torch.stack([torch.randperm(6)[:2] for _ in range(8)])
    out, g = grads_of(layer, x, lambda: layer(x, replay_ids=replay)[0])
    ref, g_ref = grads_of(layer, x, lambda: reference(layer, x.reshape(8, 4), replay=replay).view(2, 4, 4))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for key in g:
        torch.testing.assert_close(g[key], g_ref[key], rtol=1e-9, atol=1e-12, msg=key)
    assert g["router.weight"].abs().sum() > 0
    _, aux = layer(x, replay_ids=replay)
    assert torch.equal(aux.expert_ids, replay)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_layer_with_capacity_matches_reference(policy):
    torch.manual_seed(3)
    cfg = make_cfg(capacity_factor=0.5, drop_policy=policy, router={"normalize_topk": True})
    layer = MoELayer(cfg, 4).double()
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    _, aux = layer(x)
    ids = aux.expert_ids
    cap = math.ceil(0.5 * 18 * 2 / 6)
    # Reference drop mask: per expert, rank the pairs by score (probs) or by token (position).
    dropped = torch.zeros_like(ids, dtype=torch.bool)
    for e in range(6):
        pairs = [(t, k) for t in range(18) for k in range(2) if ids[t, k] == e]
        if policy == "probs":
            pairs.sort(key=lambda p: -float(aux.router_probs[p[0], e].detach()))
        for t, k in pairs[cap:]:
            dropped[t, k] = True
    assert int(aux.dropped) == int(dropped.sum()) > 0
    out, g = grads_of(layer, x, lambda: layer(x)[0])
    ref, g_ref = grads_of(
        layer, x, lambda: reference(layer, x.reshape(18, 4), dropped_mask=dropped).view(2, 9, 4))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for key in g:
        torch.testing.assert_close(g[key], g_ref[key], rtol=1e-9, atol=1e-12, msg=key)


def test_expert_choice_matches_reference():
    torch.manual_seed(4)
    cfg = make_cfg(router={"kind": "expert_choice", "capacity": 1.0})
    layer = MoELayer(cfg, 4).double()
    x = torch.randn(1, 9, 4, dtype=torch.float64, requires_grad=True)
    C = math.ceil(9 * 2 / 6)

    def ref_fn():
        xs = x.reshape(9, 4)
        W = layer.router.weight
        probs = torch.softmax(xs @ W.t(), dim=-1)
        c = layer.experts.canonical()
        y = [torch.zeros(4, dtype=torch.float64) for _ in range(9)]
        for e in range(6):
            for t in sorted(range(9), key=lambda t: -float(probs[t, e].detach()))[:C]:
                h = F.silu(xs[t] @ c["w1"][e]) * (xs[t] @ c["w3"][e])
                y[t] = y[t] + probs[t, e] * (h @ c["w2"][e])
        return torch.stack(y).view(1, 9, 4)

    out, g = grads_of(layer, x, lambda: layer(x)[0])
    ref, g_ref = grads_of(layer, x, ref_fn)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for key in g:
        torch.testing.assert_close(g[key], g_ref[key], rtol=1e-9, atol=1e-12, msg=key)
    _, aux = layer(x)
    assert aux.tokens_per_expert.tolist() == [C] * 6


def test_gradcheck_tiny_layer():
    torch.manual_seed(5)
    cfg = make_cfg(num_experts=3, top_k=2, expert_hidden=3, shared_experts=1, shared_hidden=2,
                   balance={"aux_loss": 0.1, "z_loss": 0.1, "seq_aux_loss": 0.1})
    layer = MoELayer(cfg, 3, sizing=POW2).double()
    x = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    params = [layer.router.weight, layer.experts.w1, layer.experts.w2, layer.experts.w3, layer.shared.w1]

    def fn(x, *ps):
        y, aux = torch.func.functional_call(layer, dict(zip(["router.weight", "experts.w1", "experts.w2",
                                                             "experts.w3", "shared.w1"], ps)), (x,))
        return y.sum() + aux.loss

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


def test_grouped_mm_plugs_in():
    torch.manual_seed(6)
    cfg = make_cfg()
    a = MoELayer(cfg, 4).double()
    torch.manual_seed(6)
    b = MoELayer(cfg, 4, grouped_mm=grouped_mm_padded).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(a(x)[0], b(x)[0])


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="top_k"):
        make_cfg(top_k=7)
    with pytest.raises(ConfigError, match="router.n_groups"):
        make_cfg(router={"kind": "group_limited", "n_groups": 4})
    with pytest.raises(ConfigError, match="router.hash_vocab"):
        make_cfg(router={"kind": "hash"})
    with pytest.raises(ConfigError, match="balance.aux_loss"):
        make_cfg(router={"kind": "expert_choice"}, balance={"aux_loss": 0.01})
    with pytest.raises(ConfigError, match="capacity_factor"):
        make_cfg(router={"kind": "expert_choice"}, capacity_factor=1.0)
    with pytest.raises(ConfigError, match="balance.sinkhorn"):
        make_cfg(balance={"aux_free": True, "sinkhorn": True})
    with pytest.raises(ConfigError, match="router.scor"):
        make_cfg(router={"scor": "softmax"})
    with pytest.raises(ConfigError, match="drop_policy"):
        make_cfg(drop_policy="random")


def test_state_dict_is_canonical_and_portable():
    torch.manual_seed(8)
    cfg = make_cfg(fused_w13=True)
    a = MoELayer(cfg, 4, sizing=ExpertSizingPolicy("multiple_of", 16))
    sd = a.state_dict()
    assert sd["experts.w13"].shape == (6, 4, 10) and sd["experts.w2"].shape == (6, 5, 4)
    b = MoELayer(cfg, 4)  # identity sizing
    b.load_state_dict(sd)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(a(x)[0], b(x)[0])
    torch.manual_seed(8)
    c = MoELayer(cfg, 4)
    torch.testing.assert_close(c(x)[0], a(x)[0])  # same seed, same canonical weights


def test_moe_stats_hand_case():
    aux = MoEAux(loss=torch.tensor(0.5), losses={"aux_loss": torch.tensor(1.25)},
                 tokens_per_expert=torch.tensor([4.0, 0.0, 2.0, 2.0]), expert_ids=torch.zeros(4, 2),
                 router_probs=torch.full((4, 4), 0.25), dropped=torch.tensor(2), num_pairs=10)
    s = moe_stats(aux, per_expert=True)
    assert s["load_mean"] == 2.0 and s["load_max"] == 4.0 and s["max_over_mean"] == 2.0
    assert s["cv"] == pytest.approx(math.sqrt(2.0) / 2.0)
    assert s["entropy"] == pytest.approx(math.log(4))
    assert s["dropped_frac"] == 0.2 and s["utilisation"] == 0.75
    assert s["aux_loss"] == 1.25 and s["tokens_per_expert/0"] == 4.0


def test_dropless_drops_nothing_and_aux_fields():
    cfg = make_cfg(balance={"aux_loss": 0.01, "z_loss": 0.001})
    layer = MoELayer(cfg, 4)
    y, aux = layer(torch.randn(2, 7, 4))
    assert int(aux.dropped) == 0 and aux.tokens_per_expert.sum() == 28
    assert aux.expert_ids.shape == (14, 2) and aux.expert_ids.dtype == torch.long
    assert aux.router_probs.shape == (14, 6) and aux.router_probs.dtype == torch.float32
    want = 0.01 * aux.losses["aux_loss"] + 0.001 * aux.losses["z_loss"]
    torch.testing.assert_close(aux.loss, want)


def test_bf16_input_router_in_fp32():
    layer = MoELayer(make_cfg(), 8).to(torch.bfloat16)
    y, aux = layer(torch.randn(2, 3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and aux.router_probs.dtype == torch.float32


@pytest.mark.parametrize("case", [{}, {"fused_w13": True}, {"router": {"kind": "expert_choice"}}])
def test_autocast_dispatches_rows_in_the_autocast_dtype(case):
    """Under autocast the dispatch moves bf16 rows (cast before the gather, not after), and the
    layer's output and gradients still match the float64 layer to bf16 precision."""
    from anymoe.core.dispatch import LocalDispatcher

    seen = []

    class Spy(LocalDispatcher):
        def dispatch(self, x, ids, w):
            seen.append(x.dtype)
            return super().dispatch(x, ids, w)

    torch.manual_seed(3)
    cfg = make_cfg(**case)
    layer = MoELayer(cfg, 16, dispatcher=Spy(cfg.num_experts))
    x = torch.randn(2, 8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, g = grads_of(layer, x, lambda: layer(x)[0])
    assert seen == [torch.bfloat16] and g["x"].dtype == torch.float32
    ref_layer = MoELayer(cfg, 16).double()
    ref_layer.load_state_dict(layer.state_dict())
    x64 = x.detach().double().requires_grad_()
    ref, g_ref = grads_of(ref_layer, x64, lambda: ref_layer(x64)[0])
    torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.02)
    for key in g_ref:
        torch.testing.assert_close(g[key].double(), g_ref[key], rtol=0.05, atol=0.02, msg=key)
    seen.clear()
    layer(x)  # no autocast: float32 rows as before
    assert seen == [torch.float32]


def test_config_is_frozen_and_replace_merges_sub_configs():
    cfg = make_cfg(balance={"aux_loss": 0.01})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3  # type: ignore[misc]
    new = moe_replace(cfg, top_k=3, balance={"z_loss": 0.1})
    assert new.top_k == 3 and new.balance.z_loss == 0.1 and new.balance.aux_loss == 0.01
    assert cfg.top_k == 2 and cfg.balance.z_loss == 0.0


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_plugged_in_fast_dispatcher_matches_reference(capacity):
    """Another TokenDispatcher (the fast local one) in the layer: same outputs and gradients."""
    from anymoe.core.dispatch_fast import FastLocalDispatcher

    torch.manual_seed(9)
    cfg = make_cfg(capacity_factor=capacity, shared_experts=1, fused_w13=True)
    layer = MoELayer(cfg, 4, dispatcher=FastLocalDispatcher(6), sizing=POW2).double()
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    _, aux = layer(x)
    torch.manual_seed(9)
    plain = MoELayer(cfg, 4, sizing=POW2).double()
    out, g = grads_of(layer, x, lambda: layer(x)[0])
    ref, g_ref = grads_of(plain, x, lambda: plain(x)[0])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for key in g:
        torch.testing.assert_close(g[key], g_ref[key], rtol=1e-9, atol=1e-12, msg=key)
    if capacity:
        assert int(aux.dropped) > 0


def _device_backends():
    from anymoe.core.backend import probe_backends

    marks = {"cuda": pytest.mark.gpu, "npu": pytest.mark.npu}
    out = []
    for name, status in probe_backends().items():
        if name not in marks:
            continue
        skip = [] if status.ok else [pytest.mark.skip(reason=f"backend {name!r} not usable: {status.reason}")]
        out.append(pytest.param(name, marks=[marks[name], *skip], id=name))
    return out


@pytest.mark.parametrize("backend_name", _device_backends())
@pytest.mark.parametrize("case", ["softmax_topk", "sigmoid_aux_free", "fused_pow2", "capacity"])
def test_layer_on_device_matches_cpu_float64(backend_name, case):
    """The layer on an accelerator (its grouped matmul and sizing policy) vs the CPU float64 layer."""
    from anymoe.core.backend import create_backend

    backend = create_backend(backend_name)
    dev = backend.device(0)
    kw = {"capacity_factor": 0.5} if case == "capacity" else CASES[case]
    cfg = make_cfg(num_experts=8, expert_hidden=24, shared_experts=1, **kw)
    torch.manual_seed(11)
    ref = MoELayer(cfg, 32, sizing=POW2).double()
    torch.manual_seed(11)
    layer = MoELayer(cfg, 32, grouped_mm=backend.grouped_mm, sizing=backend.sizing_policy()).to(dev)
    x = torch.randn(4, 16, 32, dtype=torch.float64)
    g = torch.randn(4, 16, 32, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    y_ref, aux_ref = ref(x_ref)
    (y_ref * g).sum().backward()
    x_dev = x.float().to(dev).requires_grad_()
    y, aux = layer(x_dev, replay_ids=aux_ref.expert_ids.to(dev))  # same choice despite fp32 ties
    (y * g.float().to(dev)).sum().backward()
    torch.testing.assert_close(y.double().cpu(), y_ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_dev.grad.double().cpu(), x_ref.grad, rtol=1e-4, atol=1e-5)
    ref_sd, dev_sd = dict(ref.named_parameters()), dict(layer.named_parameters())
    for name in ("router.weight", "experts.w2"):
        P = min(ref_sd[name].shape[1], dev_sd[name].shape[1])
        torch.testing.assert_close(dev_sd[name].grad[:, :P].double().cpu(), ref_sd[name].grad[:, :P],
                                   rtol=1e-4, atol=1e-5, msg=name)
