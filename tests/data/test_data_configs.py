"""Every example data section in configs/data/ loads into DataConfig and builds its datasets."""

from pathlib import Path

import pytest

from anymoe.core.config import load_config, load_yaml
from anymoe.data import DataConfig, build_data

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "configs" / "data").glob("*.yaml"))


def test_examples_exist():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_builds(path):
    cfg = load_config(DataConfig, load_yaml(path)["data"], "data")
    data = build_data(cfg)
    assert len(data.train) > 0 and len(data.eval) > 0
    batch = data.train_stream(4).next_batch()
    assert all(v.shape[0] == 4 for k, v in batch.items() if k != "items")
