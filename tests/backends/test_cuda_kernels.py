"""Triton kernels of the fast dispatch path, on a CUDA device, against float64 references.

Run on the GPU machine: ``python -m pytest -m gpu tests/backends/test_cuda_kernels.py``.
"""

import pytest
import torch
from cuda_graph_capture import capture

from anymoe.core import dispatch_fast as dfast
from anymoe.core.grouped_mm import grouped_mm_loop

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_empty")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)
ck = pytest.importorskip("anymoe.backends.cuda_kernels")
if not ck.HAVE_TRITON:
    pytest.skip("needs Triton (not importable here)", allow_module_level=True)

DEV = torch.device("cuda")


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values (an unwritten element?)"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _ids(T, K, E, gen, skew=0.0):
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64)
    if skew:
        logits -= skew * torch.log(torch.arange(1, E + 1, dtype=torch.float64))
    return logits.topk(K, dim=-1).indices


def test_ops_registered_for_cuda():
    assert dfast.dispatch_ops_for(torch.empty(1, device=DEV)) is ck.TRITON_OPS


@pytest.mark.parametrize("N, E", [(131072, 64), (4097, 6), (3, 256), (0, 8)])
def test_expert_counts_histogram_matches_bincount(N, E):
    g = torch.Generator().manual_seed(N + E)
    ids = torch.randint(-1, E, (N,), generator=g)  # -1: dropped pairs, not counted
    ref = torch.bincount(ids[ids >= 0], minlength=E)
    out = ck.TRITON_OPS.expert_counts(ids.to(DEV), E)
    assert out.dtype == torch.int64 and torch.equal(out.cpu(), ref)
    compiled = torch.compile(lambda t: ck.TRITON_OPS.expert_counts(t, E), fullgraph=True)
    assert torch.equal(compiled(ids.to(DEV)).cpu(), ref)


def _topk_ref(s_TE, k):
    """The kernel's order, vectorised: a stable descending sort of the scores (NaN as +inf), so
    ties keep the lower index first; the interpreter test checks the same order against a loop."""
    key = s_TE.double().cpu().nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    return key.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def _check_topk(s_TE, k):
    """Eager and compiled (fullgraph) against the reference; index sets against torch.topk's
    on NaN-free rows with distinct scores."""
    ref = _topk_ref(s_TE, k)
    # A fresh compile each time: the lambda's code object is shared by every call, and past
    # dynamo's recompile limit (new k, dtype) it would run eagerly without saying so.
    torch.compiler.reset()
    compiled = torch.compile(lambda t: ck.TRITON_OPS.topk_ids(t, k), fullgraph=True)
    for ids in (ck.TRITON_OPS.topk_ids(s_TE, k), compiled(s_TE)):
        assert ids.dtype == torch.int64 and ids.shape == ref.shape
        ids = ids.cpu()
        assert ((ids >= 0) & (ids < s_TE.shape[1])).all()
        assert (ids.sort(1).values.diff(dim=1) > 0).all()  # distinct per row
        assert torch.equal(ids, ref)
    return ref


