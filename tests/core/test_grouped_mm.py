"""Portable grouped matmul implementations vs a float64 loop, forward and backward.

Worked example of the layout: counts [2, 0, 1] -> rows 0-1 use w[0], expert 1 gets no rows,
row 2 uses w[2]; y is [3, F] in the same row order as x.
"""

import pytest
import torch

from anymoe.core.grouped_mm import (
    aligned_size,
    grouped_mm_loop,
    grouped_mm_padded,
    grouped_mm_torch,
    has_torch_grouped_mm,
    offsets_from_counts,
    torch_grouped_mm_works,
)

IMPLS = {"padded": grouped_mm_padded, "torch": grouped_mm_torch}


def test_loop_worked_example():
    x = torch.arange(6.0).view(3, 2)
    w = torch.stack([torch.eye(2), torch.full((2, 2), 9.0), 2 * torch.eye(2)])
    y = grouped_mm_loop(x, w, torch.tensor([2, 0, 1]))
    assert y.tolist() == [[0.0, 1.0], [2.0, 3.0], [8.0, 10.0]]


def test_offsets_are_int32_cumsum():
    offs = offsets_from_counts(torch.tensor([2, 0, 1]))
    assert offs.dtype == torch.int32 and offs.tolist() == [2, 2, 3]


@pytest.mark.parametrize("n, dtype, want", [(12, torch.bfloat16, 16), (16, torch.bfloat16, 16),
                                            (5, torch.float32, 8), (3, torch.float64, 4)])
def test_aligned_size(n, dtype, want):
    assert aligned_size(n, dtype, 16) == want


def _random_case(seed: int, E: int, T: int, D: int, F: int):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.bincount(torch.randint(0, E, (T,), generator=gen), minlength=E)
    x = torch.randn(T, D, generator=gen)
    w = torch.randn(E, D, F, generator=gen) / D**0.5
    g = torch.randn(T, F, generator=gen)
    return x, w, counts, g


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("seed, E, T, D, F", [(0, 4, 30, 16, 8), (1, 8, 5, 12, 20), (2, 3, 1, 7, 3),
                                              (3, 5, 0, 8, 8)])
def test_impl_matches_float64_loop_forward_and_backward(impl, seed, E, T, D, F):
    if impl == "torch" and not torch_grouped_mm_works(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm has no fp32 CPU kernel in this torch (e.g. 2.8)")
    x, w, counts, g = _random_case(seed, E, T, D, F)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = grouped_mm_loop(x64, w64, counts)
    ref.backward(g.double())
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = IMPLS[impl](xr, wr, counts)
    y.backward(g)
    torch.testing.assert_close(y.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xr.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wr.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch_grouped_mm_works(torch.device("cpu"), torch.bfloat16),
                    reason="torch._grouped_mm has no bf16 CPU kernel in this torch (e.g. 2.8)")
def test_torch_path_takes_expanded_grad_and_unaligned_bf16():
    x = torch.randn(9, 12, dtype=torch.bfloat16, requires_grad=True)  # 24-byte rows: padded to 32
    w = torch.randn(2, 12, 20, dtype=torch.bfloat16, requires_grad=True)
    counts = torch.tensor([4, 5])
    grouped_mm_torch(x, w, counts).sum().backward()  # y.sum() gives a stride-0 gradient
    ref_w = torch.stack([x[:4].float().sum(0), x[4:].float().sum(0)])[:, :, None].expand(2, 12, 20)
    torch.testing.assert_close(w.grad.float(), ref_w, atol=0.1, rtol=2e-2)
    assert x.grad.shape == (9, 12)


def test_padded_with_capacity_needs_no_max():
    x, w, counts, _ = _random_case(4, 4, 20, 8, 8)
    got = grouped_mm_padded(x, w, counts, capacity=20)
    torch.testing.assert_close(got, grouped_mm_loop(x, w, counts))


def test_probe_answers_per_dtype_and_never_touches_the_global_generator():
    state = torch.get_rng_state()
    assert torch_grouped_mm_works(torch.device("cpu"), torch.float64) is False  # the op has no fp64
    torch_grouped_mm_works(torch.device("cpu"), torch.float32)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.skipif(not has_torch_grouped_mm(), reason="this torch has no torch._grouped_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backend_grouped_mm_under_torch_compile(dtype):
    """Compiled models work: fp32 (refused by the op's fake-tensor rule) falls back to the loop."""
    from anymoe.backends.cpu import CPUBackend

    fn = torch.compile(CPUBackend().grouped_mm, backend="eager")
    x, w, counts, g = _random_case(5, 3, 12, 16, 8)
    xr, wr = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    y = fn(xr, wr, counts)
    y.backward(g.to(dtype))
    ref = grouped_mm_loop(x.to(dtype).double(), w.to(dtype).double(), counts)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    assert wr.grad is not None and xr.grad is not None


def test_first_probe_inside_a_full_activation_checkpoint():
    """The backend's one-time op probe may run inside a checkpointed block's forward; the
    recompute (probe cached) must still save the same tensors, so training steps work."""
    from anymoe.core import grouped_mm as gm
    from anymoe.core.backend import get_backend
    from anymoe.models.presets import preset
    from anymoe.models.transformer import MoETransformer

    gm._PROBED.clear()
    torch.manual_seed(0)
    cfg = preset("tiny", checkpointing="full")
    model = MoETransformer(cfg, backend=get_backend("cpu"))
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(ids)
    logits = out if torch.is_tensor(out) else out.logits
    logits.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
