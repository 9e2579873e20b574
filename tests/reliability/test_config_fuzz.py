"""Property-based fuzz of the run-config loader: any input ends in a RunConfig or a ConfigError,
never in another exception (an unhandled traceback for the user)."""

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anymoe.core.config import ConfigError, apply_overrides
from anymoe.trainers.config import RunConfig, config_from_data

BASE = {
    "model": {"preset": "tiny", "vocab_size": 259},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32},
    "train": {"steps": 2, "micro_batch": 2, "global_batch": 4},
}
SECTIONS = ["model", "data", "optim", "parallel", "train", "logging", "checkpoint", "eval", "model.moe",
            "model.moe.router", "model.moe.balance", "model.mla"]
KEYS = ["steps", "lr", "ep", "dp", "seq_len", "path", "tokenizer", "num_experts", "top_k", "preset",
        "d_model", "n_heads", "micro_batch", "global_batch", "precision", "schedule", "every", "keep_last",
        "format", "eval_split", "kind", "score", "aux_free", "spike_factor", "beta2", "x", "", "0"]

NAMES = ["auto", "cpu", "tiny", "bf16", "wsd", "1e-3", "inf"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(NAMES))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
    max_leaves=6)


def run_loader(data):
    try:
        cfg = config_from_data(data)
    except ConfigError as err:
        assert str(err)  # one readable line
        return None
    assert isinstance(cfg, RunConfig)
    return cfg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(section=st.sampled_from(SECTIONS), key=st.sampled_from(KEYS), value=values)
def test_mutated_field_never_crashes(section, key, value):
    data = copy.deepcopy(BASE)
    node = data
    for part in section.split("."):
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[key] = value
    run_loader(data)


@settings(max_examples=100, deadline=None)
@given(data=st.dictionaries(st.sampled_from(SECTIONS[:8] + ["backend", "name"]), values, max_size=4))
def test_random_top_level_never_crashes(data):
    run_loader(data)


@settings(max_examples=100, deadline=None)
@given(items=st.lists(st.text(alphabet="abcdeflmnoprstx.=[]{}:, 0123456789-", max_size=20), max_size=3))
def test_random_overrides_never_crash(items):
    try:
        data = apply_overrides(copy.deepcopy(BASE), items)
    except ConfigError:
        return
    run_loader(data)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="model:preset tiny\n\t-[]{},:'\"#&*!|>%@`", max_size=60))
def test_random_yaml_text_never_crashes(text, tmp_path_factory):
    from anymoe.core.config import load_yaml

    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_text(text)
    try:
        data = load_yaml(path)
    except ConfigError:
        return
    run_loader(data)


def test_base_is_valid():
    assert run_loader(yaml.safe_load(yaml.safe_dump(BASE))) is not None
