"""What every backend must do, checked the same way on each one present.

Each test takes the ``backend`` fixture (tests/backends/conftest.py): every registered
backend, skipped with its reason when it is not usable here. Tensors are placed with
``backend.device()`` only, so this file runs unchanged on CPU, CUDA and (one day) NPU.
References are a float64 per-expert loop on the CPU over the same (rounded) inputs.
"""

import pytest
import torch

from anymoe.core.backend import create_backend
from anymoe.core.grouped_mm import grouped_mm_loop
from anymoe.core.sizing import IDENTITY, POW2, ExpertSizingPolicy

# counts per expert (E = 4); rows are sorted by expert, so counts [1, 0, 2, 0] means
# row 0 -> expert 0, rows 1-2 -> expert 2, experts 1 and 3 get nothing.
COUNTS = {
    "mixed": [5, 3, 9, 7],
    "empty_groups": [6, 0, 0, 4],
    "single_rows": [1, 1, 0, 1],
    "one_expert": [0, 0, 11, 0],
    "no_rows": [0, 0, 0, 0],
}
# (D, F): 16-byte aligned rows, and sizes whose bf16 rows are not (the GPU path pads them).
DIMS = [(16, 32), (12, 20)]
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    got = got.detach().double().cpu()
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"D{d[0]}F{d[1]}")
@pytest.mark.parametrize("case", list(COUNTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_mm_matches_float64_loop(backend, dtype, case, dims):
    D, F = dims
    counts = torch.tensor(COUNTS[case])
    T, E = int(counts.sum()), counts.numel()
    gen = torch.Generator().manual_seed(list(COUNTS).index(case) * 100 + D)
    x = torch.randn(T, D, generator=gen).to(dtype)
    w = (torch.randn(E, D, F, generator=gen) / D**0.5).to(dtype)
    g = torch.randn(T, F, generator=gen).to(dtype)

    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = grouped_mm_loop(x64, w64, counts)
    ref.backward(g.double())

    dev = backend.device()
    xd, wd = x.to(dev).requires_grad_(), w.to(dev).requires_grad_()
    y = backend.grouped_mm(xd, wd, counts.to(dev))
    y.backward(g.to(dev))
    assert y.dtype == dtype and y.device.type == backend.device_type
    _close(y, ref.detach(), TOL[dtype], "output")
    _close(xd.grad, x64.grad, TOL[dtype], "grad x")
    _close(wd.grad, w64.grad, TOL[dtype], "grad w")
    if counts.eq(0).any():  # an expert with no rows gets an exactly-zero weight gradient
        assert wd.grad[counts.to(dev) == 0].abs().max().item() == 0.0


def test_grouped_mm_backward_from_sum(backend):
    """``y.sum()`` hands back an expanded (stride 0) gradient; the kernel path must take it."""
    dev = backend.device()
    x = torch.randn(10, 16, device=dev, requires_grad=True)
    w = torch.randn(3, 16, 8, device=dev, requires_grad=True)
    backend.grouped_mm(x, w, torch.tensor([4, 0, 6], device=dev)).sum().backward()
    rows_E = torch.stack([x[:4].sum(0), torch.zeros(16, device=dev), x[4:].sum(0)])
    ref_w = rows_E[:, :, None].expand(3, 16, 8)
    _close(w.grad, ref_w.detach().double().cpu(), 1e-5, "grad w")


def test_same_seed_same_initial_weights_on_every_backend(backend):
    """Parameters are created on the CPU from the seeded generator, then moved: bit-identical."""
    torch.manual_seed(1234)
    ref = torch.nn.Linear(24, 40).state_dict()
    backend.manual_seed(1234)
    moved = torch.nn.Linear(24, 40).to(backend.device())
    for name, tensor in moved.state_dict().items():
        assert tensor.device.type == backend.device_type
        assert torch.equal(tensor.cpu(), ref[name]), name


def test_seeding_makes_device_randomness_repeat(backend):
    dev = backend.device()
    backend.manual_seed(7)
    a = torch.randn(64, device=dev)
    backend.manual_seed(7)
    assert torch.equal(a, torch.randn(64, device=dev))


def test_deterministic_mode_leaves_new_tensors_unfilled(backend):
    """Deterministic algorithms on, torch's NaN fill of every torch.empty off (a debugging aid that
    cost 10.7 ms of a 127 ms step on the H100; bench/results/gpu_h100/session6/)."""
    backend.set_deterministic(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.utils.deterministic.fill_uninitialized_memory


def test_deterministic_grouped_mm_is_bitwise_repeatable(backend):
    backend.set_deterministic(True)
    dev = backend.device()
    counts = torch.tensor([40, 0, 70, 18], device=dev)
    x = torch.randn(128, 32, device=dev)
    w = torch.randn(4, 32, 48, device=dev)
    g = torch.randn(128, 48, device=dev)
    results = []
    for _ in range(2):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        backend.grouped_mm(xr, wr, counts).backward(g)
        backend.synchronize()
        results.append((xr.grad, wr.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_sizing_policy_default_and_forced(backend):
    expected = POW2 if backend.name == "npu" else IDENTITY
    assert backend.sizing_policy() == expected
    forced = create_backend(backend.name, sizing=ExpertSizingPolicy("multiple_of", 64))
    assert forced.sizing_policy().padded(100) == 128
    assert create_backend(backend.name, sizing=POW2).sizing_policy().padded(48) == 64


def test_memory_stats_and_peak_reset(backend):
    keep = torch.empty(1 << 20, device=backend.device())
    backend.synchronize()
    stats = backend.memory_stats()
    assert isinstance(stats, dict)
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in stats.items())
    if "peak_allocated_bytes" in stats:
        assert stats["peak_allocated_bytes"] >= keep.numel() * keep.element_size()
    backend.reset_peak_memory()
    del keep


def test_device_flops_and_autocast(backend):
    dev = backend.device(0)
    assert dev.type == backend.device_type and backend.device_count() >= 1
    for dtype in (torch.float32, torch.bfloat16):
        assert isinstance(backend.peak_flops(dtype), float) and backend.peak_flops(dtype) >= 0.0
    dtype = backend.autocast_dtype()
    if dtype is not None:
        a = torch.randn(8, 8, device=dev)
        with torch.autocast(device_type=backend.device_type, dtype=dtype):
            assert (a @ a).dtype == dtype


def test_availability_reason_and_dist_backend(backend):
    status = backend.availability()
    assert status.ok and isinstance(status.reason, str)
    assert backend.dist_backend in ("gloo", "nccl", "hccl")


def test_grouped_mm_under_autocast_takes_fp32_weights(backend):
    """fp32 master weights x activations under autocast: computed in the autocast dtype, like a Linear."""
    dev = backend.device()
    dtype = backend.autocast_dtype() or torch.bfloat16
    counts = torch.tensor([3, 0, 5], device=dev)
    x = torch.randn(8, 16, device=dev, requires_grad=True)
    w = torch.randn(3, 16, 8, device=dev, requires_grad=True)
    with torch.autocast(device_type=backend.device_type, dtype=dtype):
        y = backend.grouped_mm(x, w, counts)
    assert y.dtype == dtype
    y.float().backward(torch.ones_like(y, dtype=torch.float32))
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    x64, w64 = (t.detach().to(dtype).double().cpu() for t in (x, w))
    ref = grouped_mm_loop(x64, w64, counts.cpu())
    _close(y, ref, TOL[torch.bfloat16], "output")
    # outside autocast, mixed operands promote (bf16 activations x fp32 weights -> fp32)
    assert backend.grouped_mm(x.detach().to(torch.bfloat16), w.detach(), counts).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 1000)], ids=["N7D64", "B2S5D1000"])
def test_rms_norm_ops_on_the_device_match_float64(backend, dtype, shape):
    """The norm ops the backend registers for its device (the torch formula, Triton kernels on
    CUDA, torch_npu's RmsNorm on Ascend): rms_norm and the residual add fused with it, forward
    and x / d / weight gradients, against the float64 formula on the CPU."""
    from anymoe.core.norm import TORCH_NORM_OPS, add_rms_norm, rms_norm

    dev = backend.device()
    g = torch.Generator().manual_seed(shape[-1])
    x, d, gy, gs = (torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(4))
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g, dtype=torch.float64)).to(dtype)
    x64, d64, w64 = (t.double().requires_grad_() for t in (x, d, w))
    s_ref, y_ref = TORCH_NORM_OPS.add_rms_norm(x64, d64, w64, 1e-6)
    ((y_ref * gy.double()).sum() + (s_ref * gs.double()).sum()).backward()
    xd, dd, wd = (t.to(dev).requires_grad_() for t in (x, d, w))
    s, y = add_rms_norm(xd, dd, wd, 1e-6)
    ((y * gy.to(dev)).sum() + (s * gs.to(dev)).sum()).backward()
    for got, ref, what in [(s, s_ref, "sum"), (y, y_ref, "y"), (xd.grad, x64.grad, "grad x"),
                           (dd.grad, d64.grad, "grad d"), (wd.grad, w64.grad, "grad w")]:
        _close(got, ref.detach(), TOL[dtype], what)
    ref = TORCH_NORM_OPS.rms_norm(x.double(), w.double(), 1e-6)
    _close(rms_norm(x.to(dev).requires_grad_(), w.to(dev), 1e-6), ref, TOL[dtype], "rms_norm")
