"""The qk-norm + RoPE kernels (anymoe/backends/cuda_qk_rope_kernels.py) on a CUDA device against
float64 autograd of the torch formula: eager, under torch.compile(fullgraph=True) (the custom
ops), captured in a CUDA graph, and once at the moe-1b size.

Run on the GPU machine: ``python -m pytest -m gpu tests/backends/test_cuda_qk_rope.py``.

Inputs as the model has them: x a slice of the fused [B, S, (Hq + 2G) * D] projection viewed as
[B, S, H, D], cos/sin [B, S, D] expanded over B, dy with the [B, H, S, D]-contiguous strides of
attention's backward. Tolerances on max |a - ref| / max |ref|: fp32 1e-5 (fp32 arithmetic),
bf16 1e-2 and fp16 2e-3 (one rounding to nearest at the output: <= 2^-9 and 2^-12 of a value).
"""

import pytest
import torch
from cuda_graph_capture import capture

from anymoe.core.qk_norm_rope import TORCH_QK_NORM_ROPE_OPS, qk_norm_rope, qk_norm_rope_ops_for

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_empty")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)
qk = pytest.importorskip("anymoe.backends.cuda_qk_rope_kernels")
if not qk.HAVE_TRITON:
    pytest.skip("needs Triton (not importable here)", allow_module_level=True)

DEV = torch.device("cuda")
EPS = 1e-6
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16


class Problem:
    """qkv [B, S, (Hq + 2H) * D] (the leaf), x its k slice [B, S, H, D], the gain, the tables and
    dy [B, S, H, D] over [B, H, S, D] memory, all on the device; ``head`` selects the slice."""

    def __init__(self, B, S, H, D, xdt, wdt, seed=0, Hq=None):
        g = torch.Generator().manual_seed(seed)
        self.shape, self.Hq = (B, S, H, D), H + 1 if Hq is None else Hq
        W = (self.Hq + 2 * H) * D
        self.qkv = torch.randn(B, S, W, generator=g, dtype=torch.float64).to(DEV, xdt)
        w = 1 + 0.2 * torch.randn(D, generator=g, dtype=torch.float64)
        self.w = None if wdt is None else w.to(DEV, wdt)
        ang = torch.rand(1, S, D, generator=g, dtype=torch.float64) * 6.3  # any table, halves unequal
        self.cos = ang.cos().to(DEV, xdt).expand(B, S, D)
        self.sin = ang.sin().to(DEV, xdt).expand(B, S, D)
        ydt = xdt if wdt is None else torch.promote_types(xdt, wdt)
        self.dy_BHSD = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(DEV, ydt)
        self.lo, self.hi = self.Hq * D, (self.Hq + H) * D

    def x(self, qkv):
        return qkv[..., self.lo:self.hi].view(self.shape)

    def reference(self):
        """(y, dx, dw) in float64 (on the device: float64 goes to the torch formula)."""
        xr = self.x(self.qkv.detach().double()).clone().requires_grad_()
        wr = None if self.w is None else self.w.double().requires_grad_()
        y = TORCH_QK_NORM_ROPE_OPS.qk_norm_rope(xr, wr, EPS, self.cos.double(), self.sin.double())
        y.backward(self.dy_BHSD.double().transpose(1, 2))
        return y.detach(), xr.grad, None if wr is None else wr.grad

    def leaves(self):
        qkv = self.qkv.detach().clone().requires_grad_()
        return qkv, None if self.w is None else self.w.detach().clone().requires_grad_()

    def check(self, y, qkv, w, ref):
        y_ref, dx_ref, dw_ref = ref
        _close(y, y_ref, y.dtype)
        assert y.is_contiguous()
        dqkv = qkv.grad
        _close(self.x(dqkv), dx_ref, qkv.dtype)
        assert not dqkv[..., :self.lo].any() and not dqkv[..., self.hi:].any()
        if w is not None:
            assert w.grad.dtype == w.dtype
            _close(w.grad, dw_ref, w.dtype)


def _close(a, ref, dtype):
    a = a.detach().double()
    assert torch.isfinite(a).all(), "non-finite values (an unwritten element?)"
    err = float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    assert err <= TOL[dtype], (err, dtype)


def test_ops_registered_for_cuda():
    assert qk_norm_rope_ops_for(torch.empty(1, device=DEV)) is qk.TRITON_QK_NORM_ROPE_OPS
    assert qk_norm_rope_ops_for(torch.empty(1, device=DEV), fast=False) is TORCH_QK_NORM_ROPE_OPS


