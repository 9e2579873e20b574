"""The fast dispatch path (pure-torch twin) against float64 plain-loop references."""

import math

import pytest
import torch

from anymoe.core import dispatch_fast as dfast
from anymoe.core.grouped_mm import grouped_mm_loop


def _random_ids(T, K, E, gen, skew=0.0):
    """Top-k ids without repeats per token; skew > 0 draws Zipf-like loads."""
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64)
    if skew:
        logits = logits - skew * torch.log(torch.arange(1, E + 1, dtype=torch.float64))
    return logits.topk(K, dim=-1).indices


def test_worked_example():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    index = dfast.build_route_index(ids, 3)
    assert index.perm_R.tolist() == [1, 2, 3, 5, 0, 4]
    assert index.src_token_R.tolist() == [0, 1, 1, 2, 0, 2]
    assert index.counts_E.tolist() == [2, 2, 2]
    assert index.sorted_pos_TK.tolist() == [[4, 0], [1, 2], [5, 3]]


@pytest.mark.parametrize("T,K,E,skew", [(1, 1, 1, 0.0), (17, 2, 5, 0.0), (40, 3, 8, 3.0), (64, 4, 16, 6.0)])
def test_route_index_matches_loop(T, K, E, skew):
    gen = torch.Generator().manual_seed(T * 131 + E)
    ids = _random_ids(T, K, E, gen, skew)
    index = dfast.build_route_index(ids, E)
    # Plain loop: walk experts in order, tokens in order within an expert.
    order = [(t, k) for e in range(E) for t in range(T) for k in range(K) if ids[t, k] == e]
    assert index.perm_R.tolist() == [t * K + k for t, k in order]
    assert index.src_token_R.tolist() == [t for t, _ in order]
    for r, (t, k) in enumerate(order):
        assert index.sorted_pos_TK[t, k] == r
    assert index.counts_E.tolist() == [int((ids == e).sum()) for e in range(E)]
    assert index.counts_E.dtype == torch.int64


def test_empty_experts_and_all_on_one():
    ids = torch.zeros(6, 1, dtype=torch.int64) + 3
    index = dfast.build_route_index(ids, 5)
    assert index.counts_E.tolist() == [0, 0, 0, 6, 0]
    assert index.src_token_R.tolist() == list(range(6))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_permute_unpermute_forward_backward(dtype, tol):
    T, K, E, D = 23, 3, 6, 10
    gen = torch.Generator().manual_seed(7)
    ids = _random_ids(T, K, E, gen)
    index = dfast.build_route_index(ids, E)
    x64 = torch.randn(T, D, generator=gen, dtype=torch.float64)
    y64 = torch.randn(T * K, D, generator=gen, dtype=torch.float64)
    x = x64.to(dtype).requires_grad_()
    y = y64.to(dtype).requires_grad_()
    xp = dfast.permute(x, index)
    ys = dfast.unpermute_sum(y, index)
    # Loop reference: sorted row r is token src[r]; token t sums rows sorted_pos[t, :].
    ref_xp = torch.stack([x64[int(index.src_token_R[r])] for r in range(T * K)])
    ref_ys = torch.stack([sum(y64[int(index.sorted_pos_TK[t, k])] for k in range(K)) for t in range(T)])
    assert _rel(xp, ref_xp) < tol and _rel(ys, ref_ys) < tol
    gxp = torch.randn(T * K, D, generator=gen, dtype=torch.float64)
    gys = torch.randn(T, D, generator=gen, dtype=torch.float64)
    (xp.double() * gxp).sum().add((ys.double() * gys).sum()).backward()
    ref_gx = torch.zeros(T, D, dtype=torch.float64)
    for r in range(T * K):
        ref_gx[int(index.src_token_R[r])] += gxp[r]
    ref_gy = torch.stack([gys[int(index.src_token_R[r])] for r in range(T * K)])
    assert _rel(x.grad, ref_gx) < tol and _rel(y.grad, ref_gy) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_swiglu_weighted_forward_backward(dtype, tol):
    R, Fh = 19, 12
    gen = torch.Generator().manual_seed(3)
    h64 = torch.randn(R, 2 * Fh, generator=gen, dtype=torch.float64) * 2
    w64 = torch.rand(R, generator=gen, dtype=torch.float64)
    g64 = torch.randn(R, Fh, generator=gen, dtype=torch.float64)
    h64r, w64r = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    ref = torch.nn.functional.silu(h64r[:, :Fh]) * h64r[:, Fh:] * w64r[:, None]
    (ref * g64).sum().backward()
    h = h64.to(dtype).requires_grad_()
    w = w64.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    out = dfast.swiglu_weighted(h, w)
    assert out.dtype == dtype
    (out.double() * g64).sum().backward()
    assert _rel(out, ref) < tol
    assert _rel(h.grad, h64r.grad) < tol
    assert _rel(w.grad, w64r.grad) < max(tol, 1e-6)


