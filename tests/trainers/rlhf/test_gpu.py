"""The RLHF trainers on an accelerator backend (skipped here with the backend's reason).

Run on a GPU box: ``pytest -m gpu tests/trainers/rlhf``. The same configs as the CPU tests,
``backend`` overridden; the numbers to compare are in the run's metrics.jsonl.
"""

import json

import pytest

from anymoe.core.backend import get_backend, probe_backends
from anymoe.trainers.rlhf.cli import trainer_class
from anymoe.trainers.rlhf.config import load_rlhf_config


def _accelerator():
    for name, status in probe_backends().items():
        if name != "cpu" and status.ok:
            return name
    reasons = "; ".join(f"{n}: {s.reason}" for n, s in probe_backends().items() if n != "cpu")
    pytest.skip(f"no accelerator backend usable here ({reasons})")


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ["grpo", "ppo", "dpo", "rm"])
def test_rlhf_runs_on_the_accelerator(tmp_path, algo):
    name = _accelerator()
    cfg = load_rlhf_config(f"configs/rlhf/{algo}_addition.yaml", algo,
                           [f"backend={name}", "train.steps=5", "logging.progress=false", "eval.every=0"])
    trainer = trainer_class(algo)(cfg, tmp_path / algo, get_backend(name))
    last = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) >= 5 and last
    if algo in ("grpo", "ppo"):
        # Replay on: the same micro-batch, same kernels -> ratio 1 up to kernel determinism.
        assert rows[0]["first_ratio_max_dev"] < 1e-5
