"""Shared pieces of the RLHF tests: one intra-op thread, a tiny MoE config for RL runs.

Tiny models gain nothing from a second intra-op thread, and on a busy 2-core CI machine the
spinning threads make each step 10-30x slower, so these tests run single-threaded.
"""

import pytest
import torch

TINY_MODEL = {"preset": "tiny", "vocab_size": 259, "d_model": 64,
              "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 64}}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model_data():
    """The ``model:`` section of the tiny RL configs (plain data, preset expanded by the loader)."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_MODEL.items()}


def _build_tiny(seed=0):
    from anymoe.core.config import load_config
    from anymoe.models.config import ModelConfig
    from anymoe.models.transformer import MoETransformer
    from anymoe.trainers.config import _expand_preset

    torch.manual_seed(seed)
    return MoETransformer(load_config(ModelConfig, _expand_preset(dict(TINY_MODEL))))


@pytest.fixture
def tiny_model_factory():
    """build(seed) -> a fresh tiny MoE policy drawn from ``seed``."""
    return _build_tiny
