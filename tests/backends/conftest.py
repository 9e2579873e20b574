"""Backend parametrisation: every registered backend, skipped with its own reason when absent.

A backend's tests carry its marker (``gpu`` for cuda, ``npu`` for npu) so the default CPU
run deselects them; ci/gpu_conformance.sh runs with ``-m 'not slow'`` to include them.
"""

import pytest
import torch

from anymoe.core.backend import create_backend, probe_backends

MARKS = {"cuda": [pytest.mark.gpu], "npu": [pytest.mark.npu]}


def backend_params() -> list:
    params = []
    for name, status in probe_backends().items():
        marks = list(MARKS.get(name, []))
        if not status.ok:
            marks.append(pytest.mark.skip(reason=f"backend {name!r} not usable here: {status.reason}"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=backend_params())
def backend(request):
    b = create_backend(request.param)
    yield b
    b.set_deterministic(False)


@pytest.fixture
def poison_empty():
    """Fill every torch.empty with NaN, so an element a kernel forgets to write fails the check."""
    old = torch.utils.deterministic.fill_uninitialized_memory
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = old
    torch.use_deterministic_algorithms(was)
