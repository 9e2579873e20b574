"""Every router against a per-token float64 loop: ids, weights, probabilities and gradients."""

import math

import pytest
import torch

from anymoe.core.balance import BalanceConfig
from anymoe.core.config import load_config
from anymoe.core.router import ROUTERS, Router, RouterConfig, build_router, register_router


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls on a shared 2-core box: OpenMP threads spin against each other (30 ms per
    # 30x16 @ 16x4 with 2 threads under load, 3 us with one).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

E, K, D = 8, 2, 5


def rcfg(**kw) -> RouterConfig:
    return load_config(RouterConfig, kw)


def ref_token(router: Router, x, logits=None, replay=None):
    """One token: (ids, weights [K] tensor, probs [E] tensor) by plain Python."""
    c = router.cfg
    if logits is None:
        logits = torch.stack([x @ router.weight[e] for e in range(E)])
    if c.score == "sigmoid":
        scores = 1 / (1 + torch.exp(-logits))
        probs = scores / scores.sum()
    else:
        ex = torch.exp(logits - logits.max())
        scores = probs = ex / ex.sum()
    sel = [float(s) for s in scores.detach()]
    if router.balance.aux_free:
        sel = [s + float(b) for s, b in zip(sel, router.expert_bias)]
    allowed = list(range(E))
    if c.kind == "group_limited":
        per = E // c.n_groups
        gs = []
        for g in range(c.n_groups):
            v = sorted(sel[g * per:(g + 1) * per], reverse=True)
            gs.append(v[0] if c.group_score == "max" else v[0] + v[1])
        keep = sorted(range(c.n_groups), key=lambda g: -gs[g])[: c.topk_groups]
        allowed = [e for e in allowed if e // per in keep]
    ids = sorted(allowed, key=lambda e: -sel[e])[:K] if replay is None else [int(i) for i in replay]
    if c.score == "softmax" and not c.softmax_before_topk:
        z = torch.stack([logits[e] for e in ids])
        w = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
    else:
        w = torch.stack([scores[e] for e in ids])
        if c.normalize_topk:
            w = w / (w.sum() + 1e-20)
    return ids, w * c.scaling, probs


TOKEN_CHOICE = {
    "softmax": {},
    "softmax_after": {"softmax_before_topk": False},
    "softmax_norm": {"normalize_topk": True, "scaling": 1.7},
    "sigmoid": {"score": "sigmoid"},
    "sigmoid_norm_scaled": {"score": "sigmoid", "normalize_topk": True, "scaling": 2.5},
    "group_max": {"kind": "group_limited", "n_groups": 4, "topk_groups": 2},
    "group_top2": {"kind": "group_limited", "n_groups": 2, "topk_groups": 1, "group_score": "top2_sum",
                   "score": "sigmoid", "normalize_topk": True},
}


def _compare(router, x, out, logits=None, replay=None):
    for t in range(x.shape[0]):
        ids, w, p = ref_token(router, x[t], None if logits is None else logits[t],
                              None if replay is None else replay[t])
        assert out.expert_ids_TK[t].tolist() == ids
        torch.testing.assert_close(out.weights_TK[t], w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out.probs_TE[t], p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(TOKEN_CHOICE))
@pytest.mark.parametrize("aux_free", [False, True])
def test_token_choice_router_matches_loop(name, aux_free):
    torch.manual_seed(len(name) + 10 * aux_free)
    router = build_router(E, K, D, rcfg(**TOKEN_CHOICE[name]), BalanceConfig(aux_free=aux_free)).double()
    if aux_free:
        router.expert_bias.copy_(torch.randn(E) * 0.2)
    x = torch.randn(12, D, dtype=torch.float64, requires_grad=True)
    out = router(x)
    _compare(router, x, out)
    # Gradients of the combine weights and probabilities, input and router weight.
    gw = torch.randn(12, K, dtype=torch.float64)
    gp = torch.randn(12, E, dtype=torch.float64)
    got = torch.autograd.grad((out.weights_TK * gw).sum() + (out.probs_TE * gp).sum(), (x, router.weight))
    ref_w, ref_p = zip(*[(r[1], r[2]) for r in (ref_token(router, x[t]) for t in range(12))])
    want = torch.autograd.grad((torch.stack(ref_w) * gw).sum() + (torch.stack(ref_p) * gp).sum(),
                               (x, router.weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_aux_free_bias_moves_choice_not_weights():
    torch.manual_seed(2)
    router = build_router(E, K, D, rcfg(score="sigmoid"), BalanceConfig(aux_free=True)).double()
    x = torch.randn(20, D, dtype=torch.float64)
    before = router(x)
    router.expert_bias[3] = 10.0  # expert 3 now always chosen
    after = router(x)
    assert (after.expert_ids_TK == 3).any(dim=1).all()
    scores = torch.sigmoid(x @ router.weight.t())
    torch.testing.assert_close(after.weights_TK, scores.gather(1, after.expert_ids_TK))
    torch.testing.assert_close(after.probs_TE, before.probs_TE)


def test_replay_uses_given_ids():
    torch.manual_seed(3)
    router = build_router(E, K, D, rcfg(normalize_topk=True)).double()
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    replay = torch.stack([torch.randperm(E)[:K] for _ in range(6)])
    out = router(x, replay_ids_TK=replay)
    _compare(router, x, out, replay=replay)


def test_noisy_topk_matches_loop_with_same_noise():
    torch.manual_seed(4)
    router = build_router(E, K, D, rcfg(kind="noisy_topk")).double()
    with torch.no_grad():
        router.noise_weight.normal_(0, 0.5)
    x = torch.randn(10, D, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(99)
    out = router(x)
    torch.manual_seed(99)
    noise = torch.randn(10, E, dtype=torch.float64)
    clean = x @ router.weight.t()
    logits = clean + noise * torch.nn.functional.softplus(x @ router.noise_weight.t())
    _compare(router, x, out, logits=logits)
    leaves = (x, router.weight, router.noise_weight)
    gw = torch.randn(10, K, dtype=torch.float64)
    got = torch.autograd.grad((out.weights_TK * gw).sum(), leaves)
    ref_w = torch.stack([ref_token(router, x[t], logits[t])[1] for t in range(10)])
    want = torch.autograd.grad((ref_w * gw).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert got[2].abs().sum() > 0  # the noise scale is learned
    router.eval()
    torch.testing.assert_close(router(x).logits_TE, clean)


def test_jitter_scales_input_in_training_only():
    torch.manual_seed(5)
    router = build_router(E, K, D, rcfg(jitter=0.1)).double()
    x = torch.randn(7, D, dtype=torch.float64)
    torch.manual_seed(1)
    out = router(x)
    torch.manual_seed(1)
    u = torch.empty(7, D, dtype=torch.float64).uniform_(0.9, 1.1)
    torch.testing.assert_close(out.logits_TE, (x * u) @ router.weight.t())
    router.eval()
    torch.testing.assert_close(router(x).logits_TE, x @ router.weight.t())


def test_group_limited_keeps_choices_inside_best_groups():
    torch.manual_seed(6)
    router = build_router(16, 4, D, rcfg(kind="group_limited", n_groups=4, topk_groups=2)).double()
    out = router(torch.randn(50, D, dtype=torch.float64))
    groups = out.expert_ids_TK // 4
    assert all(len(set(row.tolist())) <= 2 for row in groups)


def test_hash_router_fixed_table_and_balance():
    router = build_router(E, K, D, rcfg(kind="hash", hash_vocab=1000, hash_seed=3))
    again = build_router(E, K, D, rcfg(kind="hash", hash_vocab=1000, hash_seed=3))
    assert torch.equal(router.table, again.table)
    assert not list(router.parameters())
    tok = torch.arange(1000)
    out = router(torch.randn(1000, D), token_ids_T=tok)
    assert torch.equal(out.expert_ids_TK, router.table)
    assert (out.expert_ids_TK[:, 0] != out.expert_ids_TK[:, 1]).all()  # K distinct experts
    load = torch.bincount(out.expert_ids_TK.reshape(-1), minlength=E).float()
    assert load.max() / load.mean() < 1.3
    torch.testing.assert_close(out.weights_TK, torch.full((1000, K), 0.5))
    with pytest.raises(ValueError, match="token_ids"):
        router(torch.randn(3, D))


def test_expert_choice_each_expert_takes_its_best_tokens():
    torch.manual_seed(7)
    router = build_router(E, K, D, rcfg(kind="expert_choice", capacity=1.5)).double()
    x = torch.randn(10, D, dtype=torch.float64, requires_grad=True)
    out = router(x)
    C = math.ceil(1.5 * 10 * K / E)
    assert out.token_idx_EC.shape == (E, C)
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    for e in range(E):
        best = sorted(range(10), key=lambda t: -float(probs[t, e].detach()))[:C]
        assert out.token_idx_EC[e].tolist() == best
        torch.testing.assert_close(out.weights_EC[e], probs[best, e])
    g = torch.autograd.grad(out.weights_EC.sum(), router.weight)[0]
    assert g.abs().sum() > 0


@pytest.mark.parametrize("name", ["softmax", "softmax_after", "sigmoid_norm_scaled", "group_top2"])
def test_gradcheck_router_weights(name):
    torch.manual_seed(8)
    router = build_router(E, K, D, rcfg(**TOKEN_CHOICE[name])).double()
    x = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    w = router.weight.detach().clone().requires_grad_()

    def fn(x, w):
        out = torch.func.functional_call(router, {"weight": w}, (x,))
        return out.weights_TK, out.probs_TE

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-7)


def test_router_math_is_float32_for_bf16():
    router = build_router(E, K, D, rcfg()).to(torch.bfloat16)
    out = router(torch.randn(4, D, dtype=torch.bfloat16))
    assert out.probs_TE.dtype == torch.float32 and out.weights_TK.dtype == torch.float32


def test_router_stays_float32_under_bf16_autocast():
    torch.manual_seed(10)
    router = build_router(E, K, D, rcfg(kind="noisy_topk"))
    x = torch.randn(6, D)
    router.eval()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = router(x)
    assert out.logits_TE.dtype == torch.float32
    torch.testing.assert_close(out.logits_TE, x @ router.weight.t(), rtol=1e-6, atol=1e-6)


def test_sinkhorn_selection_balances_a_skewed_router():
    torch.manual_seed(9)
    router = build_router(E, 1, D, rcfg(), BalanceConfig(sinkhorn=True, sinkhorn_iters=20)).double()
    with torch.no_grad():
        router.weight[0] += 3 * router.weight.new_ones(D)  # expert 0 wins most tokens
    x = torch.randn(400, D, dtype=torch.float64).abs()
    balanced = torch.bincount(router(x).expert_ids_TK.reshape(-1), minlength=E)
    router.eval()  # Sinkhorn selection is for training only
    skewed = torch.bincount(router(x).expert_ids_TK.reshape(-1), minlength=E)
    assert skewed[0] > 200 and balanced.max() < 100


def test_registry_refuses_duplicates():
    assert set(ROUTERS) == {"topk", "noisy_topk", "group_limited", "hash", "expert_choice"}
    with pytest.raises(ValueError, match="twice"):
        register_router("topk")(Router)


def test_gather_k_gradient_is_the_scatter_add_without_a_scatter():
    """The combine weights' gather: forward and gradient equal torch.gather's exactly (distinct ids per
    row, as top-k gives), and the traced backward holds no scatter or index_put (with deterministic
    algorithms on CUDA those run as a sort plus an accumulating index_put)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from anymoe.core.router import gather_k

    gen = torch.Generator().manual_seed(5)
    T, E, K = 37, 11, 3
    src = torch.randn(T, E, dtype=torch.float64, generator=gen)
    ids = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices
    g = torch.randn(T, K, dtype=torch.float64, generator=gen)
    a, b = src.clone().requires_grad_(), src.clone().requires_grad_()
    out = gather_k(a, ids)
    out.backward(g)
    ref = b.gather(1, ids)
    ref.backward(g)
    assert torch.equal(out, ref) and torch.equal(a.grad, b.grad)
    want = b.grad.clone()
    dup = ids.clone()
    dup[:, 1] = dup[:, 0]  # repeated ids still sum their terms (not bit for bit in general)
    a.grad = b.grad = None
    gather_k(a, dup).backward(g)
    b.gather(1, dup).backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-15, atol=1e-15)

    targets: list[str] = []

    def record(gm, _inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    c = src.clone().requires_grad_()
    torch.compile(gather_k, backend=backend)(c, ids).backward(g)
    assert torch.equal(c.grad, want)
    assert any("gather" in t for t in targets)
    assert not any("scatter" in t or "index_put" in t for t in targets), targets