@pytest.mark.parametrize("B, S, H, D", [(1, 3, 5, 8), (2, 33, 4, 64), (2, 17, 3, 128), (1, 9, 2, 256)])
@pytest.mark.parametrize("xdt, wdt", [(f32, f32), (bf16, bf16), (f16, f16), (bf16, f32), (f32, None),
                                      (bf16, None)])
def test_eager_matches_float64(B, S, H, D, xdt, wdt):
    p = Problem(B, S, H, D, xdt, wdt, seed=B * 1000 + S + D)
    qkv, w = p.leaves()
    y = qk_norm_rope(p.x(qkv), w, EPS, p.cos, p.sin)
    assert y.grad_fn.name().endswith("_QKNormRopeBackward"), y.grad_fn.name()
    assert y.dtype == p.dy_BHSD.dtype and y.is_contiguous()
    y.backward(p.dy_BHSD.transpose(1, 2))
    p.check(y, qkv, w, p.reference())


def test_eager_contiguous_dy_and_head_major_x():
    """The backward's other row order (dy contiguous), and an x in [B, H, S, D] memory."""
    p = Problem(2, 33, 4, 64, bf16, bf16, seed=7)
    ref = p.reference()
    qkv, w = p.leaves()
    y = qk_norm_rope(p.x(qkv), w, EPS, p.cos, p.sin)
    y.backward(p.dy_BHSD.transpose(1, 2).contiguous())
    p.check(y, qkv, w, ref)
    x_BHSD = p.x(p.qkv).transpose(1, 2).contiguous().requires_grad_()
    y = qk_norm_rope(x_BHSD.transpose(1, 2), p.w, EPS, p.cos, p.sin)
    _close(y, ref[0], bf16)


@pytest.mark.parametrize("xdt, wdt", [(f32, f32), (bf16, bf16), (bf16, None)])
def test_compiled_uses_the_custom_ops_and_matches_float64(xdt, wdt, monkeypatch):
    p = Problem(2, 33, 4, 64, xdt, wdt, seed=11)
    calls = []
    for name in ("launch_qk_norm_rope_fwd", "launch_qk_norm_rope_bwd"):  # what the custom ops call
        real = getattr(qk, name)
        monkeypatch.setattr(qk, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))

    def attention_inputs(qkv, w):  # the model's use: RoPE'd rows, then the transposed view
        return qk_norm_rope(p.x(qkv), w, EPS, p.cos, p.sin).transpose(1, 2)

    torch.compiler.reset()  # a fresh compile: past dynamo's recompile limit it would run eagerly
    compiled = torch.compile(attention_inputs, fullgraph=True)
    qkv, w = p.leaves()
    out = compiled(qkv, w)
    out.backward(p.dy_BHSD)
    assert calls == ["launch_qk_norm_rope_fwd", "launch_qk_norm_rope_bwd"], calls
    p.check(out.transpose(1, 2), qkv, w, p.reference())


def test_cuda_graph_replay_matches_eager():
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.use_deterministic_algorithms(False)
    p = Problem(2, 64, 4, 64, bf16, bf16, seed=13)
    qkv, w = p.leaves()
    dy = p.dy_BHSD.transpose(1, 2)

    def step():
        y = qk_norm_rope(p.x(qkv), w, EPS, p.cos, p.sin)
        return (y, *torch.autograd.grad(y, (qkv, w), dy))

    graph, static = capture(step)
    with torch.no_grad():
        qkv.copy_(torch.randn_like(qkv))  # new inputs in the captured buffers
        w.copy_(torch.rand_like(w) + 0.5)
    graph.replay()
    fresh = step()
    for a, b in zip(static, fresh):
        assert torch.equal(a, b)  # same kernels, same order: bitwise


@pytest.mark.parametrize("compiled", [False, True])
def test_moe_1b_size_bf16(compiled):
    """B=8, S=2048, 16 query and 4 key heads of 64 from one fused projection, as in moe-1b."""
    B, S, Hq, G, D = 8, 2048, 16, 4, 64
    q = Problem(B, S, Hq, D, bf16, bf16, seed=17, Hq=0)
    k = Problem(B, S, G, D, bf16, bf16, seed=18, Hq=Hq)
    k.qkv = q.qkv = torch.cat([q.qkv[..., :Hq * D], k.qkv[..., Hq * D:]], -1)  # one buffer, two slices
    k.cos, k.sin = q.cos, q.sin
    fn = qk_norm_rope
    if compiled:
        torch.compiler.reset()
        fn = torch.compile(qk_norm_rope, fullgraph=True)
    for p in (q, k):
        qkv, w = p.leaves()
        y = fn(p.x(qkv), w, EPS, p.cos, p.sin)
        y.backward(p.dy_BHSD.transpose(1, 2))
        p.check(y, qkv, w, p.reference())


