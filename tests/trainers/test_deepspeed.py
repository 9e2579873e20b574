"""engine: deepspeed. Fast: the generated DeepSpeed config, JSON merging and its refusals,
ZeRO-3 refused for MoE, expert parameters in DeepSpeed's moe optimizer groups. Slow (real
torchrun processes, DeepSpeed on the CPU with gloo): ZeRO-2 with EP=2 gives the native loop's
loss and grad-norm curve (fp32, rel 1e-6), resumes from its own checkpoint on the same curve,
ZeRO-1 with DP=2 too, a bf16 run trains, and fine-tuning with frozen MoE layers (no moe
optimizer group) matches the native loop."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from anymoe.core.config import ConfigError
from anymoe.trainers.config import config_from_data
from anymoe.trainers.deepspeed_engine import DeepSpeedConfig, ds_config
from anymoe.trainers.metrics import read_metrics

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[2]
CFG = {
    "name": "ds",
    "model": {"preset": "tiny", "vocab_size": 259, "d_model": 32, "max_seq_len": 32,
              "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32}},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32, "eval_split": 0.02},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "grad_clip": 1.0},
    "train": {"steps": 4, "micro_batch": 2, "global_batch": 8, "precision": "fp32"},
    "logging": {"progress": False, "plots": False, "tensorboard": False},
    "checkpoint": {"every": 2},
    "eval": {"batches": 1},
}


def test_generated_config_and_json_merge(tmp_path):
    cfg = ds_config(DeepSpeedConfig(zero_stage=1), micro_batch=2, accum=3, world_size=4, grad_clip=0.5,
                    bf16=True)
    assert cfg["train_batch_size"] == 24 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["bf16"]["enabled"]
    assert cfg["gradient_clipping"] == 0.5
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "train_batch_size": 24}))
    merged = ds_config(DeepSpeedConfig(config=str(extra)), 2, 3, 4, 1.0, True)
    assert merged["zero_optimization"]["overlap_comm"] and merged["zero_optimization"]["stage"] == 2
    for bad, match in (({"train_batch_size": 32}, "train_batch_size"),
                       ({"optimizer": {"type": "Adam"}}, "optim"),
                       ({"bf16": {"enabled": False}}, "train.precision"),
                       ({"tensor_parallel": {"autotp_size": 2}}, "AutoTP")):
        extra.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match="deepspeed.config") as err:
            ds_config(DeepSpeedConfig(config=str(extra)), 2, 3, 4, 1.0, True)
        assert match in str(err.value)
    with pytest.raises(ConfigError, match="deepspeed.config.*does not exist"):
        ds_config(DeepSpeedConfig(config=str(tmp_path / "missing.json")), 2, 3, 4, 1.0, True)


def test_zero3_is_refused_for_moe_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="deepspeed.zero_stage.*AutoEP"):
        config_from_data({**CFG, "engine": "deepspeed", "deepspeed": {"zero_stage": 3}})
    stage3 = tmp_path / "z3.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        config_from_data({**CFG, "engine": "deepspeed", "deepspeed": {"config": str(stage3)}})
    with pytest.raises(ConfigError, match="engine"):
        config_from_data({**CFG, "engine": "megatron"})


def test_expert_parameters_go_to_deepspeed_moe_groups():
    pytest.importorskip("deepspeed")
    from deepspeed.moe.utils import is_moe_param

    from anymoe.models import MoETransformer, preset
    from anymoe.trainers.deepspeed_engine import group_name, mark_expert_parameters, optimizer_groups

    model = MoETransformer(preset("tiny"))
    name = group_name(2)
    assert mark_expert_parameters(model, name) == 2 * 3  # 2 MoE layers x (w1, w3, w2)
    groups = optimizer_groups(model, weight_decay=0.1)
    moe = [g for g in groups if g.get("moe")]
    dense = [g for g in groups if not g.get("moe")]
    expert_ids = {id(p) for n, p in model.named_parameters() if ".ffn.experts." in n}
    assert {id(p) for g in moe for p in g["params"]} == expert_ids
    assert all(g["name"] == name and all(is_moe_param(p) for p in g["params"]) for g in moe)
    assert not any(is_moe_param(p) for g in dense for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {g["weight_decay"] for g in moe} == {0.1}  # stacked expert weights are decayed like matrices


# ------------------------------------------------------------------------- real runs (slow)
def _train(tmp_path, name, *args, resume=False, overrides=()):
    pytest.importorskip("deepspeed")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    run = tmp_path / name
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "anymoe", "train", str(cfg), "--out", str(run), *args]
    for item in overrides:
        cmd += ["--set", item]
    if resume:
        cmd.append("--resume")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {r["step"]: r for r in read_metrics(run) if "loss" in r}


def _same_curve(a, b, rel=1e-6):
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=rel), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=100 * rel), step


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(1500)
def test_zero2_ep2_matches_native_loop_and_resumes(tmp_path):
    native = _train(tmp_path, "native")
    zero2 = _train(tmp_path, "zero2_ep2", "--nproc", "2", overrides=["engine=deepspeed", "parallel.ep=2"])
    _same_curve(native, zero2)
    assert max(r["grad_norm"] for r in native.values()) > CFG["optim"]["grad_clip"]  # clipping was exercised
    files = sorted(p.name for p in (tmp_path / "zero2_ep2" / "checkpoints" / "step_00000002").iterdir())
    assert "zero_rank00000.pt" in files and "zero_rank00001.pt" in files and "model.pt" in files
    # The canonical model.pt holds all 4 experts: the native loop (one process) can load it.
    last = tmp_path / "zero2_ep2" / "checkpoints" / "step_00000004"
    state = torch.load(last / "model.pt", weights_only=True)
    assert state["blocks.0.ffn.experts.w1"].shape[0] == 4
    # Resume through the engine from step 2: the same curve as the uninterrupted run.
    shutil.rmtree(last)
    resumed = _train(tmp_path, "zero2_ep2", "--nproc", "2", resume=True,
                     overrides=["engine=deepspeed", "parallel.ep=2"])
    _same_curve(native, resumed)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(1500)
def test_zero1_dp2_matches_bf16_trains_and_frozen_experts_match(tmp_path):
    native = _train(tmp_path, "native")
    zero1 = _train(tmp_path, "zero1_dp2", "--nproc", "2",
                   overrides=["engine=deepspeed", "deepspeed.zero_stage=1"])
    _same_curve(native, zero1)
    bf16 = _train(tmp_path, "bf16", overrides=["engine=deepspeed", "train.precision=bf16"])
    losses = [bf16[s]["loss"] for s in sorted(bf16)]
    assert all(v == v for v in losses) and losses[-1] < losses[0]
    # bf16 weights with fp32 master copies: the curve stays near the fp32 one.
    assert bf16[4]["loss"] == pytest.approx(native[4]["loss"], rel=2e-2)
    # Fine-tuning with every MoE layer frozen: no moe optimizer group (plain ZeRO), same curve.
    frozen = ["finetune.mode=non_moe_only"]
    _same_curve(_train(tmp_path, "ft_native", overrides=frozen),
                _train(tmp_path, "ft_ds", overrides=["engine=deepspeed", *frozen]))
