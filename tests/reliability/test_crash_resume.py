"""Crashes lose nothing (issue 10), with real processes and files:

- SIGKILL at a random step, then `anymoe train --resume`: the loss curve continues bitwise;
- SIGKILL while a checkpoint is being written: the previous one is intact and used;
- a corrupted and a truncated checkpoint are detected (manifest checksums) and skipped;
- a 2-process run with one rank killed is restarted by torchrun's elastic agent and resumes
  from the last checkpoint with the same curve;
- an unwritable or full output directory fails before training starts.
"""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anymoe.trainers.checkpoint import CheckpointManager
from anymoe.trainers.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CFG = {
    "name": "crash",
    "model": {"preset": "tiny", "vocab_size": 259, "d_model": 32, "max_seq_len": 32,
              "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32,
                      "balance": {"aux_loss": 0.01, "z_loss": 0.001}}},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32, "eval_split": 0.02},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
    "train": {"steps": 8, "micro_batch": 2, "global_batch": 4, "precision": "fp32", "host_threads": 1},
    "logging": {"progress": False, "plots": False, "tensorboard": False},
    "checkpoint": {"every": 2, "keep_last": 3},
    "eval": {"batches": 1, "at_end": False},
}
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}


def cmd(cfg, run, *args):
    return [sys.executable, "-m", "anymoe", "train", str(cfg), "--out", str(run), *args]


def train_here(cfg, run, *args, expect=0, capsys=None):
    """The same command in this process (no process start-up cost) when no kill is involved."""
    from anymoe.cli import main

    assert main(["train", str(cfg), "--out", str(run), *args]) == expect


def train(cfg, run, *args, env=None, expect=0):
    proc = subprocess.run(cmd(cfg, run, *args), env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def curve(run):
    rows = [r for r in read_metrics(run) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate step lines: {steps}"
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "crash.yaml"
    path.write_text(yaml.safe_dump(CFG))
    return path


@pytest.fixture(scope="module")
def reference(cfg_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    train_here(cfg_path, run)
    return curve(run)


def test_sigkill_at_random_step_then_resume_is_bitwise(cfg_path, reference, tmp_path):
    # The process SIGKILLs itself after step k (ANYMOE_FAULT_KILL): a kill sent from here once
    # raced the run on a loaded 2-core host (the poller missed step k before the last step).
    k = random.Random().randint(3, 7)
    run = tmp_path / "run"
    proc = subprocess.run(cmd(cfg_path, run), env={**ENV, "ANYMOE_FAULT_KILL": f"0:{k}"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert len([r for r in read_metrics(run) if "loss" in r]) == k
    out = train(cfg_path, run, "--resume")
    assert "resumed from" in out.stderr
    assert curve(run) == reference, f"killed after step {k}"


def test_sigkill_during_checkpoint_write_keeps_previous(cfg_path, reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(cmd(cfg_path, run), env={**ENV, "ANYMOE_FAULT_PAUSE_IN_CHECKPOINT": "6:60"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("checkpoint-write-paused step=6"):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    ckpts = run / "checkpoints"
    assert (ckpts / ".tmp-step_00000006").is_dir()  # the half-written one, never read
    assert [p.name for p in CheckpointManager(ckpts).finished()] == ["step_00000002", "step_00000004"]
    assert CheckpointManager(ckpts).latest_valid().name == "step_00000004"
    out = train(cfg_path, run, "--resume")
    assert "step_00000004 (step 4)" in out.stderr
    assert curve(run) == reference
    assert not (ckpts / ".tmp-step_00000006").exists()


def test_corrupt_and_truncated_checkpoints_fall_back(cfg_path, reference, tmp_path, capsys):
    run = tmp_path / "run"
    train_here(cfg_path, run)
    ckpts = run / "checkpoints"
    assert [p.name for p in CheckpointManager(ckpts).finished()] == [
        "step_00000004", "step_00000006", "step_00000008"]
    newest = ckpts / "step_00000008" / "model.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern: same size, wrong checksum
    newest.write_bytes(bytes(data))
    optim = ckpts / "step_00000006" / "optim.pt"
    optim.write_bytes(optim.read_bytes()[:100])  # truncated
    capsys.readouterr()
    train_here(cfg_path, run, "--resume")
    err = capsys.readouterr().err
    assert "step_00000008 is not usable" in err and "corrupted" in err
    assert "step_00000006 is not usable" in err and "truncated" in err
    assert "step_00000004 (step 4)" in err
    assert curve(run) == reference


@pytest.mark.multiproc
def test_elastic_restart_after_rank_killed(cfg_path, reference, tmp_path):
    run = tmp_path / "run"
    # Rank 1 SIGKILLs itself after step 5 on the first attempt; torchrun restarts both ranks,
    # which resume from step 4 (the last checkpoint) on their own.
    out = train(cfg_path, run, "--nproc", "2", "--max-restarts", "1", env={"ANYMOE_FAULT_KILL": "1:5"})
    assert "resumed from" in out.stderr, out.stderr[-2000:]
    got = curve(run)
    assert sorted(got) == sorted(reference)
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


def test_unwritable_out_dir_fails_before_training(cfg_path, tmp_path, capsys):
    from anymoe.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for out in (blocker / "run", Path("/proc/anymoe-run")):
        assert main(["train", str(cfg_path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "cannot create the output directory" in err and "pass a writable --out" in err, err


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=20)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {err}")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20)


def test_full_disk_fails_before_training(cfg_path, small_disk, capsys):
    from anymoe.cli import main

    run = small_disk / "run"
    assert main(["train", str(cfg_path), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "free space or pass another --out" in err, err
    assert not (run / "metrics.jsonl").exists()


def test_disk_full_mid_save_keeps_previous(small_disk):
    import torch

    mgr = CheckpointManager(small_disk / "ck", keep_last=3)
    mgr.save(1, {"model.pt": {"w": torch.zeros(1000)}})
    from anymoe.trainers.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="previous checkpoint is intact"):
        mgr.save(2, {"model.pt": {"w": torch.zeros(200_000)}})  # 800 KB on a 256 KB disk
    assert mgr.latest_valid().name == "step_00000001"
