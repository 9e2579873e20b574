"""The qk-norm + RoPE kernels of anymoe/backends/cuda_qk_rope_kernels.py in Triton's CPU
interpreter (TRITON_INTERPRET=1, in a subprocess) against float64 autograd of the torch formula:
a check of kernel edits on a machine without a GPU. CPU builds of torch ship without Triton, so
this skips there; tests/backends/test_cuda_qk_rope.py (-m gpu) runs the compiled kernels.

The real kernels run through the real ops class and autograd.Function: a subclass only sets
``kernel_device_type = "cpu"``, and the launches are counted, so a silent fall back to torch
would fail. x is a slice of a fused [B, S, W] projection, dy has the [B, H, S, D]-contiguous
strides of attention's backward (and, once, contiguous strides), x head-major once too; each
case runs with the default tiles and with tiles so small that they cross token and head
boundaries and the backward loops over several tiles per program.

Tolerances: fp32 1e-5 of max |ref| (fp32 arithmetic only). The interpreter rounds fp32 -> bf16
by truncation (Triton 3.6's fp_trunc ignores the rounding mode; the GPU rounds to nearest), so
bf16 and fp16 outputs are held to 2 units of their spacing (adamw_reference.ulps) of the float64
value: one rounding, whichever way it goes.
"""

import pytest
import torch
from test_cuda_kernels_interpreter import _interpret