@pytest.mark.parametrize("T, E, k", [(16384, 64, 8), (1000, 64, 8), (37, 6, 2), (5, 256, 1), (0, 8, 2),
                                     (3, 8, 8), (64, 1024, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_ids_kernel_matches_reference(T, E, k, dtype):
    g = torch.Generator().manual_seed(T + E + k)
    s = torch.randn(T, E, generator=g).to(dtype).to(DEV)
    ref = _check_topk(s, k)
    plain = s.cpu().float()
    distinct = torch.tensor([len(set(row)) == E for row in plain.tolist()], dtype=torch.bool)
    torch_set = plain.topk(k, dim=-1).indices.sort(1).values
    assert torch.equal(ref.sort(1).values[distinct], torch_set[distinct])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_ids_kernel_ties_nan_and_minus_inf(dtype):
    g = torch.Generator().manual_seed(3)
    _check_topk(torch.randint(0, 4, (4096, 64), generator=g).to(dtype).to(DEV), 8)  # ties
    s = torch.randn(512, 64, generator=g)
    s[torch.rand(512, 64, generator=g) < 0.1] = float("nan")
    s[7] = float("nan")
    _check_topk(s.to(dtype).to(DEV), 8)
    s = torch.randn(512, 64, generator=g)
    s[:100, 3:] = float("-inf")  # group-limited masking leaves fewer than k experts
    s[100:200] = float("-inf")
    _check_topk(s.to(dtype).to(DEV), 8)
    _check_topk(torch.full((5, 8), float("-inf"), device=DEV, dtype=dtype), 8)


def test_topk_ids_fallbacks_to_torch():
    s = torch.randn(10, 2048, device=DEV)  # E > 1024
    assert torch.equal(ck.TRITON_OPS.topk_ids(s, 4), s.topk(4, dim=-1).indices)
    d = torch.randn(10, 64, device=DEV, dtype=torch.float64)
    assert torch.equal(ck.TRITON_OPS.topk_ids(d, 4), d.topk(4, dim=-1).indices)


def test_group_limited_router_on_cuda_takes_kernel_ids():
    from anymoe.core.router import RouterConfig, build_router

    E, K, D = 64, 8, 32
    router = build_router(E, K, D, RouterConfig(kind="group_limited", n_groups=8, topk_groups=2)).to(DEV)
    x = torch.randn(2048, D, device=DEV)
    ids = router(x).expert_ids_TK
    logits = router.logits(x)
    scores, _ = router.scores(logits)
    sel_TE = router.limit(router.selection_scores(scores, logits))  # 48 of 64 experts at -inf
    assert dfast.dispatch_ops_for(sel_TE) is ck.TRITON_OPS  # the router's top-k goes to the kernel
    assert torch.equal(ids.cpu(), _topk_ref(sel_TE, K))


@pytest.mark.parametrize("D", [64, 100, 2048, 4096 + 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_and_gather_sum(D, dtype):
    T, K, E = 300, 3, 9
    gen = torch.Generator().manual_seed(D)
    index = dfast.build_route_index(_ids(T, K, E, gen).to(DEV), E)
    x64 = torch.randn(T, D, generator=gen, dtype=torch.float64)
    y64 = torch.randn(T * K, D, generator=gen, dtype=torch.float64)
    src, pos = index.src_token_R.cpu(), index.sorted_pos_TK.cpu()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    got = ck.TRITON_OPS.gather_rows(x64.to(dtype).to(DEV), index.src_token_R)
    assert _rel(got, x64[src]) < tol
    got = ck.TRITON_OPS.gather_sum(y64.to(dtype).to(DEV), index.sorted_pos_TK)
    assert _rel(got, y64[pos.reshape(-1)].view(T, K, D).sum(1)) < tol


@pytest.mark.parametrize("F", [48, 1408, 2816 + 16])
def test_swiglu_weighted_kernels(F):
    R = 513
    gen = torch.Generator().manual_seed(F)
    h64 = torch.randn(R, 2 * F, generator=gen, dtype=torch.float64) * 2
    w64 = torch.rand(R, generator=gen, dtype=torch.float64)
    g64 = torch.randn(R, F, generator=gen, dtype=torch.float64)
    ref_h, ref_w = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    ref = torch.nn.functional.silu(ref_h[:, :F]) * ref_h[:, F:] * ref_w[:, None]
    (ref * g64).sum().backward()
    h = h64.to(torch.bfloat16).to(DEV).requires_grad_()
    w = w64.float().to(DEV).requires_grad_()
    out = dfast.swiglu_weighted(h, w)
    (out.double() * g64.to(DEV)).sum().backward()
    assert _rel(out, ref) < 1e-2
    assert _rel(h.grad, ref_h.grad) < 1e-2
    assert _rel(w.grad, ref_w.grad) < 1e-2


def _problem(T, K, E, D, Fh, skew, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = _ids(T, K, E, gen, skew)
    leaves = {
        "x": torch.randn(T, D, generator=gen, dtype=torch.float64),
        "w": torch.softmax(torch.randn(T, K, generator=gen, dtype=torch.float64), -1),
        "w13": torch.randn(E, D, 2 * Fh, generator=gen, dtype=torch.float64) / D**0.5,
        "w2": torch.randn(E, Fh, D, generator=gen, dtype=torch.float64) / Fh**0.5,
    }
    return ids, leaves, torch.randn(T, D, generator=gen, dtype=torch.float64)


def _grouped_mm():
    from anymoe.core import grouped_mm as gmm

    return getattr(gmm, "grouped_mm_torch", None) or grouped_mm_loop


@pytest.mark.parametrize("skew", [0.0, 5.0])
def test_fast_path_matches_float64_loop(skew):
    T, K, E, D, Fh = 96, 4, 8, 64, 48
    ids, leaves, g = _problem(T, K, E, D, Fh, skew, seed=int(skew) + 1)
    ref = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    out_ref = dfast.moe_ffn_reference(ref["x"], ids, ref["w"], ref["w13"], ref["w2"])
    (out_ref * g).sum().backward()
    dts = {"w": torch.float32}
    got = {k: v.to(DEV, dts.get(k, torch.bfloat16)).requires_grad_() for k, v in leaves.items()}
    out = dfast.moe_ffn_fast(got["x"], ids.to(DEV), got["w"], got["w13"], got["w2"], _grouped_mm())
    (out.double() * g.to(DEV)).sum().backward()
    assert _rel(out, out_ref) < 2e-2
    for k in leaves:
        assert _rel(got[k].grad, ref[k].grad) < 2e-2, k


def _fast_step(x, ids, w, w13, w2, g, gmm):
    out = dfast.moe_ffn_fast(x, ids, w, w13, w2, gmm)
    return torch.autograd.grad((out * g).sum(), (x, w, w13, w2))


def test_torch_compile_and_cuda_graph_match_eager():
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.use_deterministic_algorithms(False)
    T, K, E, D, Fh = 256, 2, 8, 128, 64
    ids, leaves, g = _problem(T, K, E, D, Fh, 0.0, seed=5)
    dt = {"w": torch.float32}
    args = [leaves[k].to(DEV, dt.get(k, torch.bfloat16)).requires_grad_() for k in ("x", "w", "w13", "w2")]
    ids, g = ids.to(DEV), g.to(DEV, torch.bfloat16)
    gmm = _grouped_mm()
    eager = _fast_step(args[0], ids, *args[1:], g, gmm)
    compiled = torch.compile(_fast_step)(args[0], ids, *args[1:], g, gmm)
    for a, b in zip(compiled, eager):
        assert _rel(a, b) < 1e-2
    # CUDA graph: capture once, then replay on new routing copied into the static inputs.
    static_ids = ids.clone()
    graph, static_out = capture(lambda: _fast_step(args[0], static_ids, *args[1:], g, gmm))
    new_ids, _, _ = _problem(T, K, E, D, Fh, 4.0, seed=6)
    static_ids.copy_(new_ids.to(DEV))
    graph.replay()
    fresh = _fast_step(args[0], static_ids.clone(), *args[1:], g, gmm)
    for a, b in zip(static_out, fresh):
        assert _rel(a, b) < 1e-2


@pytest.mark.parametrize("K,D", [(1, 64), (2, 1024), (6, 2048), (8, 1000)])
def test_weighted_combine_kernels(K, D):
    T, E = 257, 16
    gen = torch.Generator().manual_seed(K * 1000 + D)
    index = dfast.build_route_index(_ids(T, K, E, gen).to(DEV), E)
    pos = index.sorted_pos_TK.cpu()
    y64 = torch.randn(T * K, D, generator=gen, dtype=torch.float64)
    w64 = torch.rand(T, K, generator=gen, dtype=torch.float64)
    g64 = torch.randn(T, D, generator=gen, dtype=torch.float64)
    ry, rw = y64.clone().requires_grad_(), w64.clone().requires_grad_()
    ref = (ry[pos.reshape(-1)].view(T, K, D) * rw[..., None]).sum(1)
    ref.backward(g64)
    y = y64.to(DEV, torch.bfloat16).requires_grad_()
    w = w64.to(DEV, torch.float32).requires_grad_()
    out = dfast.combine(y, index.sorted_pos_TK, w)
    out.backward(g64.to(DEV, torch.bfloat16))
    assert _rel(out, ref) < 1e-2 and _rel(y.grad, ry.grad) < 1e-2 and _rel(w.grad, rw.grad) < 1e-2


def test_plain_swiglu_kernel():
    R, Fh = 300, 1408
    gen = torch.Generator().manual_seed(9)
    h64 = (torch.randn(R, 2 * Fh, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    g64 = torch.randn(R, Fh, generator=gen, dtype=torch.float64)
    ref = torch.nn.functional.silu(h64[:, :Fh]) * h64[:, Fh:]
    ref.backward(g64)
    h = h64.detach().to(DEV, torch.bfloat16).requires_grad_()
    out = dfast.swiglu(h)
    out.backward(g64.to(DEV, torch.bfloat16))
    assert _rel(out, ref) < 1e-2 and _rel(h.grad, h64.grad) < 1e-2


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_fast_dispatcher_layer_on_gpu_matches_float64(capacity_factor):
    """MoELayer(dispatcher=FastLocalDispatcher) in bf16 on the GPU vs the same layer in float64 on the CPU."""
    from anymoe.core.backend import get_backend
    from anymoe.core.moe import MoEConfig, MoELayer

    # position drop policy: which pairs go over capacity depends on the ids alone, not on bf16 scores.
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=96, capacity_factor=capacity_factor,
                    drop_policy="position", fused_w13=True)
    torch.manual_seed(3)
    ref = MoELayer(cfg, 64).double()
    gmm = get_backend("cuda").grouped_mm
    fast = MoELayer(cfg, 64, grouped_mm=gmm, dispatcher=dfast.FastLocalDispatcher(8))
    fast.load_state_dict(ref.state_dict())
    fast = fast.to(DEV, torch.bfloat16)
    x = torch.randn(4, 32, 64, dtype=torch.float64)
    g = torch.randn(4, 32, 64, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    yr, _ = ref(xr)
    yr.backward(g)
    xf = x.to(DEV, torch.bfloat16).requires_grad_()
    # Route both on the reference's choice so near-ties in bf16 cannot flip an expert.
    yf, _ = fast(xf, replay_ids=_replay(ref, xr))
    yf.backward(g.to(DEV, torch.bfloat16))
    assert _rel(yf, yr) < 3e-2 and _rel(xf.grad, xr.grad) < 3e-2
    grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert _rel(p.grad, grads[name].grad) < 3e-2, name


def _replay(layer, x):
    with torch.no_grad():
        return layer.route(x.reshape(-1, x.shape[-1]), None, None).expert_ids_TK


@pytest.mark.parametrize("N, D, dt, wdt", [(16384, 1024, torch.bfloat16, torch.bfloat16),
                                           (37, 1000, torch.bfloat16, torch.float32),
                                           (64, 4104, torch.float32, torch.float32),
                                           (3, 64, torch.float16, torch.float16)])
def test_rms_norm_kernels_match_float64(N, D, dt, wdt):
    from anymoe.backends import cuda_norm_kernels as nk
    from anymoe.core.norm import TORCH_NORM_OPS, rms_norm

    g = torch.Generator().manual_seed(N + D)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = 1 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    gy = torch.randn(N, D, generator=g, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = TORCH_NORM_OPS.rms_norm(xr, wr, 1e-6)
    (ref * gy).sum().backward()
    xk, wk = x.to(DEV, dt).requires_grad_(), w.to(DEV, wdt).requires_grad_()
    y = rms_norm(xk, wk, 1e-6)  # the registered kernels (eager)
    assert y.grad_fn.name().endswith("_RMSNormBackward"), y.grad_fn.name()
    (y * gy.to(DEV, y.dtype)).sum().backward()
    tol = 1e-6 if dt == torch.float32 else 1e-2
    assert _rel(y, ref) < tol and _rel(xk.grad, xr.grad) < tol and _rel(wk.grad, wr.grad) < tol
    # the torch formula in the same dtypes (what torch.compile traces) agrees as closely
    xt, wt = x.to(DEV, dt).requires_grad_(), w.to(DEV, wdt).requires_grad_()
    yt = TORCH_NORM_OPS.rms_norm(xt, wt, 1e-6)
    (yt * gy.to(DEV, yt.dtype)).sum().backward()
    assert _rel(y, yt) < tol and _rel(xk.grad, xt.grad) < tol and _rel(wk.grad, wt.grad) < 4 * tol
    assert nk.TRITON_NORM_OPS is not None


@pytest.mark.parametrize("N, D, dt, wdt", [(16384, 1024, torch.bfloat16, torch.bfloat16),
                                           (16387, 1024, torch.bfloat16, torch.bfloat16),
                                           (37, 1000, torch.bfloat16, torch.float32),
                                           (64, 4104, torch.float32, torch.float32)])
@pytest.mark.parametrize("compiled", [False, True])
def test_add_rms_norm_kernels_match_float64(N, D, dt, wdt, compiled):
    """(s, y) = (x + d, norm(x + d)) and the x, d, weight gradients (s used downstream too),
    eagerly and under torch.compile (the custom ops), against the float64 torch formula."""
    from anymoe.core.norm import TORCH_NORM_OPS, add_rms_norm

    g = torch.Generator().manual_seed(N + D)
    x, d, gy, gs = (torch.randn(N, D, generator=g, dtype=torch.float64) for _ in range(4))
    w = 1 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    xr, dr, wr = x.clone().requires_grad_(), d.clone().requires_grad_(), w.clone().requires_grad_()
    s_ref, y_ref = TORCH_NORM_OPS.add_rms_norm(xr, dr, wr, 1e-6)
    ((y_ref * gy).sum() + (s_ref * gs).sum()).backward()
    fn = torch.compile(add_rms_norm, fullgraph=True) if compiled else add_rms_norm
    xk, dk = x.to(DEV, dt).requires_grad_(), d.to(DEV, dt).requires_grad_()
    wk = w.to(DEV, wdt).requires_grad_()
    s, y = fn(xk, dk, wk, 1e-6)
    ((y * gy.to(DEV, y.dtype)).sum() + (s * gs.to(DEV, dt)).sum()).backward()
    tol = 1e-6 if dt == torch.float32 else 1e-2
    for a, b in [(s, s_ref), (y, y_ref), (xk.grad, xr.grad), (dk.grad, dr.grad), (wk.grad, wr.grad)]:
        assert _rel(a, b) < tol


def test_add_rms_norm_is_one_custom_op_per_direction_under_compile():
    from aot_graph_recorder import recording_backend

    from anymoe.core.norm import add_rms_norm

    torch._dynamo.reset()
    x, d = (torch.randn(4, 64, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    w = torch.ones(256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    recorder, targets = recording_backend()
    fn = torch.compile(add_rms_norm, backend=recorder, fullgraph=True)
    s, y = fn(x, d, w, 1e-6)
    (s.float().sum() + y.float().square().sum()).backward()
    assert "anymoe.add_rms_norm_fwd.default" in targets and "anymoe.rms_norm_bwd.default" in targets, targets
    assert not any("rsqrt" in t or "aten.add" in t for t in targets), targets


def test_rms_norm_under_compile_is_the_formula():
    from anymoe.core.norm import rms_norm

    x = torch.randn(8, 256, device=DEV, dtype=torch.bfloat16)
    w = torch.rand(256, device=DEV, dtype=torch.bfloat16)
    compiled = torch.compile(lambda a, b: rms_norm(a, b, 1e-6), fullgraph=True)
    assert _rel(compiled(x, w), rms_norm(x, w, 1e-6)) < 1e-2
