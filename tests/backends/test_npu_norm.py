"""The NPU RMSNorm path (anymoe/backends/npu_norm.py) on the CPU: its autograd wiring and dispatch
rules with implementations of torch_npu's documented contract (npu_rms_norm -> (y, rstd),
npu_rms_norm_backward(dy, x, gamma, rstd) -> (dx, dgamma in fp32)), against the float64 torch
formula. On an NPU the same class calls torch_npu's operators."""

import pytest
import torch

from anymoe.backends.npu_norm import NPU_NORM_OPS, NPUNormOps
from anymoe.core.norm import TORCH_NORM_OPS, norm_ops_for

calls: list[str] = []


def contract_rms_norm(x, gamma, epsilon=1e-6):
    """RmsNorm as documented: y = x / rms(x) * gamma (fp32 inside, one rounding), rstd [..., 1]."""
    calls.append("fwd")
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
    return (x.float() * rstd * gamma.float()).to(x.dtype), rstd


def contract_rms_norm_backward(dy, x, gamma, rstd):
    """RmsNormGrad as documented: dx = (dy g - xhat mean(dy g xhat)) rstd, dgamma = sum of dy xhat."""
    calls.append("bwd")
    xhat = x.float() * rstd
    dyg = dy.float() * gamma.float()
    dx = (dyg - xhat * (dyg * xhat).mean(-1, keepdim=True)) * rstd
    return dx.to(x.dtype), (dy.float() * xhat).reshape(-1, x.shape[-1]).sum(0)


class CPUContractOps(NPUNormOps):
    name = "npu-contract"
    kernel_device_type = "cpu"


OPS = CPUContractOps(lambda: (contract_rms_norm, contract_rms_norm_backward))


def test_registered_for_npu_tensors_only():
    from anymoe.core.norm import _REGISTRY

    assert _REGISTRY.is_registered(NPU_NORM_OPS) and _REGISTRY.named("npu") is NPU_NORM_OPS
    assert NPU_NORM_OPS.kernel_device_type == "npu"
    assert norm_ops_for(torch.empty(1)) is not NPU_NORM_OPS  # CPU tensors: not these


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 48), (1, 2, 3, 16)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("fused_add", [False, True])
def test_operators_wired_like_the_formula(shape, dtype, tol, fused_add):
    g = torch.Generator().manual_seed(len(shape))
    x, d, gy = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    w = 1 + 0.1 * torch.randn(shape[-1], generator=g, dtype=torch.float64)
    xr, dr, wr = x.clone().requires_grad_(), d.clone().requires_grad_(), w.clone().requires_grad_()
    _, ref = TORCH_NORM_OPS.add_rms_norm(xr, dr if fused_add else None, wr, 1e-6)
    (ref * gy).sum().backward()
    xk, dk, wk = (t.to(dtype).requires_grad_() for t in (x, d, w))
    calls.clear()
    _, y = OPS.add_rms_norm(xk, dk if fused_add else None, wk, 1e-6)
    assert calls == ["fwd"] and y.dtype == dtype
    (y * gy.to(dtype)).sum().backward()
    assert calls == ["fwd", "bwd"] and wk.grad.dtype == dtype and wk.grad.shape == w.shape
    grads = [(xk.grad, xr.grad), (wk.grad, wr.grad)] + ([(dk.grad, dr.grad)] if fused_add else [])
    for a, b in [(y, ref)] + grads:
        err = float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())
        assert err <= tol, (shape, dtype, err)


def test_what_the_operators_do_not_take_runs_the_formula():
    x, w = torch.randn(4, 8), torch.ones(8)
    for args in [(x.double(), w.double()),  # float64
                 (x, w.bfloat16()),  # gamma in another dtype
                 (x[0], w),  # one dimension
                 (torch.randn(1, 1, 1, 1, 1, 1, 1, 2, 8), w)]:  # nine dimensions
        calls.clear()
        out = OPS.rms_norm(*args, 1e-6)
        assert calls == []
        assert torch.equal(out, TORCH_NORM_OPS.rms_norm(*args, 1e-6))
