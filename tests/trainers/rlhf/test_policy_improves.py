"""GRPO and PPO each raise the mean reward of a fresh tiny MoE policy on the shipped addition task.

The runs go through the real trainers (data pipeline, KV-cache rollouts, routing replay,
metrics.jsonl, PNG plots). Reward: exact answer + 0.5 * digit share (weighted combination);
from random weights the exact answer stays near 0 in so few steps, the shaping term is what
rises; the curve is saved as reward.png in the run directory.
"""

import json

import pytest

from anymoe.core.backend import get_backend
from anymoe.trainers.rlhf.cli import trainer_class
from anymoe.trainers.rlhf.config import load_rlhf_config


def _fit(algo: str, tmp_path, steps: int, extra: list[str] = ()):
    cfg = load_rlhf_config(f"configs/rlhf/{algo}_addition.yaml", algo,
                           [f"train.steps={steps}", "logging.progress=false", "eval.every=0",
                            "eval.at_end=false", "checkpoint.at_end=false", *extra])
    trainer = trainer_class(algo)(cfg, tmp_path / algo, get_backend("cpu"))
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]
    return trainer, [r for r in rows if "reward_mean" in r]


def _assert_improves(rows, margin: float):
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert last > first + margin, f"mean reward {first:.3f} -> {last:.3f}"
    for key in ("reward_std", "kl", "entropy", "clip_frac", "response_len", "routing_agreement", "layers"):
        assert key in rows[-1], key


def test_grpo_raises_mean_reward(tmp_path):
    trainer, rows = _fit("grpo", tmp_path, 25)
    _assert_improves(rows, 0.15)
    assert (tmp_path / "grpo" / "reward.png").stat().st_size > 1000
    assert (tmp_path / "grpo" / "expert_load.png").is_file()
    assert rows[0]["first_ratio_max_dev"] == 0.0  # routing replay: the first ratio is exactly 1


def test_ppo_raises_mean_reward(tmp_path):
    trainer, rows = _fit("ppo", tmp_path, 25)
    assert trainer.critic is not None
    _assert_improves(rows, 0.15)
    assert "value_loss" in rows[-1]
    assert (tmp_path / "ppo" / "reward.png").stat().st_size > 1000


@pytest.mark.parametrize("advantage,agg", [("rloo", "seq-mean"), ("reinforce_pp", "dr-grpo")])
def test_other_estimators_run(tmp_path, advantage, agg):
    _, rows = _fit("grpo", tmp_path, 3, [f"rlhf.policy.advantage={advantage}", f"rlhf.policy.loss_agg={agg}",
                                         "rlhf.policy.kl_coef=0.05", "rlhf.moe.router_kl_coef=0.1",
                                         "logging.plots=false"])
    assert len(rows) == 3 and "router_kl" in rows[-1] and "kl_loss" in rows[-1]


def test_ppo_with_whitened_advantages_runs(tmp_path):
    trainer, rows = _fit("ppo", tmp_path, 2, ["rlhf.policy.whiten_advantages=true", "logging.plots=false"])
    assert len(rows) == 2 and "value_loss" in rows[-1]
