"""CUDA backend logic that needs no GPU: availability verdicts and the peak FLOP/s table.

The GPU behaviour itself is covered by test_conformance.py on a CUDA machine
(ci/gpu_conformance.sh).
"""

import pytest
import torch

from anymoe.backends.cuda import cuda_availability, peak_flops_for
from anymoe.core.backend import BackendUnavailable, create_backend, get_backend


@pytest.mark.parametrize(
    "name, bf16, fp32",
    [
        ("NVIDIA H100 80GB HBM3", 989e12, 67e12),
        ("NVIDIA H100 PCIe", 756e12, 51e12),
        ("NVIDIA H200", 989e12, 67e12),
        ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12),
    ],
)
def test_peak_flops_by_device_name(name, bf16, fp32):
    assert peak_flops_for(name, torch.bfloat16) == bf16
    assert peak_flops_for(name, torch.float16) == bf16
    assert peak_flops_for(name, torch.float32) == fp32


def test_unknown_device_or_dtype_has_no_peak():
    assert peak_flops_for("NVIDIA GeForce GTX 1080", torch.bfloat16) == 0.0
    assert peak_flops_for("NVIDIA H100 80GB HBM3", torch.float64) == 0.0


def test_availability_verdicts(monkeypatch):
    no_build = cuda_availability(None, 0, "2.13.0+cpu")
    assert not no_build.ok and "build without CUDA" in no_build.reason and "2.13.0+cpu" in no_build.reason
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    no_gpu = cuda_availability("12.8", 0, "2.11.0+cu128")
    assert not no_gpu.ok and "sees no GPU" in no_gpu.reason and "CUDA_VISIBLE_DEVICES=''" in no_gpu.reason
    assert cuda_availability("12.8", 2, "2.11.0").ok


def test_identity_sizing_and_nccl():
    b = create_backend("cuda")
    assert b.sizing_policy().kind == "identity" and b.dist_backend == "nccl" and b.device_type == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_selection_without_gpu_fails_with_one_line():
    with pytest.raises(BackendUnavailable) as err:
        get_backend("cuda")
    assert "\n" not in str(err.value) and str(err.value).startswith("backend 'cuda' is not usable here: ")


def test_deterministic_mode_is_strict_on_cuda_and_warn_only_elsewhere():
    """On CUDA torch picks attention's deterministic backward only in strict mode (in warn-only mode
    two bf16 runs of one config drifted apart; bench/results/gpu_h100/session7/); the CPU keeps
    warn-only. Both leave new tensors unfilled."""
    was_on, was_warn_only = (torch.are_deterministic_algorithms_enabled(),
                             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        create_backend("cuda").set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
        create_backend("cpu").set_deterministic(True)
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.backends.cudnn.deterministic = False
