"""`anymoe rlhf ...` end to end, config errors that name the field, the RL model config, resume."""

import json
import warnings

import pytest
import torch

from anymoe.cli import main
from anymoe.core.backend import get_backend
from anymoe.core.config import ConfigError
from anymoe.trainers.rlhf.cli import trainer_class
from anymoe.trainers.rlhf.config import load_rlhf_config, rl_model_config, rlhf_config_from_data
from anymoe.trainers.rlhf.routing import router_parameters

FAST = ["--set", "logging.progress=false", "--set", "eval.every=0", "--set", "rlhf.eval_prompts=8"]


def test_cli_grpo_writes_metrics_plots_checkpoint_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["rlhf", "grpo", "configs/rlhf/grpo_addition.yaml", "--out", str(out), "--steps", "2", *FAST])
    assert code == 0
    for name in ("metrics.jsonl", "config.yaml", "run.json", "reward.png", "rl_stats.png", "routing.png",
                 "loss.png", "expert_load.png"):
        assert (out / name).is_file(), name
    assert list((out / "checkpoints").glob("step_*"))
    info = json.loads((out / "run.json").read_text())
    assert info["algorithm"] == "grpo" and info["steps"] == 2 and "eval_reward" in info
    assert "done: grpo 2 steps" in capsys.readouterr().out
    # A second run into the same directory is refused (nothing overwritten) ...
    again = ["rlhf", "grpo", "configs/rlhf/grpo_addition.yaml", "--out", str(out), *FAST,
             "--set", "logging.plots=false"]
    assert main([*again, "--steps", "2"]) == 2
    # ... and --resume continues it to a longer run.
    assert main([*again, "--steps", "3", "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2, 3]
    assert "eval_reward_before" in rows[0]  # the start of the eval curve, measured before any update


def test_resume_continues_the_same_curve(tmp_path):
    def fit(steps, out, resume=False):
        cfg = load_rlhf_config("configs/rlhf/grpo_addition.yaml", "grpo",
                               [f"train.steps={steps}", "logging.progress=false", "logging.plots=false",
                                "eval.every=0", "eval.at_end=false", "checkpoint.every=2"])
        trainer_class("grpo")(cfg, out, get_backend("cpu"), resume=resume).fit()
        return [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    straight = fit(4, tmp_path / "a")
    fit(2, tmp_path / "b")
    resumed = fit(4, tmp_path / "b", resume=True)
    assert resumed == straight


@pytest.mark.parametrize("change,field", [
    ({"data": {"format": "prompts", "path": "shipped:addition_prompts.jsonl"}}, "data.format"),
    ({"rlhf": {"policy": {"advantage": "gea"}}}, "rlhf.policy.advantage"),
    ({"rlhf": {"policy": {"clip_eps": 2.0}}}, "rlhf.policy.clip_eps"),
    ({"rlhf": {"dpo": {"loss_type": "kto"}}}, "rlhf.dpo.loss_type"),
    ({"rlhf": {"rewardz": []}}, "rlhf.rewardz"),
    ({"parallel": {"ep": 2}}, "parallel.ep"),
])
def test_config_errors_name_the_field(change, field):
    data = {"model": {"preset": "tiny", "vocab_size": 259},
            "data": {"format": "preference", "path": "shipped:addition_preferences.jsonl"}}
    for key, value in change.items():
        data[key] = value
    with pytest.raises(ConfigError) as err:
        rlhf_config_from_data(data, "dpo")
    assert err.value.field == field, str(err.value)


def test_group_estimator_needs_a_group_and_grpo_refuses_gae():
    base = {"model": {"preset": "tiny", "vocab_size": 259},
            "data": {"format": "prompts", "path": "shipped:addition_prompts.jsonl"}}
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        rlhf_config_from_data({**base, "rlhf": {"rollout": {"samples_per_prompt": 1}}}, "grpo")
    with pytest.raises(ConfigError, match="no critic"):
        rlhf_config_from_data({**base, "rlhf": {"policy": {"advantage": "gae"}}}, "grpo")
    ppo = {"policy": {"advantage": "gae"}, "rollout": {"samples_per_prompt": 1}}
    rlhf_config_from_data({**base, "rlhf": ppo}, "ppo")


def test_cli_reports_config_errors_before_work(tmp_path, capsys):
    code = main(["rlhf", "dpo", "configs/rlhf/grpo_addition.yaml", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "data.format" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_rl_model_config_turns_balance_off_keeps_z_loss_and_warns():
    cfg = rlhf_config_from_data({"model": {"preset": "tiny", "vocab_size": 259},
                                 "data": {"format": "prompts", "path": "shipped:addition_prompts.jsonl"}})
    assert cfg.model.moe.balance.aux_loss > 0  # the preset trains with it
    rl = rl_model_config(cfg.model, cfg.rlhf)
    assert rl.moe.balance.aux_loss == 0 and rl.moe.balance.z_loss == cfg.model.moe.balance.z_loss > 0
    with pytest.warns(UserWarning, match="balance_aux"):
        on = rlhf_config_from_data({"model": {"preset": "tiny", "vocab_size": 259},
                                    "data": {"format": "prompts", "path": "shipped:addition_prompts.jsonl"},
                                    "rlhf": {"moe": {"balance_aux": True, "z_loss": False}}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rl_on = rl_model_config(on.model, on.rlhf)
    assert rl_on.moe.balance.aux_loss == cfg.model.moe.balance.aux_loss and rl_on.moe.balance.z_loss == 0


def test_freeze_router_keeps_router_weights(tmp_path):
    cfg = load_rlhf_config("configs/rlhf/grpo_addition.yaml", "grpo",
                           ["train.steps=2", "logging.progress=false", "logging.plots=false", "eval.every=0",
                            "eval.at_end=false", "checkpoint.at_end=false", "rlhf.moe.freeze_router=true",
                            "rlhf.moe.update_bias=true"])
    trainer = trainer_class("grpo")(cfg, tmp_path / "f", get_backend("cpu"))
    trainer.build()
    before = {n: p.detach().clone() for n, p in router_parameters(trainer.actor.module)}
    others = {n: p.detach().clone() for n, p in trainer.actor.module.named_parameters() if n not in before}
    trainer.train_step(0)
    after = dict(router_parameters(trainer.actor.module))
    assert before and all(torch.equal(before[n], after[n]) for n in before)
    moved = [n for n, p in trainer.actor.module.named_parameters()
             if n in others and not torch.equal(others[n], p)]
    assert moved  # the rest of the policy did train


def test_sft_checkpoint_of_anymoe_train_starts_the_policy(tmp_path):
    """anymoe train (SFT) -> anymoe rlhf grpo --set rlhf.init_from=RUN_DIR: the weights carry over."""
    sft = tmp_path / "sft"
    assert main(["train", "configs/rlhf/sft_addition.yaml", "--out", str(sft), "--steps", "2",
                 "--set", "logging.progress=false", "--set", "eval.every=0", "--set", "eval.at_end=false",
                 "--set", "logging.plots=false"]) == 0
    cfg = load_rlhf_config("configs/rlhf/grpo_addition.yaml", "grpo",
                           ["train.steps=1", "logging.progress=false", "logging.plots=false", "eval.every=0",
                            "eval.at_end=false", f"rlhf.init_from={sft}"])
    trainer = trainer_class("grpo")(cfg, tmp_path / "rl", get_backend("cpu"))
    trainer.build()
    saved = torch.load(next((sft / "checkpoints").glob("step_*")) / "model.pt", weights_only=True)
    for name, p in trainer.reference.module.state_dict().items():
        assert torch.equal(p, saved[name]), name
    with pytest.raises(ConfigError, match="rlhf.init_from"):
        bad = load_rlhf_config("configs/rlhf/grpo_addition.yaml", "grpo",
                               [f"rlhf.init_from={tmp_path / 'nope'}"])
        trainer_class("grpo")(bad, tmp_path / "rl2", get_backend("cpu")).build()
