"""Causal attention as an op family (anymoe/core/attention.py) and the CUDA backend's choice of
FlexAttention inside compiled blocks under deterministic algorithms (anymoe/backends/cuda_attention.py).

On the CPU: the family's formula is SDPA bit for bit; the CUDA ops' rule (flex only when compiling,
deterministic, no dropout, S == L) and the flex path's forward against float64 SDPA (causal mask,
grouped-query heads, scale), traced by torch.compile (flex has no CPU backward). On a GPU: the
compiled flex path's output and gradients against float64, bitwise repeatable, and SDPA again
with deterministic algorithms off."""

import pytest
import torch
import torch.nn.functional as F

from anymoe.backends.cuda_attention import CUDA_ATTENTION_OPS, use_flex
from anymoe.core.attention import TORCH_ATTENTION_OPS, attention_ops_for, causal_attention
from anymoe.core.backend import probe_backends, use_deterministic_algorithms


def _qkv(B=2, H=4, G=2, S=24, D=8, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, S, D, dtype=dtype, device=device, generator=gen)
    k = torch.randn(B, G, S, D, dtype=dtype, device=device, generator=gen)
    v = torch.randn(B, G, S, D, dtype=dtype, device=device, generator=gen)
    return q, k, v


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    use_deterministic_algorithms(True)
    yield
    use_deterministic_algorithms(before)


def _graph_targets(fn, *args):
    """Run ``fn`` under torch.compile with a backend that records the traced graph's call targets."""
    targets: list[str] = []

    def record(gm, _inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=record, fullgraph=True)(*args)
    return out, targets


def test_the_formula_is_sdpa_bit_for_bit():
    q, k, v = _qkv()
    assert attention_ops_for(q) is TORCH_ATTENTION_OPS
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    assert torch.equal(causal_attention(q, k, v, 0.3, gqa=True), ref)
    q1, k1, v1 = _qkv(G=4)
    assert torch.equal(causal_attention(q1, k1, v1, 0.5),
                       F.scaled_dot_product_attention(q1, k1, v1, is_causal=True, scale=0.5))


def test_flex_only_when_compiling_deterministic_without_dropout(deterministic):
    q, k, v = _qkv()
    assert not use_flex(q, k, 0.0)  # eager
    seen = []

    def probe(q, k, dropout):
        seen.append(use_flex(q, k, dropout))
        return q

    torch._dynamo.reset()
    torch.compile(lambda q, k: probe(q, k, 0.0), backend="eager")(q, k)
    torch._dynamo.reset()
    torch.compile(lambda q, k: probe(q, k, 0.1), backend="eager")(q, k)
    torch._dynamo.reset()
    torch.compile(lambda q, k: probe(q, k[:, :, :-1], 0.0), backend="eager")(q, k)  # L != S
    use_deterministic_algorithms(False)
    torch._dynamo.reset()
    torch.compile(lambda q, k: probe(q, k, 0.0), backend="eager")(q, k)
    assert seen == [True, False, False, False]


@pytest.mark.parametrize("G", [2, 4])
def test_compiled_flex_forward_matches_float64_sdpa(deterministic, G):
    q, k, v = _qkv(G=G, seed=G)
    fn = lambda q, k, v: CUDA_ATTENTION_OPS.causal(q, k, v, 0.3, 0.0, G < 4)  # noqa: E731
    out, targets = _graph_targets(fn, q, k, v)
    assert any("flex_attention" in t for t in targets), targets
    assert not any("scaled_dot_product" in t for t in targets)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=G < 4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_without_determinism_the_cuda_ops_keep_sdpa():
    q, k, v = _qkv()
    assert not torch.are_deterministic_algorithms_enabled()
    out, targets = _graph_targets(lambda q, k, v: CUDA_ATTENTION_OPS.causal(q, k, v, 0.3, 0.0, True), q, k, v)
    assert any("scaled_dot_product" in t for t in targets) and not any("flex" in t for t in targets)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_compiled_flex_against_float64_and_repeatable(deterministic, dtype):
    status = probe_backends()["cuda"]
    if not status.ok:
        pytest.skip(f"backend 'cuda' not usable here: {status.reason}")
    q0, k0, v0 = _qkv(B=2, H=8, G=2, S=256, D=64, dtype=torch.float32, device="cuda", seed=1)
    g = torch.randn_like(q0)
    fn = torch.compile(lambda q, k, v: causal_attention(q, k, v, 0.125, gqa=True))

    def run():
        q, k, v = (t.to(dtype).clone().requires_grad_() for t in (q0, k0, v0))
        out = fn(q, k, v)
        out.backward(g.to(dtype))
        return [out.detach(), q.grad, k.grad, v.grad]

    got, again = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # bitwise repeatable
    q, k, v = (t.double().clone().requires_grad_() for t in (q0, k0, v0))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    ref.backward(g.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for a, b in zip(got, [ref.detach(), q.grad, k.grad, v.grad]):
        assert ((a.double() - b).norm() / b.norm()).item() < tol
