"""Every shipped config under configs/ (the trainer's) loads and validates; sft trains a step."""

from pathlib import Path

import pytest

from anymoe.cli import main
from anymoe.trainers.config import load_run_config
from anymoe.trainers.metrics import read_metrics

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NAMES = ["tiny.yaml", "small.yaml", "deepseek-moe-style.yaml", "sft.yaml"]


@pytest.mark.parametrize("name", NAMES)
def test_config_loads(name):
    cfg = load_run_config(CONFIGS / name)
    assert cfg.name == name.removesuffix(".yaml")
    assert cfg.backend == "auto"


def test_sft_masks_the_prompt_and_trains(tmp_path):
    run = tmp_path / "sft"
    rc = main(["train", str(CONFIGS / "sft.yaml"), "--out", str(run), "--steps", "2",
               "--set", "model.d_model=32", "--set", "train.micro_batch=4", "--set", "train.global_batch=4",
               "--set", "logging.plots=false", "--set", "logging.tensorboard=false",
               "--set", "logging.progress=false"])
    assert rc == 0
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    # Only response tokens count: far fewer loss tokens than 4 rows x 32 positions.
    assert 0 < rows[0]["tokens_per_s"] * rows[0]["interval_s"] < 4 * 32
