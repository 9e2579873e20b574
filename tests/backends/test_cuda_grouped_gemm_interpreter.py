"""The grouped GEMMs of anymoe/backends/cuda_grouped_gemm.py in Triton's CPU interpreter
(TRITON_INTERPRET=1, in a subprocess), against float64 loops: a check of kernel edits on a
machine without a GPU. CPU builds of torch ship without Triton, so this skips there; the GPU
tests (tests/backends/test_cuda_grouped_gemm.py, -m gpu) run the compiled kernels.

The interpreter runs one config (BLOCK_M=16, BLOCK_N=32, BLOCK_K=16; wgrad BLOCK_K1=16,
BLOCK_N=32, BLOCK_R=16), so K=40 and N=72 leave tails in every block dimension.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMMON = """
import torch
from anymoe.backends import cuda_grouped_gemm as gg
gen = torch.Generator().manual_seed(0)
torch.use_deterministic_algorithms(True)  # with the next line: torch.empty is NaN-filled, so an
torch.utils.deterministic.fill_uninitialized_memory = True  # element left unwritten fails the check

# offs are cumulative END offsets: counts [2, 0, 3] -> offs [2, 2, 5]: rows 0-1 are group 0,
# group 1 is empty, rows 2-4 are group 2, rows 5.. (past offs[-1]) come out as zeros.
COUNTS = [5, 0, 20, 3, 9]  # an empty group, groups under and over BLOCK_M=16
E, K, N, TAIL, SRC = len(COUNTS), 40, 72, 6, 11
OFFS = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
R = sum(COUNTS) + TAIL
IDX = torch.randint(0, SRC, (R,), generator=gen)  # a gather with repeats from SRC source rows


def rows_ref(a, w, offs, idx=None):
    a = a if idx is None else a[idx]
    out = torch.zeros(a.shape[0], w.shape[2], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end] @ w[e]
        start = end
    return out


def wgrad_ref(a, g, offs, idx=None):
    a = a if idx is None else a[idx]
    out = torch.zeros(len(offs), a.shape[1], g.shape[1], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[e] = a[start:end].T @ g[start:end]
        start = end
    return out


def close(got, ref, tol, what):
    err = (got.double() - ref).abs().max().item()
    assert torch.isfinite(got).all() and err <= tol * ref.abs().max().item(), (what, err)
"""

ROWS = COMMON + """
for dt, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
    w = torch.randn(E, K, N, generator=gen, dtype=torch.float64)
    for gather in (False, True):
        a = torch.randn(SRC if gather else R, K, generator=gen, dtype=torch.float64)
        idx = IDX if gather else None
        ref = rows_ref(a, w, OFFS, idx)
        for trans in (False, True):
            w_in = w.transpose(1, 2).contiguous().to(dt) if trans else w.to(dt)  # [E, N, K] when trans
            got = gg.grouped_mm_rows(a.to(dt), w_in, OFFS, idx, trans_w=trans)
            assert got.dtype == dt and got.shape == (R, N)
            close(got, ref, tol, (dt, gather, trans))
            assert (got[sum(COUNTS):] == 0).all(), "rows past offs[-1] must be zeros"
    # the custom op (the torch.compile path) is the same launcher behind a schema
    got = torch.ops.anymoe.grouped_mm_rows(a.to(dt), w.to(dt), OFFS, IDX)
    close(got, rows_ref(a, w, OFFS, IDX), tol, ("op", dt))
try:
    gg.grouped_mm_rows(a.float(), w.to(torch.bfloat16), OFFS)
    raise AssertionError("mixed dtypes accepted")
except ValueError as err:
    assert "cast them to one dtype" in str(err), err
print("ok")
"""

WGRAD = COMMON + """
for dt, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
    g = torch.randn(R, N, generator=gen, dtype=torch.float64)
    for gather in (False, True):
        a = torch.randn(SRC if gather else R, K, generator=gen, dtype=torch.float64)
        idx = IDX if gather else None
        ref = wgrad_ref(a, g, OFFS, idx)
        got = gg.grouped_mm_wgrad(a.to(dt), g.to(dt), OFFS, idx)
        assert got.dtype == dt and got.shape == (E, K, N)
        close(got, ref, tol, (dt, gather))
        assert (got[1] == 0).all(), "an empty group's gradient must be zeros"
        got = torch.ops.anymoe.grouped_mm_wgrad(a.to(dt), g.to(dt), OFFS, idx, torch.float32)
        assert got.dtype == torch.float32
        close(got, ref, tol, ("op", dt, gather))
print("ok")
"""

AUTOGRAD = COMMON + """
def grads(fn, a, w, idx, gy):
    a, w = a.detach().requires_grad_(), w.detach().requires_grad_()
    (fn(a, w, OFFS, idx) * gy).sum().backward()
    return a.grad, w.grad

w = torch.randn(E, K, N, generator=gen, dtype=torch.float64)
gy = torch.randn(R, N, generator=gen, dtype=torch.float64)
# compiled: the custom ops are opaque nodes of one graph (aot_eager: no inductor on the CPU here)
compiled = torch.compile(gg.grouped_mm, fullgraph=True, backend="aot_eager")
for gather in (False, True):
    a = torch.randn(SRC if gather else R, K, generator=gen, dtype=torch.float64)
    idx = IDX if gather else None
    da_ref, dw_ref = grads(rows_ref, a, w, idx, gy)
    for name, fn in (("eager", gg.grouped_mm), ("compiled", compiled)):
        da, dw = grads(fn, a.float(), w.float(), idx, gy.float())
        close(da, da_ref, 1e-5, (name, "da", gather))
        close(dw, dw_ref, 1e-5, (name, "dw", gather))
print("ok")
"""


def _run_interpreted(code: str) -> None:
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert done.stdout.strip().endswith("ok"), done.stderr[-3000:]


skip_on_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels")


@skip_on_gpu
def test_grouped_mm_rows_in_triton_cpu_interpreter():
    _run_interpreted(ROWS)


@skip_on_gpu
def test_grouped_mm_wgrad_in_triton_cpu_interpreter():
    _run_interpreted(WGRAD)


@skip_on_gpu
def test_grouped_mm_autograd_in_triton_cpu_interpreter():
    _run_interpreted(AUTOGRAD)