def test_what_the_kernels_do_not_take_runs_the_formula():
    g = torch.Generator().manual_seed(19)
    x = torch.randn(2, 3, 2, 16, generator=g).to(DEV)
    w = torch.ones(16, device=DEV)
    cos, sin = torch.randn(2, 3, 16, device=DEV), torch.randn(2, 3, 16, device=DEV)
    odd = torch.randn(2, 3, 2, 7, device=DEV)
    wide = torch.randn(1, 2, 2, 512, device=DEV)
    for args in [(x.double(), w.double(), EPS, cos.double(), sin.double()),  # float64
                 (odd, torch.ones(7, device=DEV), EPS, cos[..., :7], sin[..., :7]),  # odd D
                 (wide, torch.ones(512, device=DEV), EPS, torch.randn(1, 2, 512, device=DEV),
                  torch.randn(1, 2, 512, device=DEV)),  # D > 256
                 (x, w, EPS, cos.clone().requires_grad_(), sin),  # the table wants a gradient
                 (x.transpose(2, 3).contiguous().transpose(2, 3), w, EPS, cos, sin)]:  # last stride 2
        out = qk_norm_rope(*args)
        assert out.grad_fn is None or not out.grad_fn.name().endswith("_QKNormRopeBackward")
        assert torch.equal(out, TORCH_QK_NORM_ROPE_OPS.qk_norm_rope(*args))


@pytest.mark.parametrize("xdt, wdt", [(f32, f32), (bf16, bf16), (bf16, None)])
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_qkv_op_matches_float64_and_writes_the_gradient_whole(xdt, wdt, compiled):
    """qkv_norm_rope: q and k through the kernels, v copied, and one backward writing the whole
    projection gradient (compiled: the two custom ops, and no concatenation in the graph)."""
    from aot_graph_recorder import recording_backend

    from anymoe.core.qk_norm_rope import qkv_norm_rope

    g = torch.Generator().manual_seed(7)
    B, S, Hq, G, D = 2, 64, 16, 4, 64
    qkv = torch.randn(B, S, Hq + 2 * G, D, generator=g, dtype=torch.float64)
    ws = [None if wdt is None else 1 + 0.2 * torch.randn(D, generator=g, dtype=torch.float64)
          for _ in range(2)]
    ang = torch.rand(1, S, D, generator=g, dtype=torch.float64) * 6.3
    ydt = xdt if wdt is None else torch.promote_types(xdt, wdt)
    grads = [torch.randn(B, h, S, D, generator=g, dtype=torch.float64).transpose(1, 2) for h in (Hq, G, G)]
    qkv_r = qkv.to(DEV, xdt).double().requires_grad_()
    ws_r = [None if w is None else w.to(DEV, wdt).double().requires_grad_() for w in ws]
    refs = TORCH_QK_NORM_ROPE_OPS.qkv_norm_rope(qkv_r, Hq, G, *ws_r, EPS, ang.cos().to(DEV, xdt).double(),
                                                ang.sin().to(DEV, xdt).double())
    sum((r * gr.to(DEV)).sum() for r, gr in zip(refs, grads)).backward()
    recorder, targets = recording_backend()
    torch._dynamo.reset()
    fn = torch.compile(qkv_norm_rope, backend=recorder, fullgraph=True) if compiled else qkv_norm_rope
    qkv_k = qkv.to(DEV, xdt).requires_grad_()
    ws_k = [None if w is None else w.to(DEV, wdt).requires_grad_() for w in ws]
    outs = fn(qkv_k, Hq, G, *ws_k, EPS, ang.cos().to(DEV, xdt), ang.sin().to(DEV, xdt))
    sum((o * gr.to(DEV, o.dtype)).sum() for o, gr in zip(outs, grads)).backward()
    assert outs[0].dtype == outs[1].dtype == ydt and outs[2].dtype == xdt
    for a, ref in [(outs[0], refs[0]), (outs[1], refs[1]), (outs[2], refs[2]), (qkv_k.grad, qkv_r.grad)]:
        _close(a, ref, a.dtype)
    for wk, wr in zip(ws_k, ws_r):
        if wk is not None:
            _close(wk.grad, wr.grad, wdt)
    if compiled:
        assert "anymoe.qkv_norm_rope_fwd.default" in targets and "anymoe.qkv_norm_rope_bwd.default" in targets
        assert "aten.cat.default" not in targets, targets
