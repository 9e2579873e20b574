"""The qk-norm + RoPE op family's torch default (anymoe/core/qk_norm_rope.py): the same numbers,
bit for bit, as the attention's current expression in anymoe/models/layers.py, and gradients
that match float64 autograd of the formula. The kernels are checked against the same float64
formula in tests/backends/test_cuda_qk_rope_interpreter.py and (-m gpu) test_cuda_qk_rope.py."""

import pytest
import torch

from anymoe.core.norm import rms_norm
from anymoe.core.qk_norm_rope import (
    TORCH_QK_NORM_ROPE_OPS,
    qk_norm_rope,
    qk_norm_rope_ops_for,
    rope_rotate_half,
)
from anymoe.models.layers import apply_rope

EPS = 1e-6


def _inputs(B, S, H, D, dtype, weight=True, seed=0):
    """x as the model has it: the k slice of a fused [B, S, (Hq + 2H) * D] projection, viewed as
    [B, S, H, D] (strides (S * W, W, D, 1)); cos/sin [B, S, D] expanded over B (stride 0)."""
    g = torch.Generator().manual_seed(seed)
    Hq = H + 1
    W = (Hq + 2 * H) * D
    qkv = torch.randn(B, S, W, generator=g, dtype=torch.float64).to(dtype)
    x = qkv[..., Hq * D:(Hq + H) * D].view(B, S, H, D)
    w = (1 + 0.2 * torch.randn(D, generator=g, dtype=torch.float64)).to(dtype) if weight else None
    angles = torch.arange(S, dtype=torch.float64)[:, None] * 0.37 ** torch.arange(D // 2, dtype=torch.float64)
    angles = torch.cat((angles, angles), -1)[None]
    return x, w, angles.cos().to(dtype).expand(B, S, D), angles.sin().to(dtype).expand(B, S, D)


def _layers_expression(x, w, cos, sin):
    """What Attention.forward computes today: qk-norm when configured, then RoPE on [B, S, H, D]."""
    n = x if w is None else rms_norm(x, w, EPS)
    return apply_rope(n, cos, sin, head_axis=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("B, S, H, D", [(1, 3, 5, 8), (2, 33, 4, 64), (2, 7, 2, 128)])
def test_torch_default_is_the_layers_expression_bitwise(B, S, H, D, dtype, weight):
    x, w, cos, sin = _inputs(B, S, H, D, dtype, weight)
    assert not x.is_contiguous() and (cos.stride(0) == 0 or B == 1)
    ref = _layers_expression(x, w, cos, sin)
    for out in (TORCH_QK_NORM_ROPE_OPS.qk_norm_rope(x, w, EPS, cos, sin), qk_norm_rope(x, w, EPS, cos, sin)):
        assert out.dtype == ref.dtype == dtype and out.shape == (B, S, H, D)
        assert torch.equal(out, ref)


def test_mixed_dtypes_follow_the_formula():
    """bf16 activations with an fp32 gain: fp32 out, as rms_norm's promotion gives."""
    x, w, cos, sin = _inputs(2, 5, 3, 16, torch.bfloat16)
    out = qk_norm_rope(x, w.float(), EPS, cos, sin)
    assert out.dtype == torch.float32
    assert torch.equal(out, _layers_expression(x, w.float(), cos, sin))


def test_rope_rotate_half_head_axis_1_is_apply_rope():
    x, _, cos, sin = _inputs(2, 6, 3, 32, torch.float32, weight=False)
    x_BHSD = x.transpose(1, 2)
    assert torch.equal(rope_rotate_half(x_BHSD, cos, sin, head_axis=1), apply_rope(x_BHSD, cos, sin))


def test_rope_worked_example():
    # D = 4, pairs (0, 2) and (1, 3) rotate by angles a0, a1: (x0, x2) -> (x0 c0 - x2 s0, x2 c0 + x0 s0).
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    a = torch.tensor([0.5, 1.5, 0.5, 1.5])
    c, s = a.cos().view(1, 1, 4), a.sin().view(1, 1, 4)
    want = torch.tensor([1 * c[0, 0, 0] - 3 * s[0, 0, 0], 2 * c[0, 0, 1] - 4 * s[0, 0, 1],
                         3 * c[0, 0, 0] + 1 * s[0, 0, 0], 4 * c[0, 0, 1] + 2 * s[0, 0, 1]])
    torch.testing.assert_close(qk_norm_rope(x, None, EPS, c, s).view(4), want)


def test_cpu_tensors_get_the_torch_ops():
    assert qk_norm_rope_ops_for(torch.empty(1)) is TORCH_QK_NORM_ROPE_OPS
    assert qk_norm_rope_ops_for(torch.empty(1), fast=False) is TORCH_QK_NORM_ROPE_OPS


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("weight", [True, False])
def test_gradients_match_float64_autograd(dtype, tol, weight):
    B, S, H, D = 2, 9, 3, 64
    x64, w64, cos64, sin64 = _inputs(B, S, H, D, torch.float64, weight, seed=1)
    dy64 = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dy64 = dy64.transpose(1, 2)  # the layout attention's backward returns

    def grads(x, w, cos, sin, dy):
        x = x.detach().requires_grad_()
        w = None if w is None else w.detach().requires_grad_()
        qk_norm_rope(x, w, EPS, cos, sin).backward(dy)
        return x.grad, None if w is None else w.grad

    ref = grads(x64, w64, cos64, sin64, dy64)
    x, w, cos, sin = _inputs(B, S, H, D, dtype, weight, seed=1)
    got = grads(x, w, cos, sin, dy64.to(dtype))
    for a, b in zip(got, ref):
        if b is None:
            assert a is None
            continue
        assert a.dtype == dtype
        assert float((a.double() - b).abs().max()) <= tol * float(b.abs().max())


def test_float64_gradcheck():
    x, w, cos, sin = _inputs(1, 3, 2, 8, torch.float64, seed=3)
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: qk_norm_rope(a, b, EPS, cos, sin), (x, w))
