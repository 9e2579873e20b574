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


def _interpret(code: str) -> None:
    """Run ``code`` (which prints "ok" at its end) in a subprocess under Triton's interpreter."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels")
def test_dispatch_kernels_in_triton_cpu_interpreter():
    _interpret(CODE)


NORM_CODE = """
import torch
from anymoe.backends import cuda_norm_kernels as nk
from anymoe.core.norm import TORCH_NORM_OPS
g = torch.Generator().manual_seed(0)
for N, D, dt, wdt in [(5, 70, torch.float32, torch.float32), (40, 64, torch.bfloat16, torch.bfloat16),
                      (3, 33, torch.bfloat16, torch.float32), (0, 16, torch.float32, torch.float32)]:
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = 1 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    gy = torch.randn(N, D, generator=g, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = TORCH_NORM_OPS.rms_norm(xr, wr, 1e-6)
    (ref * gy).sum().backward()
    xk, wk = x.to(dt).requires_grad_(), w.to(wdt).requires_grad_()
    y = nk._RMSNorm.apply(xk, wk, 1e-6)
    assert y.dtype == torch.promote_types(dt, wdt), (y.dtype, dt, wdt)
    (y * gy.to(y.dtype)).sum().backward()
    tol = 1e-5 if dt == wdt == torch.float32 else 2e-2
    for a, b in [(y, ref), (xk.grad, xr.grad), (wk.grad, wr.grad)]:
        err = float((a.double() - b.double()).abs().max()) if N else 0.0
        assert err <= tol * max(1.0, float(b.abs().max()) if N else 1.0), (N, D, dt, wdt, err)
    # the residual add fused in: (s, y) = (x + d, norm(x + d)); s's gradient with or without one
    for s_used in (True, False):
        d = torch.randn(N, D, generator=g, dtype=torch.float64)
        gs = torch.randn(N, D, generator=g, dtype=torch.float64)
        xr, dr, wr = x.clone().requires_grad_(), d.clone().requires_grad_(), w.clone().requires_grad_()
        s_ref, ref = TORCH_NORM_OPS.add_rms_norm(xr, dr, wr, 1e-6)
        ((ref * gy).sum() + (s_ref * gs).sum() * s_used).backward()
        xk, dk, wk = x.to(dt).requires_grad_(), d.to(dt).requires_grad_(), w.to(wdt).requires_grad_()
        s, y = nk._AddRMSNorm.apply(xk, dk, wk, 1e-6)
        assert s.dtype == dt and y.dtype == torch.promote_types(dt, wdt), (s.dtype, y.dtype)
        loss = (y * gy.to(y.dtype)).sum()
        ((loss + (s * gs.to(dt)).sum()) if s_used else loss).backward()
        pairs = [(s, s_ref), (y, ref), (xk.grad, xr.grad), (dk.grad, dr.grad), (wk.grad, wr.grad)]
        for a, b in pairs:
            err = float((a.double() - b.double()).abs().max()) if N else 0.0
            assert err <= tol * max(1.0, float(b.abs().max()) if N else 1.0), (N, D, dt, wdt, s_used, err)
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels")
def test_rms_norm_kernels_in_triton_cpu_interpreter():
    """Forward and backward (x and weight gradients) against the float64 torch formula; the
    same with the residual add fused in (x, d and weight gradients, with and without a
    gradient of the sum)."""
    _interpret(NORM_CODE)


TOPK_CODE = """
import math
import torch
from anymoe.backends import cuda_kernels as ck
g = torch.Generator().manual_seed(0)

def loop(s, k):  # the kernel's order: score descending, ties lower index first, NaN as +inf
    rows = []
    for row in s.double().tolist():
        key = [math.inf if math.isnan(v) else v for v in row]
        rows.append(sorted(range(len(row)), key=lambda e: (-key[e], e))[:k])
    return torch.tensor(rows, dtype=torch.int64).view(len(rows), k)

def check(s, k, what):
    ids = ck.launch_topk_ids(s, k)
    assert ids.dtype == torch.int64 and ids.shape == (s.shape[0], k), what
    assert ((ids >= 0) & (ids < s.shape[1])).all(), what
    assert all(len(set(row)) == k for row in ids.tolist()), what
    assert torch.equal(ids, loop(s, k)), (what, ids, loop(s, k))
    return ids

for T, E, k in [(1000, 64, 8), (37, 6, 2), (5, 256, 1), (0, 8, 2), (3, 8, 8)]:
    s = torch.randn(T, E, generator=g)
    ids = check(s, k, (T, E, k))
    assert torch.equal(ids.sort(1).values, s.topk(k, dim=-1).indices.sort(1).values), (T, E, k)
# ties, in the half types too (bf16 rounding makes many)
check(torch.randint(0, 4, (200, 64), generator=g).float(), 8, "integer ties")
check(torch.randn(300, 64, generator=g).bfloat16(), 8, "bf16")
check(torch.randn(50, 40, generator=g).half(), 5, "fp16")
# NaN ranks first: with at most k NaNs per row the set is torch.topk's
s = torch.randn(64, 16, generator=g)
s[torch.rand(64, 16, generator=g) < 0.15] = float("nan")
ids = check(s, 4, "nan")
few = s.isnan().sum(1) <= 4
assert torch.equal(ids[few].sort(1).values, s[few].topk(4, dim=-1).indices.sort(1).values)
s[5] = float("nan")
check(s, 4, "all-nan row")
# -inf (group-limited masking): fewer than k finite scores, or none
s = torch.randn(40, 32, generator=g)
s[:10, 3:] = float("-inf")
s[10:20] = float("-inf")
s[20:30, ::2] = float("-inf")
check(s, 8, "-inf")
check(torch.full((3, 8), float("-inf")), 8, "all -inf, k = E")
# a row stride other than E (the launcher honours stride(0)), and the op family's fallbacks
wide = torch.randn(20, 70, generator=g)
check(wide[:, :64], 8, "row stride 70")
d = torch.randn(9, 12, generator=g, dtype=torch.float64)
assert torch.equal(ck.TRITON_OPS.topk_ids(d, 3), d.topk(3, dim=-1).indices)  # fp64: torch.topk
f = torch.randn(9, 12, generator=g)
assert torch.equal(ck.TRITON_OPS.topk_ids(f, 3), loop(f, 3))  # fp32 on the kernel (eager launcher)
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels")
def test_topk_ids_kernel_in_triton_cpu_interpreter():
    """The router's top-k kernel against a plain loop (order: descending, ties lower index first)
    and torch.topk's index sets; ties, NaN rows, rows of -inf."""
    _interpret(TOPK_CODE)
