"""The NPU backend's logic that needs no NPU, and the real torch-npu wheel's failure modes.

The pure parts (group list, error classification, version check, sizing) run everywhere.
``test_real_wheel_*`` run an interpreter that has torch-npu installed: this one if it has
it, else the one named by ANYMOE_NPU_PYTHON (ci/npu_conformance.sh builds a throwaway
venv with torch-npu==2.13.0 and sets it); otherwise they skip and say so.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anymoe.backends import npu
from anymoe.core.backend import BackendUnavailable, create_backend, get_backend

REPO = Path(__file__).resolve().parents[2]
# What torch-npu 2.13.0 really raises on a machine without the CANN runtime (observed).
CANN_MISSING = ImportError("libhccl.so: cannot open shared object file: No such file or directory")


def test_group_list_is_cumulative_int64():
    # counts [2, 0, 3]: rows 0-1 -> expert 0, expert 1 empty, rows 2-4 -> expert 2.
    gl = npu.group_list_from_counts(torch.tensor([2, 0, 3]))
    assert gl.dtype == torch.int64 and gl.tolist() == [2, 2, 5]
    assert npu.group_list_from_counts(torch.tensor([0, 0], dtype=torch.int32)).tolist() == [0, 0]
    counts = torch.randint(0, 9, (17,))
    assert torch.equal(npu.group_list_from_counts(counts), torch.tensor(counts.tolist()).cumsum(0))


def test_cann_missing_is_named_with_the_fix():
    reason = npu.classify_import_error(CANN_MISSING, "2.13.0")
    assert "torch_npu 2.13.0 is installed but the Ascend CANN runtime is missing" in reason
    assert "libhccl.so" in reason and "set_env.sh" in reason and "pip uninstall torch-npu" in reason
    other_lib = ImportError("libascendcl.so: cannot open shared object file: No such file or directory")
    assert "libascendcl.so" in npu.classify_import_error(other_lib, "2.13.0")


def test_missing_package_and_other_failures():
    missing = ModuleNotFoundError("No module named 'torch_npu'")
    assert "not installed" in npu.classify_import_error(missing, None)
    reason = npu.classify_import_error(RuntimeError("boom\nmore"), "2.13.0")
    assert reason == "torch_npu 2.13.0 is installed but failed to import (RuntimeError: boom)"


def test_version_mismatch_is_detected_before_import():
    assert npu.version_mismatch("2.13.0", "2.13.0+cpu") is None
    msg = npu.version_mismatch("2.14.0", "2.13.0+cpu")
    assert "built for torch 2.14.*" in msg and "torch 2.13.0+cpu is installed" in msg
    assert "torch-npu==2.13.*" in msg


def test_no_device_reason_names_the_check(monkeypatch):
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "")
    reason = npu.no_device_reason("2.13.0")
    assert "no Ascend device is visible" in reason and "ASCEND_RT_VISIBLE_DEVICES=''" in reason


def test_npu_sizes_experts_as_powers_of_two():
    b = create_backend("npu")
    assert b.sizing_policy().kind == "pow2" and b.sizing_policy().padded(1408) == 2048
    assert b.dist_backend == "hccl" and b.device_type == "npu"


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_without_the_package_selection_fails_with_one_line():
    with pytest.raises(BackendUnavailable) as err:
        get_backend("npu")
    msg = str(err.value)
    assert "\n" not in msg and "torch_npu package is not installed" in msg and "anymoe[npu]" in msg
    assert get_backend("auto").name != "npu"


def _npu_python() -> str | None:
    if importlib.util.find_spec("torch_npu") is not None:
        return sys.executable
    return os.environ.get("ANYMOE_NPU_PYTHON") or None


NPU_PY = _npu_python()
needs_wheel = pytest.mark.skipif(
    NPU_PY is None,
    reason="torch-npu is not installed here and ANYMOE_NPU_PYTHON is unset (ci/npu_conformance.sh sets it)",
)
CANN_PRESENT = Path("/usr/local/Ascend").exists() or "ASCEND_TOOLKIT_HOME" in os.environ


def _run(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    env["PYTHONPATH"] = str(REPO)
    env.update(env_extra or {})
    return subprocess.run([NPU_PY, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=REPO)


@needs_wheel
def test_real_wheel_anymoe_survives_and_names_the_reason():
    probe = (
        "import anymoe, json, torch\n"
        "from anymoe.backends.npu import load_torch_npu\n"
        "m, s = load_torch_npu()\n"
        "print(json.dumps({'ok': s.ok, 'reason': s.reason, 'cpu': float(torch.ones(2).sum())}))\n"
    )
    done = _run(probe)
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["cpu"] == 2.0  # torch itself still works after the failed extension import
    if not CANN_PRESENT:
        assert not facts["ok"]
        assert "Ascend CANN runtime is missing" in facts["reason"] and "libhccl.so" in facts["reason"]


@needs_wheel
def test_real_wheel_env_command_exits_1_with_one_line():
    done = _run("from anymoe.cli import main; raise SystemExit(main(['env', '--backend', 'npu']))")
    if CANN_PRESENT:
        pytest.skip("CANN is present here; the no-CANN message cannot be observed")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "CANN runtime is missing" in done.stderr


@needs_wheel
def test_real_wheel_breaks_plain_torch_import_without_anymoe():
    """The hazard anymoe guards against: torch auto-loads the broken extension on its own."""
    if CANN_PRESENT:
        pytest.skip("CANN is present here; torch_npu loads")
    done = _run("import torch")
    assert done.returncode != 0 and "Failed to load the backend extension: torch_npu" in done.stderr


def contract_grouped_matmul(x, weight, *, group_list, split_item, group_type, group_list_type):
    """``npu_grouped_matmul``'s documented contract for one x, one weight, one y, in float64 on the CPU.

    group_type 0: x [M, K] rows split by group_list, weight [E, K, N] -> y [M, N].
    group_type 2: x [M, K] columns (K) split by group_list, weight [K, N] rows too -> y [E, M, N].
    group_list_type 0: group_list holds cumulative ends (as anymoe passes it).
    """
    assert split_item == 3 and group_list_type == 0 and len(x) == len(weight) == 1
    a, b = x[0].double(), weight[0].double()
    ends = group_list.tolist()
    starts = [0, *ends[:-1]]
    if group_type == 0:
        return [torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(zip(starts, ends))]).to(x[0].dtype)]
    assert group_type == 2
    return [torch.stack([a[:, s:e] @ b[s:e] for s, e in zip(starts, ends)]).to(x[0].dtype)]


def test_npu_autograd_formulas_against_the_kernel_contract():
    """The backward's kernel calls (transposes, group_type=2 for dw) give the float64 loop's gradients."""
    from anymoe.core.grouped_mm import grouped_mm_loop

    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 0, 1, 6])
    x = torch.randn(10, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    y = npu.NPUGroupedMM.apply(x, w, npu.group_list_from_counts(counts), contract_grouped_matmul)
    y.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = grouped_mm_loop(x2, w2, counts)
    ref.backward(g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert w.grad[1].abs().max() == 0  # expert with no rows
