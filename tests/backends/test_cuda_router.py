"""Router logits on CUDA (anymoe/backends/cuda_router.py): a bf16 GEMM that writes float32.

CPU part (CI): which inputs take the half-precision path, and the autograd function's
forward/backward wiring, with cuBLAS's float32-output GEMM replaced by the same product on
float32 copies (the CPU has no ``aten::mm.dtype`` kernel); against float64 references.
GPU part (``-m gpu``): the real cuBLAS GEMM, eager and under torch.compile, against float64.
"""

import pytest
import torch

from anymoe.backends import cuda_router as cr
from anymoe.core.router_gemm import TORCH_ROUTER_GEMM_OPS, router_gemm_ops_for

HAVE_CUDA = torch.cuda.is_available()


def _inputs(T, D, E, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(E, D, generator=g) * 0.05).to(device, dtype).requires_grad_()
    gy = torch.randn(T, E, generator=g, dtype=torch.float64)
    return x, w, gy


def _reference(x, w, gy):
    x64, w64 = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    y = x64 @ w64.t()
    y.backward(gy)
    return y, x64.grad, w64.grad


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_registered_for_cuda_only():
    assert router_gemm_ops_for(torch.empty(1)) is TORCH_ROUTER_GEMM_OPS
    assert cr.CUDA_ROUTER_GEMM_OPS.name != TORCH_ROUTER_GEMM_OPS.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_tensors_take_the_formula(dtype):
    x, w, _ = _inputs(5, 16, 4, dtype)
    out = cr.CUDA_ROUTER_GEMM_OPS.logits(x, w)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(out, TORCH_ROUTER_GEMM_OPS.logits(x, w))


def test_autograd_function_against_float64(monkeypatch):
    """Forward is exact up to float32 summation; the backward rounds the logits' gradient to bf16."""
    monkeypatch.setattr(cr, "mm_fp32_out", lambda a, b: a.float() @ b.float())
    x, w, gy = _inputs(64, 96, 8, torch.bfloat16)
    y = cr._HalfInFloatOut.apply(x, w)
    assert y.dtype == torch.float32 and y.shape == (64, 8)
    y.backward(gy.float())
    ref_y, ref_dx, ref_dw = _reference(x, w, gy)
    assert _rel(y, ref_y) < 1e-6
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert _rel(x.grad, ref_dx) < 1e-2 and _rel(w.grad, ref_dw) < 1e-2


def test_autograd_function_skips_unneeded_grads(monkeypatch):
    monkeypatch.setattr(cr, "mm_fp32_out", lambda a, b: a.float() @ b.float())
    x, w, gy = _inputs(8, 16, 4, torch.bfloat16)
    x = x.detach()
    cr._HalfInFloatOut.apply(x, w).backward(gy.float())
    assert x.grad is None and w.grad is not None


gpu = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_gemm_against_float64(dtype, compiled):
    assert router_gemm_ops_for(torch.empty(1, device="cuda")) is cr.CUDA_ROUTER_GEMM_OPS
    x, w, gy = _inputs(4099, 1024, 64, dtype, device="cuda", seed=3)
    fn = cr.CUDA_ROUTER_GEMM_OPS.logits
    if compiled:
        fn = torch.compile(fn, fullgraph=True)
    y = fn(x.view(1, 4099, 1024), w)
    assert y.dtype == torch.float32 and y.shape == (1, 4099, 64)
    y.backward(gy.float().cuda().view(1, 4099, 64))
    ref_y, ref_dx, ref_dw = _reference(x, w, gy)
    # Half products are exact in float32; the float32 sum over D = 1024 terms is not: its
    # rounding error grows like sqrt(D) * 2^-24 ~ 2e-6 (fp16 inputs measured 1.25e-6 on the H100).
    assert _rel(y.view(4099, 64), ref_y) < 1e-5
    assert _rel(x.grad, ref_dx) < 1e-2 and _rel(w.grad, ref_dw) < 1e-2
    with torch.no_grad():  # the same logits as the formula's float32 GEMM (TF32 off)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            formula = TORCH_ROUTER_GEMM_OPS.logits(x, w)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    assert _rel(y.view(4099, 64), formula) < 1e-5
