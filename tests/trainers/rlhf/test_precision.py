"""`train.precision` in the RLHF trainers: autocast around every forward and generation, not the
backward; bf16_master refused with the field named."""

import json

import pytest
import torch

from anymoe.cli import main
from anymoe.core.config import ConfigError
from anymoe.models.transformer import MoETransformer
from anymoe.trainers.rlhf.config import load_rlhf_config
from anymoe.trainers.rlhf.model_io import forward_precision, forward_rl, generate_rl

FAST = ["--set", "logging.progress=false", "--set", "logging.plots=false", "--set", "eval.every=0",
        "--set", "eval.at_end=false", "--set", "checkpoint.at_end=false"]


def _model() -> MoETransformer:
    cfg = load_rlhf_config("configs/rlhf/grpo_addition.yaml", "grpo").model
    torch.manual_seed(0)
    return MoETransformer(cfg)


def test_forwards_and_generation_run_under_the_precision_block_only():
    model, ids = _model(), torch.randint(0, 200, (2, 6))
    assert forward_rl(model, ids).logits_BLV.dtype == torch.float32
    with forward_precision("cpu", torch.bfloat16):
        out = forward_rl(model, ids)
        gen = generate_rl(model, ids, 3, eos_id=258, pad_id=0, temperature=0.0)
    assert out.logits_BLV.dtype == torch.bfloat16
    assert out.logits_BLV.requires_grad  # the backward runs outside, through autocast's casts
    out.logits_BLV.float().logsumexp(-1).sum().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert gen.tokens_BR.shape == (2, 3)
    with forward_precision("cpu", None):
        assert forward_rl(model, ids).logits_BLV.dtype == torch.float32


def test_grpo_under_bf16_autocast_trains_with_exact_first_ratio(tmp_path):
    rows = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        code = main(["rlhf", "grpo", "configs/rlhf/grpo_addition.yaml", "--out", str(out), "--steps", "2",
                     *FAST, "--set", f"train.precision={precision}"])
        assert code == 0
        rows[precision] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bf16 = rows["bf16"]
    # old log-probs come from the same autocast forward on the same micro-batches: ratio exactly 1
    assert bf16[0]["first_ratio_max_dev"] == 0.0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16 if "loss" in r)
    # the rollouts differ from fp32's: autocast really ran (same seeds otherwise)
    assert any(a.get("rollout_train_logp_gap") != b.get("rollout_train_logp_gap") or a["loss"] != b["loss"]
               for a, b in zip(rows["fp32"], bf16) if "loss" in a)


def test_bf16_master_is_refused_naming_the_field():
    with pytest.raises(ConfigError) as err:
        load_rlhf_config("configs/rlhf/dpo_addition.yaml", "dpo", ["train.precision=bf16_master"])
    assert err.value.field == "train.precision"