@pytest.mark.parametrize("skew", [0.0, 4.0])
def test_moe_ffn_fast_matches_float64_loop(skew):
    T, K, E, D, Fh = 21, 2, 5, 8, 6
    gen = torch.Generator().manual_seed(11)
    ids = _random_ids(T, K, E, gen, skew)
    leaves = {
        "x": torch.randn(T, D, generator=gen, dtype=torch.float64),
        "w": torch.rand(T, K, generator=gen, dtype=torch.float64),
        "w13": torch.randn(E, D, 2 * Fh, generator=gen, dtype=torch.float64) / D**0.5,
        "w2": torch.randn(E, Fh, D, generator=gen, dtype=torch.float64) / Fh**0.5,
    }
    g = torch.randn(T, D, generator=gen, dtype=torch.float64)
    ref = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    out_ref = dfast.moe_ffn_reference(ref["x"], ids, ref["w"], ref["w13"], ref["w2"])
    (out_ref * g).sum().backward()
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        got = {k: v.to(dtype).clone().requires_grad_() for k, v in leaves.items()}
        out = dfast.moe_ffn_fast(got["x"], ids, got["w"], got["w13"], got["w2"], grouped_mm_loop)
        (out.double() * g).sum().backward()
        assert _rel(out, out_ref) < tol, dtype
        for k in leaves:
            assert _rel(got[k].grad, ref[k].grad) < tol, (dtype, k)


def test_ops_registry_refuses_duplicates():
    class Other(dfast.DispatchOps):
        name = "test-other"

    dfast.register_dispatch_ops("test-device", Other())
    with pytest.raises(ValueError, match="registered twice"):
        dfast.register_dispatch_ops("test-device", Other())


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_weighted_combine_and_plain_swiglu(dtype, tol):
    T, K, E, D = 15, 3, 4, 9
    gen = torch.Generator().manual_seed(21)
    index = dfast.build_route_index(_random_ids(T, K, E, gen), E)
    y64 = torch.randn(T * K, D, generator=gen, dtype=torch.float64)
    w64 = torch.rand(T, K, generator=gen, dtype=torch.float64)
    g64 = torch.randn(T, D, generator=gen, dtype=torch.float64)
    ry, rw = y64.clone().requires_grad_(), w64.clone().requires_grad_()
    pos = index.sorted_pos_TK
    ref = torch.stack([sum(rw[t, k] * ry[int(pos[t, k])] for k in range(K)) for t in range(T)])
    (ref * g64).sum().backward()
    y = y64.to(dtype).requires_grad_()
    w = w64.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    out = dfast.combine(y, index.sorted_pos_TK, w)
    (out.double() * g64).sum().backward()
    assert _rel(out, ref) < tol and _rel(y.grad, ry.grad) < tol and _rel(w.grad, rw.grad) < tol
    h64 = torch.randn(T, 2 * D, generator=gen, dtype=torch.float64).requires_grad_()
    ref = torch.nn.functional.silu(h64[:, :D]) * h64[:, D:]
    ref.backward(g64)
    h = h64.detach().to(dtype).requires_grad_()
    out = dfast.swiglu(h)
    out.backward(g64.to(dtype))
    assert _rel(out, ref) < tol and _rel(h.grad, h64.grad) < tol


