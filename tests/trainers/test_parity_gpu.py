"""CPU fp32 vs CUDA fp32 (TF32 off) over 200 steps of configs/parity.yaml: max relative loss
difference <= 1e-3 (issue 7). Runs on a CUDA machine (`pytest -m gpu`); skipped elsewhere.
ci/parity_gpu.sh makes the same comparison plus bf16 and EP=2 under NCCL, writing curves
and plots for bench/results/parity/."""

from __future__ import annotations

from pathlib import Path

import pytest
from determinism import restore_determinism

from anymoe.cli import main
from anymoe.core.backend import BackendUnavailable, get_backend
from anymoe.trainers.curves import compare, read_curve

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "parity.yaml")
STEPS = 200
TOL_FP32 = 1e-3


def _cuda_or_skip():
    try:
        return get_backend("cuda")
    except (BackendUnavailable, KeyError, ValueError) as err:
        pytest.skip(f"needs a usable CUDA backend: {err}")


@pytest.mark.gpu
def test_cpu_fp32_vs_cuda_fp32_within_1e_3(tmp_path, capsys):
    _cuda_or_skip()
    paths = {}
    with restore_determinism():
        for backend in ("cpu", "cuda"):
            paths[backend] = tmp_path / f"{backend}.jsonl"
            code = main(["parity", "run", CONFIG, "--backend", backend, "--steps", str(STEPS),
                         "--out", str(paths[backend])])
            assert code == 0, backend
    meta = read_curve(paths["cuda"]).meta
    assert meta["float32_matmul_precision"] == "highest"  # TF32 off
    assert main(["parity", "compare", str(paths["cpu"]), str(paths["cuda"]), "--rtol", str(TOL_FP32)]) == 0, \
        capsys.readouterr().out
    report = compare(read_curve(paths["cpu"]), read_curve(paths["cuda"]), TOL_FP32)
    assert report.steps == STEPS
