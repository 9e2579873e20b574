"""Expert sizing policies and the backend registry's selection rules."""

import pytest

from anymoe.core.backend import Backend, BackendUnavailable, backend_names, get_backend, register_backend
from anymoe.core.sizing import POW2, ExpertSizingPolicy, parse_policy


@pytest.mark.parametrize("hidden, expected", [(1, 1), (5, 8), (8, 8), (1408, 2048), (2816, 4096)])
def test_pow2(hidden, expected):
    assert POW2.padded(hidden) == expected


def test_multiple_of_and_parse():
    assert parse_policy("multiple_of:64").padded(100) == 128
    assert parse_policy("identity").padded(100) == 100
    with pytest.raises(ValueError, match="multiple_of:N"):
        parse_policy("pow3")
    with pytest.raises(ValueError, match="positive"):
        ExpertSizingPolicy("pow2").padded(0)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(BackendUnavailable) as info:
        get_backend("tpu")
    for name in ("auto", "cpu", "cuda", "npu"):
        assert name in str(info.value)


def test_auto_returns_a_usable_backend_and_forced_sizing_sticks():
    backend = get_backend("auto", sizing=POW2)
    assert backend.availability().ok
    assert backend.sizing_policy() == POW2
    assert set(backend_names()) >= {"cpu", "cuda", "npu"}


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_backend("cpu", auto_priority=0)(Backend)
