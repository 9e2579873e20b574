"""Triton kernels of the fused cross-entropy (anymoe/backends/cuda_loss_kernels.py).

On a CUDA device (``gpu`` marker), against F.cross_entropy in float64, against the pure-torch
ops, under torch.compile (inductor, fullgraph) and inside a CUDA graph:

    python -m pytest -m gpu tests/backends/test_cuda_loss_kernels.py

Without a GPU, one test runs the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, in a
subprocess) when Triton is importable; CPU builds of torch ship without Triton, so it skips.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cuda_graph_capture import capture

from anymoe.core import losses

IGNORE = -100
HAVE_CUDA = torch.cuda.is_available()
ck = pytest.importorskip("anymoe.backends.cuda_loss_kernels")
DEV = torch.device("cuda")


def on_gpu(test):
    """The ``gpu`` marker, and a skip that says why where there is no GPU or no Triton."""
    no_gpu = "needs a CUDA device (torch.cuda.is_available() is False)"
    test = pytest.mark.skipif(not HAVE_CUDA, reason=no_gpu)(test)
    test = pytest.mark.skipif(not ck.HAVE_TRITON, reason="needs Triton (not importable here)")(test)
    return pytest.mark.gpu(test)


def _problem(N, V, dtype, ignored=0.3, seed=0, device=DEV):
    gen = torch.Generator().manual_seed(seed * 7919 + N * 31 + V)
    logits = (torch.randn(N, V, generator=gen, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < ignored] = IGNORE
    return logits.to(device), labels.to(device), float(torch.randn((), generator=gen))


def _reference(logits, labels, g):
    x = logits.detach().double().cpu().requires_grad_()
    loss = F.cross_entropy(x, labels.cpu(), ignore_index=IGNORE, reduction="sum")
    (loss * g).backward()
    return float(loss), x.grad


def _run(logits, labels, g, ops=None):
    x = logits.detach().clone().requires_grad_()
    loss = losses.cross_entropy_sum(x, labels, ops=ops)
    (loss * g).backward()
    return loss.detach(), x.grad


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values (an unwritten element?)"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@on_gpu
def test_ops_registered_for_cuda():
    assert losses.loss_ops_for(torch.empty(1, device=DEV)) is ck.TRITON_LOSS_OPS


@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,V,ignored", [
    (1, 2, 0.0), (300, 1000, 0.3), (257, 32000, 0.3), (64, 50257, 0.1), (1024, 4097, 0.5), (33, 777, 1.0),
])
def test_kernels_match_float64_and_torch_ops(N, V, ignored, dtype, poison_empty):
    logits, labels, g = _problem(N, V, dtype, ignored)
    loss, grad = _run(logits, labels, g)
    ref_loss, ref_grad = _reference(logits, labels, g)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    if ignored == 1.0:
        assert float(loss) == 0.0 and not grad.any()
        return
    # loss = sum(lse - x[label]): fp32 rounding of terms of size |lse| + |x|, which can be far
    # larger than the loss itself (a tiny loss is a difference of two O(1) numbers).
    scale = float(logits.double().abs().amax(dim=1).sum()) + 1.0
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss) + 2e-7 * scale
    grad_tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(grad, ref_grad) < grad_tol
    assert not grad[labels == IGNORE].any()
    # Against the pure-torch ops on the same device: both round g*(p - y) once.
    loss_t, grad_t = _run(logits, labels, g, ops=losses.TORCH_OPS)
    assert abs(float(loss) - float(loss_t)) <= 1e-5 * abs(float(loss_t))
    assert _rel(grad, grad_t) < grad_tol


@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_rows_int32_labels_and_fp64_fallback(dtype, poison_empty):
    """Rows of a padded vocabulary (row stride > V), a column-strided view (copied), int32
    labels; fp64 logits take the pure-torch path."""
    logits, labels, g = _problem(129, 5000, dtype)
    ref_loss, ref_grad = _reference(logits, labels, g)
    padded = torch.zeros(129, 5120, dtype=dtype, device=DEV)
    padded[:, :5000] = logits
    for view in (padded[:, :5000], logits.t().contiguous().t()):
        loss, grad = _run(view, labels.to(torch.int32), g)
        assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
        assert _rel(grad, ref_grad) < (1e-5 if dtype == torch.float32 else 1e-2)
    loss, grad = _run(logits.double(), labels, g)
    assert loss.dtype == torch.float64 and abs(float(loss) - ref_loss) <= 1e-9 * abs(ref_loss)


@on_gpu
def test_out_of_range_label_gives_nan_not_a_crash():
    logits, labels, _ = _problem(8, 100, torch.bfloat16, ignored=0.0)
    labels[3] = 100
    loss_N, _ = ck.launch_ce_fwd(logits, labels, IGNORE)
    assert loss_N[3].isnan() and torch.isfinite(loss_N[torch.arange(8, device=DEV) != 3]).all()


def _step(h, w, labels):
    """A tiny LM head + loss, the way a trainer uses it."""
    logits = (h @ w).view(-1, w.shape[1])
    loss = losses.cross_entropy_sum(logits, labels) / 1000.0
    return loss, *torch.autograd.grad(loss, (h, w))


@on_gpu
def test_torch_compile_inductor_fullgraph_matches_eager():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(512, 256, generator=gen).to(DEV, torch.bfloat16).requires_grad_()
    w = (torch.randn(256, 32000, generator=gen) / 16).to(DEV, torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 32000, (512,), generator=gen).to(DEV)
    labels[::7] = IGNORE

    def loss_fn(h, w, labels):
        return losses.cross_entropy_sum((h @ w).view(-1, w.shape[1]), labels) / 1000.0

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)  # inductor; raises on a graph break
    loss_c = compiled(h, w, labels)
    grads_c = torch.autograd.grad(loss_c, (h, w))
    eager = _step(h, w, labels)
    assert abs(float(loss_c) - float(eager[0])) <= 1e-4 * abs(float(eager[0]))
    for a, b in zip(grads_c, eager[1:]):
        assert _rel(a, b) < 1e-2


@on_gpu
def test_cuda_graph_capture_and_replay_on_new_labels():
    N, V = 1024, 32000
    logits, labels, _ = _problem(N, V, torch.bfloat16)
    x = logits.clone().requires_grad_()
    static_labels = labels.clone()

    def step():
        loss = losses.cross_entropy_sum(x, static_labels)
        return loss, torch.autograd.grad(loss, x)[0]

    graph, (static_loss, static_grad) = capture(step)  # fails on any host synchronisation inside
    _, new_labels, _ = _problem(N, V, torch.bfloat16, ignored=0.6, seed=9)
    static_labels.copy_(new_labels)
    graph.replay()
    torch.cuda.synchronize()
    ref_loss, ref_grad = _reference(logits, new_labels, 1.0)
    assert abs(float(static_loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    assert _rel(static_grad, ref_grad) < 1e-2


@on_gpu
def test_peak_memory_is_one_gradient_over_the_logits():
    """fwd+bwd allocates the bf16 gradient and per-row floats, nothing else of size [N, V]."""
    N, V = 4096, 32000
    logits, labels, _ = _problem(N, V, torch.bfloat16)
    x = logits.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    losses.cross_entropy_sum(x, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= N * V * 2 + (16 << 20), f"{extra / 2**20:.0f} MiB over the logits"


@pytest.mark.skipif(HAVE_CUDA, reason="the GPU tests above run the compiled kernels")
def test_kernels_in_triton_cpu_interpreter():
    pytest.importorskip("triton")
    code = """
import torch, torch.nn.functional as F
from anymoe.backends import cuda_loss_kernels as ck
cases = [(5, 100, torch.float32, 0.3), (6, 4097, torch.bfloat16, 0.3), (4, 33, torch.float16, 1.0)]
for N, V, dt, ig in cases:
    x = (torch.randn(N, V + 7, dtype=torch.float64) * 3).to(dt)[:, :V]
    y = torch.randint(0, V, (N,)); y[torch.rand(N) < ig] = -100
    loss, lse = ck.launch_ce_fwd(x, y, -100)
    g = torch.randn(N, dtype=torch.float64)
    xr = x.double().requires_grad_()
    ref = F.cross_entropy(xr, y, ignore_index=-100, reduction="none"); (ref * g).sum().backward()
    dx = ck.launch_ce_bwd(x, y, lse, g.float(), -100)
    assert (loss.double() - ref.detach()).abs().max() < 1e-5, (N, V, dt)
    assert (dx.double() - xr.grad).abs().max() <= 1e-2 * xr.grad.abs().max() + 1e-12, (N, V, dt)
print("ok")
"""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert done.stdout.strip().endswith("ok"), done.stderr[-3000:]
