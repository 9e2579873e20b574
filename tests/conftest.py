"""Shared fixtures. Tests run on the CPU by default; device tests are marked and skipped.

One intra-op thread per process: CI has 2 cores and many tests start several worker
processes, so extra threads only fight each other (a tiny matmul took 28 ms instead of
3 us with 2 threads on a loaded 2-core machine). Set before torch loads so the worker
processes and subprocesses inherit it.
"""

import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
