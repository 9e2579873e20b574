"""2-process DP and DP x EP runs (gloo, real processes via torchrun) match the single-process
loss curve for the same global batch (fp32, <= 1e-5 relative): issue 6."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anymoe.trainers.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CFG = {
    "name": "mp",
    "model": {"preset": "tiny", "vocab_size": 259, "d_model": 32, "max_seq_len": 32,
              "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32,
                      "balance": {"aux_loss": 0.01, "z_loss": 0.001}}},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32, "eval_split": 0.02},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
    "train": {"steps": 4, "micro_batch": 2, "global_batch": 8, "precision": "fp32", "host_threads": 1},
    "logging": {"progress": False, "plots": False, "tensorboard": False},
    "checkpoint": {"every": 2},
    "eval": {"batches": 1},
}


def train(tmp_path, name, *args):
    """--nproc runs start real processes under torchrun; one-process runs stay in this process."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    run = tmp_path / name
    if "--nproc" in args:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "anymoe", "train", str(cfg), "--out", str(run), *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        if proc.returncode != 0 and "exitcode: -6" in proc.stderr:
            # Seen about once in 15 runs on a loaded 2-core host before shutdown() waited for every
            # rank (a rank closing its gloo connections while a peer still read them made the
            # peer abort; 10 of 10 loaded reruns passed after the fix). Kept as a guard: retry
            # once from scratch and show the first failure, so the numbers below are still
            # checked on a complete run.
            print("first torchrun attempt aborted; retrying:\n" + proc.stderr[-3000:], file=sys.stderr)
            shutil.rmtree(run, ignore_errors=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        from anymoe.cli import main

        assert main(["train", str(cfg), "--out", str(run), *args]) == 0
    rows = read_metrics(run)
    return {r["step"]: r for r in rows if "loss" in r}, rows[-1]


@pytest.mark.multiproc
def test_dp2_and_dp_x_ep_match_single_process(tmp_path):
    single, single_end = train(tmp_path, "dp1")
    dp2, dp2_end = train(tmp_path, "dp2", "--nproc", "2")
    ep2, ep2_end = train(tmp_path, "ep2", "--nproc", "2", "--set", "parallel.ep=2")
    assert sorted(single) == sorted(dp2) == sorted(ep2) == [1, 2, 3, 4]
    for step, row in single.items():
        for other in (dp2, ep2):
            assert other[step]["loss"] == pytest.approx(row["loss"], rel=1e-5), step
            assert other[step]["grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-4), step
            assert other[step]["aux/aux_loss"] == pytest.approx(row["aux/aux_loss"], rel=1e-5), step
            for la, lb in zip(row["layers"], other[step]["layers"]):
                assert lb["share"] == pytest.approx(la["share"], abs=1e-12)  # same routing, same loads
        # every rank's statistics, not rank 0's: the aux loss and router entropy are means over all
        # micro-batches of the global batch, as in one process
        assert dp2[step]["aux_loss"] == pytest.approx(row["aux_loss"], rel=1e-5), step
        for la, lb in zip(row["layers"], dp2[step]["layers"]):
            assert lb["entropy"] == pytest.approx(la["entropy"], rel=1e-6)
            assert lb["dropped"] == la["dropped"]
    for end in (dp2_end, ep2_end):
        assert end["eval_loss"] == pytest.approx(single_end["eval_loss"], rel=1e-5)
    meta = json.loads((tmp_path / "ep2" / "run.json").read_text())
    assert meta["world_size"] == 2 and meta["ep"] == 2

    # The EP=2 checkpoint is canonical (all experts in one file): a single process resumes it.
    shutil.rmtree(tmp_path / "ep2" / "checkpoints" / "step_00000004")
    resumed, _ = train(tmp_path, "ep2", "--resume")
    for step, row in single.items():
        assert resumed[step]["loss"] == pytest.approx(row["loss"], rel=1e-5), step


@pytest.mark.multiproc
def test_dp2_bf16_master_queued_step_skips_a_bad_step_on_every_rank(tmp_path, monkeypatch):
    """bf16_master queues TritonAdamW's step before the host read (anymoe/trainers/pretrain.py): the
    skip decision is taken on the device from the all-reduced gradients and the DP-summed loss, so
    both ranks skip the poisoned step and the DP=2 run follows the one-process run (bf16 gradients
    summed in another order: 1e-5 apart in the loss, 1e-3 in the grad norm, when written)."""
    monkeypatch.setenv("ANYMOE_FAULT_NAN_STEPS", "1")
    args = ("--set", "train.precision=bf16_master", "--set", "checkpoint.every=0")
    single, _ = train(tmp_path, "dp1", *args)
    dp2, _ = train(tmp_path, "dp2", "--nproc", "2", *args)
    assert [step for step, row in dp2.items() if row.get("skipped")] == [2]
    assert [step for step, row in single.items() if row.get("skipped")] == [2]
    for step in (1, 3, 4):
        assert dp2[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-4), step
        assert dp2[step]["grad_norm"] == pytest.approx(single[step]["grad_norm"], rel=1e-2), step
