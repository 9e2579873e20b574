"""The dispatch kernels of anymoe/backends/cuda_kernels.py in Triton's CPU interpreter
(TRITON_INTERPRET=1, in a subprocess), against float64 loops: a check of kernel edits on a
machine without a GPU. CPU builds of torch ship without Triton, so this skips there; the GPU
tests (tests/backends/test_cuda_kernels.py, -m gpu) run the compiled kernels."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CODE = """
import torch
from anymoe.backends import cuda_kernels as ck
g = torch.Generator().manual_seed(0)
for T, K, D, dt in [(5, 6, 70, torch.float32), (4, 2, 2049, torch.bfloat16), (3, 1, 16, torch.float16)]:
    R = T * K
    y = torch.randn(R + 1, D, generator=g, dtype=torch.float64)
    idx = torch.randperm(R, generator=g).view(T, K)
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    ref = (w[..., None] * y[idx]).sum(1)
    out = ck.launch_combine_fwd(y.to(dt), idx, w.to(dt))
    tol = 1e-5 if dt == torch.float32 else 3e-2
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max(), (T, K, D, dt)
    gs = ck.launch_gather_sum(y.to(dt), idx)
    assert (gs.double() - y[idx].sum(1)).abs().max() <= tol * y[idx].sum(1).abs().max(), (T, K, D, dt)
    rows = ck.launch_gather_rows(y.to(dt), idx.flatten())
    assert torch.equal(rows, y.to(dt)[idx.flatten()]), (T, K, D, dt)
for N, E in [(5000, 6), (7, 64), (0, 3)]:
    ids = torch.randint(-1, E, (N,), generator=g)
    counts = ck.launch_expert_counts(ids, E)
    assert torch.equal(counts, torch.bincount(ids[ids >= 0], minlength=E)), (N, E)
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels")
def test_dispatch_kernels_in_triton_cpu_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.stdout.strip().endswith("ok"), done.stderr[-3000:]
