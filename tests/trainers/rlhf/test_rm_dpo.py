"""Reward model and DPO through the real trainers on synthetic preference pairs.

RM: pairs whose preference a tiny model can learn in seconds -- the chosen answer is the
right sum, the rejected one the same answer with a corruption (a letter in place of a digit,
trailing junk, or a repeated answer) -- written as a JSONL file with a held-out split.
The shipped addition preferences (right sum vs a plausible wrong sum) need arithmetic; a
slow test reports what the tiny RM reaches there.
"""

import json
import random

import pytest
import torch

from anymoe.core.backend import get_backend
from anymoe.trainers.rlhf.cli import trainer_class
from anymoe.trainers.rlhf.config import load_rlhf_config
from anymoe.trainers.rlhf.dpo import sequence_logps
from anymoe.trainers.rlhf.losses import dpo_loss


def corrupted_pairs(n: int, seed: int) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = r.randrange(10, 100), r.randrange(10, 100)
        right = str(a + b)
        kind = r.randrange(3)
        if kind == 0:
            i = r.randrange(len(right))
            bad = right[:i] + r.choice("abcdxyz") + right[i + 1:]
        elif kind == 1:
            bad = right + r.choice(["?", "!!", " ok", "x"])
        else:
            bad = right + right
        rows.append({"prompt": f"{a}+{b}=", "chosen": right, "rejected": bad})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _fit(algo, tmp_path, overrides):
    cfg = load_rlhf_config(f"configs/rlhf/{algo}_addition.yaml", algo,
                           ["logging.progress=false", "checkpoint.at_end=false", *overrides])
    trainer = trainer_class(algo)(cfg, tmp_path / algo, get_backend("cpu"))
    last = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]
    return trainer, last, rows


def test_reward_model_above_90_percent_on_held_out_synthetic_pairs(tmp_path):
    train = _write(tmp_path / "train.jsonl", corrupted_pairs(1500, 0))
    held = _write(tmp_path / "eval.jsonl", corrupted_pairs(200, 1))
    _, last, rows = _fit("rm", tmp_path, [f"data.path={train}", f"data.eval_split={held}", "train.steps=60",
                                          "train.micro_batch=32", "eval.every=0"])
    assert last["eval_accuracy"] > 0.9, last
    assert rows[-1]["eval_pairs"] == 200
    assert (tmp_path / "rm" / "preference.png").is_file()


@pytest.mark.slow
def test_reward_model_on_shipped_addition_preferences(tmp_path):
    """Right sum vs a plausible wrong sum needs arithmetic: report what 300 steps reach."""
    _, last, _ = _fit("rm", tmp_path, ["train.steps=300"])
    assert last["eval_accuracy"] > 0.55, last  # measured ~0.65; chance is 0.5


def test_dpo_raises_the_chosen_minus_rejected_margin(tmp_path):
    trainer, last, rows = _fit("dpo", tmp_path, ["train.steps=30", "eval.every=0"])
    steps = [r for r in rows if "margin" in r]
    assert steps[0]["margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    late = sum(r["margin"] for r in steps[-5:]) / 5
    assert late > 0.05 and late > steps[0]["margin"]
    assert last["eval_margin"] > 0.0
    # The trainer's rewards equal an independent float64 computation from the same log-probs.
    batch = trainer.bundle.collate([trainer.bundle.eval[i] for i in range(8)])
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    with torch.no_grad():
        t = trainer.pair_terms({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        logits = trainer.model(ids).double()
        ref_logits = trainer.reference.module(ids).double()
    beta = trainer.cfg.rlhf.dpo.beta

    def seq_logp(lg):
        out = []
        for row in range(ids.shape[0]):
            total = 0.0
            for pos in range(ids.shape[1]):
                if labels[row, pos] != -100:
                    total += float(torch.log_softmax(lg[row, pos], -1)[labels[row, pos]])
            out.append(total)
        return torch.tensor(out, dtype=torch.float64)

    pol, ref = seq_logp(logits), seq_logp(ref_logits)
    torch.testing.assert_close(t["chosen"].double(), beta * (pol[:8] - ref[:8]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(t["rejected"].double(), beta * (pol[8:] - ref[8:]), atol=1e-5, rtol=1e-4)
    want, _, _ = dpo_loss(pol[:8], pol[8:], ref[:8], ref[8:], beta=beta)
    torch.testing.assert_close(t["losses"].double(), want, atol=1e-5, rtol=1e-4)
    lp, _ = sequence_logps(trainer.model, ids, labels)
    torch.testing.assert_close(lp.double(), pol, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("loss_type,smoothing", [("ipo", 0.0), ("sigmoid", 0.1)])
def test_ipo_and_conservative_dpo_train(tmp_path, loss_type, smoothing):
    _, _, rows = _fit("dpo", tmp_path, ["train.steps=3", "eval.every=0", "eval.at_end=false",
                                        "logging.plots=false", f"rlhf.dpo.loss_type={loss_type}",
                                        f"rlhf.dpo.label_smoothing={smoothing}",
                                        "rlhf.moe.router_kl_coef=0.1"])
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert "router_kl" in rows[-1]


def test_ppo_with_a_trained_reward_model(tmp_path):
    """rm -> ppo: the reward model's run directory drives the rollout scores."""
    train = _write(tmp_path / "train.jsonl", corrupted_pairs(200, 0))
    _fit("rm", tmp_path, [f"data.path={train}", "data.eval_split=0.0", "train.steps=3", "eval.every=0",
                          "eval.at_end=false", "logging.plots=false", "checkpoint.at_end=true"])
    trainer, _, rows = _fit("ppo", tmp_path, ["train.steps=2", "eval.every=0", "eval.at_end=false",
                                              "logging.plots=false", f"rlhf.reward_model={tmp_path / 'rm'}",
                                              "rlhf.rollout.prompts_per_step=8"])
    assert trainer.rollout.reward_model is not None
    assert "reward/reward_model" in rows[-1] and len(rows[-1]["layers"]) == 2
    assert len(rows[-1]["layers"][0]["share"]) == 4  # per-layer expert load over the 4 experts