def test_dropped_pairs_sort_last_into_last_expert():
    ids = torch.tensor([[1, -1], [0, 1], [-1, 0]])
    index = dfast.build_route_index(ids, 3)
    assert index.counts_E.tolist() == [2, 2, 2]  # the 2 dropped pairs ride on expert 2
    assert index.perm_R.tolist() == [2, 5, 0, 3, 1, 4]


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_fast_dispatcher_in_moe_layer_matches_local(capacity_factor):
    """MoELayer with FastLocalDispatcher (weights folded into the experts) == with the plain
    LocalDispatcher (weighted combine), float64, fwd + bwd."""
    from anymoe.core.dispatch import LocalDispatcher
    from anymoe.core.moe import MoEConfig, MoELayer

    cfg = MoEConfig(num_experts=6, top_k=2, expert_hidden=10, capacity_factor=capacity_factor, fused_w13=True)
    torch.manual_seed(1)
    ref = MoELayer(cfg, 12, dispatcher=LocalDispatcher(6)).double()
    fast = MoELayer(cfg, 12, dispatcher=dfast.FastLocalDispatcher(6)).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    g = torch.randn(2, 9, 12, dtype=torch.float64)
    outs = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_()
        y, aux = layer(xi)
        ((y * g).sum() + aux.loss).backward()
        outs.append((y, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    assert _rel(outs[1][0], outs[0][0]) < 1e-12 and _rel(outs[1][1], outs[0][1]) < 1e-12
    for name, grad in outs[0][2].items():
        assert _rel(outs[1][2][name], grad) < 1e-12, name


def test_folded_weights_equal_weighted_combine():
    """Experts(row_weights) + combine_summed == Experts() + the weighted combine (float64, fwd +
    bwd incl. the weights' gradient), and the folded path keeps no [R, D] output copy."""
    from anymoe.core.experts import Experts

    torch.manual_seed(2)
    T, K, E, D = 11, 3, 5, 16
    experts = Experts(E, D, 24, fused_w13=True).double()
    assert experts.takes_row_weights and not Experts(E, D, 24).takes_row_weights
    disp = dfast.FastLocalDispatcher(E)
    x = torch.randn(T, D, dtype=torch.float64)
    ids = torch.randn(T, E).topk(K, dim=-1).indices
    w = torch.rand(T, K, dtype=torch.float64)
    g = torch.randn(T, D, dtype=torch.float64)
    results, saved = [], []
    for fold in (False, True):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, sizes=sizes: sizes.append(t.shape) or t,
                                                      lambda t: t):
            x_ND, counts_E, meta = disp.dispatch(xi, ids, wi)
            if fold:
                y = disp.combine_summed(experts(x_ND, counts_E, disp.row_weights(meta)), meta)
            else:
                y = disp.combine(experts(x_ND, counts_E), meta)
        (y * g).sum().backward()
        results.append((y.detach(), xi.grad, wi.grad, [p.grad.clone() for p in experts.parameters()]))
        experts.zero_grad()
        saved.append(sizes)
    (y0, gx0, gw0, gp0), (y1, gx1, gw1, gp1) = results
    assert _rel(y1, y0) < 1e-12 and _rel(gx1, gx0) < 1e-12 and _rel(gw1, gw0) < 1e-12
    assert all(_rel(a, b) < 1e-12 for a, b in zip(gp1, gp0))
    rows = (T * K, D)  # the weighted combine saves the expert outputs for its backward; the sum does not
    assert saved[0].count(rows) == saved[1].count(rows) + 1


def _topk_ids_loop(scores_TE, k):
    """Plain reference of the topk_ids contract: per row, sort by (NaN first, score descending,
    index), take k. E.g. [2, nan, -inf, 2, 5], k=4 -> [1, 4, 0, 3] (ties 0 and 3: lower first)."""
    rows = []
    for row in scores_TE.double().tolist():
        nan = [math.isnan(v) for v in row]
        rows.append(sorted(range(len(row)), key=lambda e: (not nan[e], 0.0 if nan[e] else -row[e], e))[:k])
    return torch.tensor(rows, dtype=torch.int64).view(len(rows), k)


def test_topk_ids_worked_example():
    s = torch.tensor([[2.0, float("nan"), float("-inf"), 2.0, 5.0]])
    assert _topk_ids_loop(s, 4).tolist() == [[1, 4, 0, 3]]
    assert set(dfast.TORCH_OPS.topk_ids(s, 4)[0].tolist()) == {1, 4, 0, 3}


@pytest.mark.parametrize("T,E,k", [(300, 64, 8), (37, 6, 2), (5, 256, 1), (0, 8, 2), (3, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_ids_torch_default_matches_loop(T, E, k, dtype):
    gen = torch.Generator().manual_seed(T * 7 + E + k)
    scores = torch.randn(T, E, generator=gen, dtype=torch.float64).to(dtype)  # distinct in practice
    ids = dfast.TORCH_OPS.topk_ids(scores, k)
    assert ids.dtype == torch.int64 and ids.shape == (T, k)
    assert torch.equal(ids, _topk_ids_loop(scores, k))  # distinct values: set and order are fixed


def test_topk_ids_torch_default_ties_nan_and_masked_rows():
    gen = torch.Generator().manual_seed(11)
    T, E, k = 64, 16, 4
    scores = torch.randint(0, 3, (T, E), generator=gen).double()  # many ties
    scores[torch.rand(T, E, generator=gen) < 0.1] = float("nan")
    scores[:8, 3:] = float("-inf")  # 3 pickable experts for k = 4: one -inf pick per row
    scores[8:10] = float("-inf")  # nothing pickable: k distinct -inf experts
    ids = dfast.TORCH_OPS.topk_ids(scores, k)
    ref = _topk_ids_loop(scores, k)
    assert ((ids >= 0) & (ids < E)).all()
    assert all(len(set(row)) == k for row in ids.tolist())
    # Ties may come in any order from torch.topk: compare the chosen scores (NaN as +inf).
    key = scores.nan_to_num(nan=float("inf"))
    assert torch.equal(key.gather(1, ids), key.gather(1, ref))
