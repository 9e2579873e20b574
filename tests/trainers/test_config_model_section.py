"""The run config and the RLHF config share one preamble (``with_model_expanded``): a mapping is
required, the model section is required, and a preset is expanded the same way for both."""

import pytest

from anymoe.core.config import ConfigError
from anymoe.trainers.config import config_from_data
from anymoe.trainers.rlhf.config import rlhf_config_from_data

LOADERS = {"run": (config_from_data, "a run config"), "rlhf": (rlhf_config_from_data, "an RLHF config")}


@pytest.mark.parametrize("kind", list(LOADERS))
def test_not_a_mapping_is_refused_naming_the_kind(kind):
    load, what = LOADERS[kind]
    with pytest.raises(ConfigError, match=f"{what} must be a mapping of sections, not list"):
        load([1, 2])


@pytest.mark.parametrize("kind", list(LOADERS))
def test_model_section_is_required(kind):
    load, _ = LOADERS[kind]
    with pytest.raises(ConfigError, match="model.*is required"):
        load({"name": "x"})


@pytest.mark.parametrize("kind", list(LOADERS))
def test_preset_is_expanded_alike_and_input_left_alone(kind):
    load, _ = LOADERS[kind]
    data = {"model": {"preset": "tiny", "vocab_size": 259, "d_model": 64}}
    cfg = load(data)
    assert cfg.model.vocab_size == 259 and cfg.model.d_model == 64
    assert data == {"model": {"preset": "tiny", "vocab_size": 259, "d_model": 64}}
    assert cfg.model.n_layers == config_from_data({"model": {"preset": "tiny"}}).model.n_layers