CODE = """
import sys
import torch
sys.path.insert(0, "tests/backends")
from adamw_reference import ulps
from anymoe.backends import cuda_qk_rope_kernels as qk
from anymoe.core.qk_norm_rope import TORCH_QK_NORM_ROPE_OPS

class InterpretedOps(qk.TritonQKNormRopeOps):
    name = "interpreted"
    kernel_device_type = "cpu"

OPS = InterpretedOps()
launched = []
for fn in ("launch_qk_norm_rope_fwd", "launch_qk_norm_rope_bwd"):
    def counted(*args, _real=getattr(qk, fn), _fn=fn, **kwargs):
        launched.append(_fn)
        return _real(*args, **kwargs)
    setattr(qk, fn, counted)

g = torch.Generator().manual_seed(0)
EPS = 1e-6

def inputs(B, S, H, D, xdt, wdt, head_major_x=False):
    Hq = H + 2
    W = (Hq + 2 * H) * D
    if head_major_x:  # x in [B, H, S, D] memory
        x64 = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(xdt).double().transpose(1, 2)
        x = x64.to(xdt)  # .to keeps the strides of a dense tensor
        assert x.stride(2) > x.stride(1)
    else:  # the k slice of the fused projection: strides (S * W, W, D, 1)
        qkv = torch.randn(B, S, W, generator=g, dtype=torch.float64).to(xdt)
        x = qkv[..., Hq * D:(Hq + H) * D].view(B, S, H, D)
        x64 = x.double()
    w = None if wdt is None else (1 + 0.2 * torch.randn(D, generator=g, dtype=torch.float64)).to(wdt)
    # angles of their own in each half (the model's tables repeat them): the op's contract is any
    # [B, S, D] table, and a kernel mixing up the halves' cos or sin must fail
    ang = torch.rand(1, S, D, generator=g, dtype=torch.float64) * 6.3
    cos, sin = ang.cos().to(xdt).expand(B, S, D), ang.sin().to(xdt).expand(B, S, D)  # stride 0 on B
    return x, w, cos, sin, x64

def check(a, ref, dt, what):
    assert a.dtype == dt, (what, a.dtype, dt)
    assert torch.isfinite(a).all(), what
    if ref.numel() == 0:
        return
    if dt == torch.float32:
        err = float((a.double() - ref).abs().max() / ref.abs().max())
        assert err <= 1e-5, (what, err)
    else:
        err = ulps(a, ref, dt)
        assert err <= 2, (what, err)

def run_case(B, S, H, D, xdt, wdt, dy_layout="BHSD", head_major_x=False):
    what = (B, S, H, D, xdt, wdt, dy_layout, head_major_x, qk._TILE, qk._MAX_PARTIALS)
    x, w, cos, sin, x64 = inputs(B, S, H, D, xdt, wdt, head_major_x)
    ydt = xdt if wdt is None else torch.promote_types(xdt, wdt)
    dy = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(ydt)
    dy = dy.transpose(1, 2) if dy_layout == "BHSD" else dy.transpose(1, 2).contiguous()
    # float64 reference from the same (rounded) inputs: only the kernels' arithmetic and their
    # one rounding at the output differ
    xr = x64.clone().requires_grad_()
    wr = None if w is None else w.double().requires_grad_()
    ref = TORCH_QK_NORM_ROPE_OPS.qk_norm_rope(xr, wr, EPS, cos.double(), sin.double())
    ref.backward(dy.double())
    xk = x.detach().requires_grad_()
    wk = None if w is None else w.detach().requires_grad_()
    launched.clear()
    y = OPS.qk_norm_rope(xk, wk, EPS, cos, sin)
    assert launched == ["launch_qk_norm_rope_fwd"], (what, launched)
    assert y.is_contiguous() and y.shape == (B, S, H, D), what
    y.backward(dy)
    assert launched == ["launch_qk_norm_rope_fwd", "launch_qk_norm_rope_bwd"], (what, launched)
    check(y.detach(), ref.detach(), ydt, ("y",) + what)
    check(xk.grad, xr.grad, xdt, ("dx",) + what)
    if w is not None:
        check(wk.grad, wr.grad, wdt, ("dw",) + what)

CASES = [
    (1, 3, 5, 8, torch.float32, torch.float32),
    (2, 33, 4, 64, torch.float32, torch.float32),
    (2, 5, 3, 128, torch.float32, torch.float32),
    (1, 3, 5, 8, torch.float32, None),
    (2, 33, 4, 64, torch.float32, None),
    (1, 3, 5, 8, torch.bfloat16, torch.bfloat16),
    (2, 33, 4, 64, torch.bfloat16, torch.bfloat16),
    (2, 5, 3, 128, torch.bfloat16, torch.bfloat16),
    (2, 33, 4, 64, torch.bfloat16, None),
    (2, 9, 4, 64, torch.bfloat16, torch.float32),  # fp32 gain: fp32 out, bf16 dx, fp32 dw
    (1, 7, 3, 32, torch.float16, torch.float16),
    (1, 4, 2, 2, torch.float32, torch.float32),  # D = 2: one RoPE pair
]
for tile, partials in [(qk._TILE, qk._MAX_PARTIALS), (64, 2)]:
    qk._TILE, qk._MAX_PARTIALS = tile, partials  # small: tiles cross heads and tokens, ITERS > 1
    for case in CASES:
        run_case(*case)
    run_case(2, 33, 4, 64, torch.float32, torch.float32, dy_layout="BSHD")
    run_case(2, 17, 3, 64, torch.float32, torch.float32, head_major_x=True)
    run_case(1, 1, 4, 16, torch.float32, torch.float32)  # S = 1
    run_case(1, 5, 1, 16, torch.float32, torch.float32)  # H = 1

# The fused q/k/v op: the q and k heads through the kernels, v copied; the backward writes the
# projection's gradient whole (q and k kernels into their slices, dv copied into the rest).
for xdt, wdt in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, None)]:
    B, S, Hq, G, D = 2, 9, 4, 2, 16
    what = ("qkv", xdt, wdt)
    qkv = torch.randn(B, S, Hq + 2 * G, D, generator=g, dtype=torch.float64).to(xdt)
    ws = [None if wdt is None else (1 + 0.2 * torch.randn(D, generator=g, dtype=torch.float64)).to(wdt)
          for _ in range(2)]
    ang = torch.rand(1, S, D, generator=g, dtype=torch.float64) * 6.3
    cos, sin = ang.cos().to(xdt), ang.sin().to(xdt)
    ydt = xdt if wdt is None else torch.promote_types(xdt, wdt)
    grads = [torch.randn(B, h, S, D, generator=g, dtype=torch.float64).to(dt).transpose(1, 2)
             for h, dt in ((Hq, ydt), (G, ydt), (G, xdt))]  # attention's [B, H, S, D]-strided grads
    qkv_r = qkv.double().requires_grad_()
    ws_r = [None if w is None else w.double().requires_grad_() for w in ws]
    refs = TORCH_QK_NORM_ROPE_OPS.qkv_norm_rope(qkv_r, Hq, G, *ws_r, EPS, cos.double(), sin.double())
    sum((r * gr.double()).sum() for r, gr in zip(refs, grads)).backward()
    qkv_k = qkv.detach().requires_grad_()
    ws_k = [None if w is None else w.detach().requires_grad_() for w in ws]
    launched.clear()
    outs = OPS.qkv_norm_rope(qkv_k, Hq, G, *ws_k, EPS, cos, sin)
    assert launched == ["launch_qk_norm_rope_fwd"] * 3, (what, launched)  # q, k, and v's copy
    sum((o * gr).sum() for o, gr in zip(outs, grads)).backward()
    assert launched == ["launch_qk_norm_rope_fwd"] * 3 + ["launch_qk_norm_rope_bwd"] * 3, (what, launched)
    assert [o.shape for o in outs] == [(B, S, Hq, D), (B, S, G, D), (B, S, G, D)], what
    check(outs[0].detach(), refs[0].detach(), ydt, ("q",) + what)
    check(outs[1].detach(), refs[1].detach(), ydt, ("k",) + what)
    assert torch.equal(outs[2], qkv[:, :, Hq + G:]) and outs[2].is_contiguous(), what
    check(qkv_k.grad, qkv_r.grad, xdt, ("dqkv",) + what)
    for wk, wr in zip(ws_k, ws_r):
        if wk is not None:
            check(wk.grad, wr.grad, wdt, ("dw",) + what)

# Empty input: no launch of a grid of zero, zeros for dw
x = torch.empty(0, 4, 2, 16)
w = torch.ones(16)
cos, sin = torch.ones(1, 4, 16), torch.zeros(1, 4, 16)
y = qk.launch_qk_norm_rope_fwd(x, w, cos, sin, EPS)
dx, dw = qk.launch_qk_norm_rope_bwd(torch.empty(0, 4, 2, 16), x, w, cos, sin, EPS)
assert y.shape == dx.shape == (0, 4, 2, 16) and torch.equal(dw, torch.zeros(16))

# What the kernels do not take goes to the torch formula (no launch), with the same numbers
x, w, cos, sin, _ = inputs(2, 3, 2, 16, torch.float32, torch.float32)
odd = torch.randn(2, 3, 2, 7, generator=g)
c7, s7 = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
wide = torch.randn(1, 2, 2, 512, generator=g)
c512, s512 = torch.randn(1, 2, 512, generator=g), torch.randn(1, 2, 512, generator=g)
for args in [(x.double(), w.double(), EPS, cos.double(), sin.double()),  # float64
             (odd, torch.ones(7), EPS, c7, s7),  # odd D
             (wide, torch.ones(512), EPS, c512, s512),  # D > 256
             (x, w, EPS, cos.clone().requires_grad_(), sin),  # the table wants a gradient
             (x, w.double(), EPS, cos, sin),  # float64 gain
             (x.transpose(2, 3).contiguous().transpose(2, 3), w, EPS, cos, sin)]:  # last stride != 1
    launched.clear()
    out = OPS.qk_norm_rope(*args)
    assert launched == [], launched
    assert torch.equal(out, TORCH_QK_NORM_ROPE_OPS.qk_norm_rope(*args))

# The compile path (custom ops, their fake implementations, the autograd.Function traced whole),
# with the interpreted launchers registered as the ops' CPU kernels; aot_eager: no C++ compiler.
op_calls = []
def fwd_cpu(*args):
    op_calls.append("fwd")
    return qk.launch_qk_norm_rope_fwd(*args)
def bwd_cpu(*args):
    op_calls.append("bwd")
    return qk.launch_qk_norm_rope_bwd(*args)
torch.library.register_kernel("anymoe::qk_norm_rope_fwd", "cpu", fwd_cpu)
torch.library.register_kernel("anymoe::qk_norm_rope_bwd", "cpu", bwd_cpu)
B, S, H, D = 2, 5, 3, 16
for wdt in (torch.float32, None):
    torch.compiler.reset()
    x, w, cos, sin, x64 = inputs(B, S, H, D, torch.float32, wdt)
    dy_BHSD = torch.randn(B, H, S, D, generator=g)
    def step(x, w):
        return OPS.qk_norm_rope(x, w, EPS, cos, sin).transpose(1, 2)  # [B, H, S, D] view for attention
    xk = x.detach().requires_grad_()
    wk = None if w is None else w.detach().requires_grad_()
    op_calls.clear()
    launched.clear()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(xk, wk)
    out.backward(dy_BHSD)
    assert op_calls == ["fwd", "bwd"], op_calls
    xr = x64.clone().requires_grad_()
    wr = None if w is None else w.double().requires_grad_()
    ref = TORCH_QK_NORM_ROPE_OPS.qk_norm_rope(xr, wr, EPS, cos.double(), sin.double()).transpose(1, 2)
    ref.backward(dy_BHSD.double())
    check(out.detach(), ref.detach(), torch.float32, "compiled y")
    check(xk.grad, xr.grad, torch.float32, "compiled dx")
    if w is not None:
        check(wk.grad, wr.grad, torch.float32, "compiled dw")
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels")
def test_qk_norm_rope_kernels_in_triton_cpu_interpreter():
    """Forward and backward (x and gain gradients) against float64 autograd of the formula;
    fallbacks; the custom ops under torch.compile(fullgraph=True)."""
    _interpret(CODE)
