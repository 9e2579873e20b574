"""Triton grouped GEMMs (anymoe/backends/cuda_grouped_gemm.py) on a CUDA device: against
``torch._grouped_mm`` at a real MoE size, float64 loops on small uneven sizes, the explicit
gather, per-expert matmuls for the weight gradient, torch.compile and CUDA-graph replay.

Run on the GPU machine: ``python -m pytest -m gpu tests/backends/test_cuda_grouped_gemm.py``.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_empty")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)
gg = pytest.importorskip("anymoe.backends.cuda_grouped_gemm")
if not gg.HAVE_TRITON:
    pytest.skip("needs Triton (not importable here)", allow_module_level=True)

DEV = torch.device("cuda")


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values (an unwritten element?)"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _counts(R, E, gen, empty=3):
    """Uneven random group sizes summing to R, expert ``empty`` given none."""
    ids = torch.multinomial(torch.rand(E, generator=gen) ** 2 + 0.01, R, replacement=True, generator=gen)
    ids[ids == empty] = (empty + 1) % E
    return torch.bincount(ids, minlength=E)


def _offs(counts):
    return counts.cumsum(0).to(DEV, torch.int32)


def _rows_ref(a, w, offs, idx=None):
    """float64 loop; rows past offs[-1] stay zero."""
    a, w = a.double().cpu(), w.double().cpu()
    a = a if idx is None else a[idx.cpu()]
    out = torch.zeros(a.shape[0], w.shape[2], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end] @ w[e]
        start = end
    return out


def _wgrad_loop(a, g, offs):
    out = torch.zeros(len(offs), a.shape[1], g.shape[1], dtype=torch.float32, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[e] = a[start:end].float().T @ g[start:end].float()
        start = end
    return out


def test_rows_match_torch_grouped_mm_at_moe_size():
    E, R, K, N = 64, 16384, 1024, 1024
    gen = torch.Generator().manual_seed(0)
    counts = _counts(R, E, gen)
    assert counts[3] == 0
    offs = _offs(counts)
    a = torch.randn(R, K, generator=gen).to(DEV, torch.bfloat16)
    w = (torch.randn(E, K, N, generator=gen) / K**0.5).to(DEV, torch.bfloat16)
    ref = torch._grouped_mm(a, w, offs=offs)
    assert _rel(gg.grouped_mm_rows(a, w, offs), ref) < 1e-2
    # the data gradient's form: W_e^T read through strides, against torch on the transposed view
    g = torch.randn(R, N, generator=gen).to(DEV, torch.bfloat16)
    ref = torch._grouped_mm(g, w.transpose(1, 2), offs=offs)
    assert _rel(gg.grouped_mm_rows(g, w, offs, trans_w=True), ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("trans_w", [False, True])
def test_rows_against_float64_on_uneven_groups(dtype, gather, trans_w):
    # an empty group, one under BLOCK_M, one over; 37 rows past offs[-1]; K, N off the block sizes
    counts = torch.tensor([5, 0, 300, 3, 190])
    E, K, N, src = len(counts), 200, 328, 97
    R = int(counts.sum()) + 37
    gen = torch.Generator().manual_seed(int(gather) + 2 * int(trans_w))
    offs = _offs(counts)
    a = torch.randn(src if gather else R, K, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, src, (R,), generator=gen).to(DEV) if gather else None
    w = torch.randn(E, K, N, generator=gen, dtype=torch.float64)
    w_in = w.transpose(1, 2).contiguous() if trans_w else w  # [E, N, K] when trans_w
    got = gg.grouped_mm_rows(a.to(DEV, dtype), w_in.to(DEV, dtype), offs, idx, trans_w=trans_w)
    assert got.dtype == dtype
    assert _rel(got, _rows_ref(a, w, offs, idx)) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert (got[int(counts.sum()):] == 0).all()


def test_gather_matches_explicit_gather():
    E, K, N, T, topk = 16, 512, 384, 1000, 4
    gen = torch.Generator().manual_seed(1)
    counts = _counts(T * topk, E, gen)
    a = torch.randn(T, K, generator=gen).to(DEV, torch.bfloat16)
    w = torch.randn(E, K, N, generator=gen).to(DEV, torch.bfloat16)
    idx = torch.randint(0, T, (T * topk,), generator=gen).to(DEV)
    offs = _offs(counts)
    assert _rel(gg.grouped_mm_rows(a, w, offs, idx), gg.grouped_mm_rows(a[idx], w, offs)) < 1e-6
    g = torch.randn(T * topk, N, generator=gen).to(DEV, torch.bfloat16)
    assert _rel(gg.grouped_mm_wgrad(a, g, offs, idx), gg.grouped_mm_wgrad(a[idx], g, offs)) < 1e-6


@pytest.mark.parametrize("gather", [False, True])
def test_wgrad_matches_per_expert_matmul(gather):
    E, R, K, N, src = 32, 8192, 512, 768, 3000
    gen = torch.Generator().manual_seed(2)
    counts = _counts(R, E, gen)
    offs = _offs(counts)
    a = torch.randn(src if gather else R, K, generator=gen).to(DEV, torch.bfloat16)
    idx = torch.randint(0, src, (R,), generator=gen).to(DEV) if gather else None
    g = torch.randn(R, N, generator=gen).to(DEV, torch.bfloat16)
    ref = _wgrad_loop(a if idx is None else a[idx], g, counts.cumsum(0))
    got = gg.grouped_mm_wgrad(a, g, offs, idx, out_dtype=torch.float32)
    assert got.dtype == torch.float32 and _rel(got, ref) < 1e-4
    assert (got[3] == 0).all()
    assert _rel(gg.grouped_mm_wgrad(a, g, offs, idx), ref) < 1e-2  # bf16 out by default


@pytest.mark.parametrize("gather", [False, True])
def test_grouped_mm_grads_match_float64_autograd(gather):
    counts = torch.tensor([40, 0, 130, 7, 66])
    E, K, N, src = len(counts), 96, 160, 50
    R = int(counts.sum()) + 9
    gen = torch.Generator().manual_seed(3)
    offs = _offs(counts)
    a64 = torch.randn(src if gather else R, K, generator=gen, dtype=torch.float64)
    w64 = torch.randn(E, K, N, generator=gen, dtype=torch.float64)
    gy = torch.randn(R, N, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, src, (R,), generator=gen).to(DEV) if gather else None
    ra, rw = a64.clone().requires_grad_(), w64.clone().requires_grad_()
    (_rows_ref(ra, rw, offs, idx) * gy).sum().backward()
    a = a64.to(DEV, torch.bfloat16).requires_grad_()
    w = w64.to(DEV, torch.bfloat16).requires_grad_()
    y = gg.grouped_mm(a, w, offs, idx)
    (y.double() * gy.to(DEV)).sum().backward()
    assert _rel(y, _rows_ref(a64, w64, offs, idx)) < 1e-2
    assert _rel(a.grad, ra.grad) < 1e-2
    assert _rel(w.grad, rw.grad) < 1e-2


def _step(a, w, offs, idx, g, fn=gg.grouped_mm):
    y = fn(a, w, offs, idx)
    return (y, *torch.autograd.grad((y * g).sum(), (a, w)))


@pytest.mark.parametrize("gather", [False, True])
def test_torch_compile_fullgraph_matches_eager(gather):
    E, T, K, N = 8, 512, 256, 384
    gen = torch.Generator().manual_seed(4)
    R = 2 * T
    offs = _offs(_counts(R, E, gen))
    a = torch.randn(T if gather else R, K, generator=gen).to(DEV, torch.bfloat16).requires_grad_()
    w = torch.randn(E, K, N, generator=gen).to(DEV, torch.bfloat16).requires_grad_()
    idx = torch.randint(0, T, (R,), generator=gen).to(DEV) if gather else None
    g = torch.randn(R, N, generator=gen).to(DEV, torch.bfloat16)
    eager = _step(a, w, offs, idx, g)
    compiled = _step(a, w, offs, idx, g, torch.compile(gg.grouped_mm, fullgraph=True))
    for x, y in zip(compiled, eager):
        assert _rel(x, y) < 1e-3


def test_cuda_graph_replay_reads_new_offsets():
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.use_deterministic_algorithms(False)
    E, T, K, N = 16, 600, 256, 320
    R = 2 * T
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(T, K, generator=gen).to(DEV, torch.bfloat16).requires_grad_()
    w = torch.randn(E, K, N, generator=gen).to(DEV, torch.bfloat16).requires_grad_()
    g = torch.randn(R, N, generator=gen).to(DEV, torch.bfloat16)
    static_offs = _offs(_counts(R, E, gen))
    static_idx = torch.randint(0, T, (R,), generator=gen).to(DEV)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: autotuning benchmarks, which a capture cannot hold
        for _ in range(2):
            _step(a, w, static_offs, static_idx, g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _step(a, w, static_offs, static_idx, g)
    # new routing: other group sizes (now ending short of R: tail rows), another gather
    counts = _counts(R - 50, E, gen, empty=0)
    static_offs.copy_(_offs(counts))
    static_idx.copy_(torch.randint(0, T, (R,), generator=gen).to(DEV))
    graph.replay()
    fresh = _step(a, w, static_offs.clone(), static_idx.clone(), g)
    for x, y in zip(static_out, fresh):
        assert _rel(x, y) < 1e-3  # not bit-equal: dA's index_add_ adds repeated rows in any order
    assert _rel(static_out[0], _rows_ref(a, w, static_offs.cpu(), static_idx)) < 1e-2
