"""The fused cross-entropy's pure-torch ops (anymoe/core/losses.py) against F.cross_entropy in float64.

The Triton kernels have their own tests in tests/backends/test_cuda_loss_kernels.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from anymoe.core import losses

IGNORE = -100


def _problem(N, V, dtype, ignored="some", seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed * 7919 + N * 31 + V)
    logits64 = torch.randn(N, V, generator=gen, dtype=torch.float64) * scale
    labels = torch.randint(0, V, (N,), generator=gen)
    if ignored == "some":
        labels[torch.rand(N, generator=gen) < 0.3] = IGNORE
    elif ignored == "all":
        labels[:] = IGNORE
    # Compare on the rounded logits: the reference sees exactly what the op sees.
    return logits64.to(dtype), labels, float(torch.randn((), generator=gen))


def _reference(logits, labels, g):
    """Float64 F.cross_entropy and its gradient for an upstream scalar g."""
    x = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(x, labels, ignore_index=IGNORE, reduction="sum")
    (loss * g).backward()
    return loss.detach(), x.grad


def _run(logits, labels, g, op=losses.cross_entropy_sum):
    x = logits.detach().clone().requires_grad_()
    loss = op(x, labels)
    (loss * g).backward()
    return loss.detach(), x.grad


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-2)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V,ignored", [
    (1, 2, "none"), (37, 1001, "some"), (16, 32000, "some"), (64, 97, "none"), (12, 50, "all"),
])
def test_matches_float64_reference(N, V, ignored, dtype):
    logits, labels, g = _problem(N, V, dtype, ignored)
    loss, grad = _run(logits, labels, g)
    ref_loss, ref_grad = _reference(logits, labels, g)
    loss_tol, grad_tol = TOL[dtype]
    assert loss.shape == () and grad.dtype == dtype and grad.shape == logits.shape
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if ignored == "all":  # zero loss and zero gradient, not nan
        assert float(loss) == 0.0 and not grad.any()
        return
    assert abs(float(loss) - float(ref_loss)) <= loss_tol * abs(float(ref_loss))
    assert _rel(grad, ref_grad) < grad_tol
    ignored_rows = labels == IGNORE
    assert not grad[ignored_rows].any()


@pytest.mark.parametrize("rows_per_chunk", [1, 5, 8, 40, 1000])
def test_chunk_boundaries(monkeypatch, rows_per_chunk):
    """N=40 rows split 40x1, 8x5, 5x8, 1x40, 1x(all): every split gives the reference."""
    N, V = 40, 300
    monkeypatch.setattr(losses.TORCH_OPS, "chunk_bytes", rows_per_chunk * V * 4)
    assert len(losses.TORCH_OPS.row_chunks(N, V)) == -(-N // rows_per_chunk)
    logits, labels, g = _problem(N, V, torch.float32, seed=rows_per_chunk)
    loss, grad = _run(logits, labels, g)
    ref_loss, ref_grad = _reference(logits, labels, g)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert _rel(grad, ref_grad) < 1e-5


def test_ragged_last_chunk_and_tiny_chunks(monkeypatch):
    """chunk_bytes below one row still makes progress (one row per chunk); 7 rows per chunk
    over 23 rows leaves a ragged 2-row chunk at the end."""
    for chunk_bytes, sizes in [(1, [1] * 23), (7 * 10 * 4, [7, 7, 7, 2])]:
        monkeypatch.setattr(losses.TORCH_OPS, "chunk_bytes", chunk_bytes)
        assert [s.stop - s.start for s in losses.TORCH_OPS.row_chunks(23, 10)] == sizes
        logits, labels, g = _problem(23, 10, torch.bfloat16)
        loss, grad = _run(logits, labels, g)
        ref_loss, ref_grad = _reference(logits, labels, g)
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        assert _rel(grad, ref_grad) < 1e-2


def test_matches_the_trainers_bf16_expression():
    """Same value and gradient as ``F.cross_entropy(logits.float(), ...)`` on bf16 logits: the
    gradient differs by at most one bf16 rounding (the reference rounds g*(p - y) once too)."""
    logits, labels, g = _problem(48, 2000, torch.bfloat16)
    loss, grad = _run(logits, labels, g)

    def trainer(x, y):
        return F.cross_entropy(x.float(), y, ignore_index=IGNORE, reduction="sum")

    ref_loss, ref_grad = _run(logits, labels, g, op=trainer)
    assert ref_grad.dtype == torch.bfloat16
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert _rel(grad, ref_grad) < 8e-3


def test_strided_logits_and_int32_labels():
    """A row-strided slice (logits of a padded vocabulary) and a transposed view, int32 labels."""
    logits, labels, g = _problem(30, 257, torch.float32)
    padded = torch.zeros(30, 300)
    padded[:, :257] = logits
    views = [padded[:, :257], logits.t().contiguous().t()]
    ref_loss, ref_grad = _reference(logits, labels, g)
    for view in views:
        x = view.detach().requires_grad_()
        loss = losses.cross_entropy_sum(x, labels.to(torch.int32))
        (loss * g).backward()
        assert abs(float(loss.detach()) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        assert _rel(x.grad, ref_grad) < 1e-5


def test_no_fp32_copy_of_the_logits(monkeypatch):
    """Forward and backward never allocate an fp32 tensor of the logits' size: the biggest fp32
    temporary is one chunk. (The reference allocates several: copy, log-softmax, gradient.)"""
    N, V, rows_per_chunk = 64, 500, 8
    logits, labels, g = _problem(N, V, torch.bfloat16)
    monkeypatch.setattr(losses.loss_ops_for(logits), "chunk_bytes", rows_per_chunk * V * 4)

    class LargestFP32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    LargestFP32.largest = max(LargestFP32.largest, t.numel())
            return out

    with LargestFP32():
        _run(logits, labels, g)
    assert 0 < LargestFP32.largest <= rows_per_chunk * V
    LargestFP32.largest = 0
    with LargestFP32():
        _run(logits, labels, g, op=lambda x, y: F.cross_entropy(x.float(), y, reduction="sum"))
    assert LargestFP32.largest == N * V  # the check above can see a full copy


def test_backward_twice_with_retain_graph():
    """The backward is functional (no in-place update of a saved tensor): retain_graph works."""
    logits, labels, _ = _problem(9, 40, torch.bfloat16)
    x = logits.requires_grad_()
    loss = losses.cross_entropy_sum(x, labels)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 2, x)
    assert torch.equal(first * 2, second)


def test_empty_batch_and_no_grad():
    x = torch.zeros(0, 11, requires_grad=True)
    loss = losses.cross_entropy_sum(x, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and x.grad.shape == (0, 11)
    logits, labels, _ = _problem(5, 13, torch.float32)
    with torch.no_grad():
        loss = losses.cross_entropy_sum(logits, labels)
    assert abs(float(loss) - float(_reference(logits, labels, 1.0)[0])) < 1e-4


def test_out_of_range_label_is_a_clear_error():
    logits, labels, _ = _problem(6, 10, torch.float32, ignored="none")
    for bad in (10, -1):
        labels[2] = bad
        with pytest.raises(ValueError, match=r"every label must be in \[0, 10\) or equal ignore_index=-100"):
            losses.cross_entropy_sum(logits, labels)


def test_shape_errors_say_how_to_flatten():
    with pytest.raises(ValueError, match=r"logits must be \[N, V\] and labels \[N\].*view\(-1, V\)"):
        losses.cross_entropy_sum(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        losses.cross_entropy_sum(torch.zeros(4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be class indices \(int64, int32\), got torch.float32"):
        losses.cross_entropy_sum(torch.zeros(4, 5), torch.zeros(4))


def _scaled_loss(x, labels):
    return losses.cross_entropy_sum(x, labels, ignore_index=IGNORE) / 7.0


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_traces_whole_under_torch_compile(backend, monkeypatch):
    """One graph, no breaks (fullgraph=True raises on a break), same numbers as eager, forward
    and (aot_eager: traced) backward; two chunks so the chunk loop is traced too."""
    monkeypatch.setattr(losses.TORCH_OPS, "chunk_bytes", 16 * 300 * 4)
    logits, labels, g = _problem(24, 300, torch.bfloat16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_scaled_loss)(logits.clone().requires_grad_(), labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(_scaled_loss, backend=backend, fullgraph=True)
    loss_c, grad_c = _run(logits, labels, g, op=compiled)
    loss_e, grad_e = _run(logits, labels, g, op=_scaled_loss)
    assert abs(float(loss_c) - float(loss_e)) <= 1e-6 * abs(float(loss_e))
    assert _rel(grad_c, grad_e) < 1e-2  # bf16 gradients: rounding may differ by an ulp


def test_registry_refuses_duplicates_and_unregistered_ops():
    class Other(losses.LossOps):
        name = "test-loss-other"

    losses.register_loss_ops("test-loss-device", Other())
    with pytest.raises(ValueError, match="registered twice"):
        losses.register_loss_ops("test-loss-device", Other())

    class Stray(losses.LossOps):
        name = "test-loss-stray"

    with pytest.raises(ValueError, match="not registered"):
        losses.cross_entropy_sum(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), ops=Stray())
    assert losses.loss_ops_for(torch.zeros(1), fast=False) is losses.TORCH_OPS


def test_cpu_backend_registers_cache_sized_chunks():
    """The CPU backend's ops: the same passes in 1 MiB chunks (bench/results/cross_entropy_cpu.json),
    equal to the default ops on the same input."""
    import anymoe.backends  # noqa: F401  (registers the built-in backends' ops)

    cpu = losses.loss_ops_for(torch.zeros(1))
    assert cpu is not losses.TORCH_OPS and cpu.chunk_bytes == 1 << 20
    logits, labels, g = _problem(300, 4000, torch.float32)  # 5 chunks of <= 65 rows
    a = _run(logits, labels, g, op=lambda x, y: losses.cross_entropy_sum(x, y, ops=cpu))
    b = _run(logits, labels, g, op=lambda x, y: losses.cross_entropy_sum(x, y, ops=losses.TORCH_OPS))
    assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-6)
    torch.testing.assert_close(a[1], b[1])
