"""CPU backend specifics: the grouped-matmul choice, the IPEX gate, memory stats, selection."""

import torch

from anymoe.backends.cpu import CPUBackend, ipex_status, major_minor
from anymoe.core.backend import get_backend
from anymoe.core.grouped_mm import grouped_mm_loop


def test_ipex_is_used_only_beside_its_torch():
    assert major_minor("2.13.0+cpu") == (2, 13) and major_minor("2.8.0") == (2, 8)
    assert not ipex_status(None, "2.13.0").ok
    # intel-extension-for-pytorch 2.8.0 (its last release) refuses any torch but 2.8.* (observed).
    refused = ipex_status("2.8.0", "2.13.0+cpu")
    assert not refused.ok and "needs torch 2.8.*" in refused.reason and "2.13.0+cpu" in refused.reason
    assert ipex_status("2.8.0+cpu", "2.8.0+cpu").ok


def test_cpu_extensions_report_ipex():
    assert "ipex" in CPUBackend().extensions()


def test_auto_falls_back_to_cpu_without_accelerators():
    b = get_backend("auto")
    if b.name == "cpu":
        assert b.dist_backend == "gloo" and b.autocast_dtype() is None


def test_float64_goes_through_the_loop():
    x, w = torch.randn(7, 5, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    counts = torch.tensor([3, 4])
    assert torch.equal(CPUBackend().grouped_mm(x, w, counts), grouped_mm_loop(x, w, counts))


def test_memory_stats_report_peak_rss():
    stats = CPUBackend().memory_stats()
    assert stats["peak_rss_bytes"] > 1e6


def test_optimize_without_ipex_returns_inputs():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    b = CPUBackend()
    if not b.extensions()["ipex"].startswith("used"):
        assert b.optimize(model, opt) == (model, opt)
