"""The loop skeleton with a real (small) model: resume, bad steps, spikes, hooks, corruption."""

import json

import pytest
from trainer_toy import ToyTrainer

from anymoe.trainers.loop import LoopSettings, TrainingStopped
from anymoe.trainers.metrics import read_metrics


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def settings(**kw):
    base = dict(total_steps=12, checkpoint_every=4, keep_last=2, progress=False, tensorboard=False)
    base.update(kw)
    return LoopSettings(**base)


def test_straight_run_logs_every_step_and_keeps_last_n(tmp_path):
    t = ToyTrainer(tmp_path, settings())
    t.fit()
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 13))
    assert curve[12] < curve[1]
    names = [p.name for p in t.ckpt.finished()]
    assert names == ["step_00000008", "step_00000012"]


def test_resume_is_bitwise(tmp_path):
    ToyTrainer(tmp_path / "a", settings()).fit()
    # Stop after 6 steps (checkpoint at 4), then resume: steps 5.. replay exactly.
    ToyTrainer(tmp_path / "b", settings(total_steps=6, checkpoint_at_end=False)).fit()
    ToyTrainer(tmp_path / "b", settings(resume=True)).fit()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 13))  # lines after the checkpoint were dropped, no duplicates
    assert a == b  # exact float equality


def test_nonfinite_step_skipped_and_counted(tmp_path):
    t = ToyTrainer(tmp_path, settings(), poison_steps={3, 7})
    t.fit()
    rows = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    assert rows[4]["skipped"] and rows[8]["skipped"]
    assert rows[12]["bad_steps"] == 2
    assert t.bad_steps == 2


def test_consecutive_bad_steps_stop_with_checkpoint(tmp_path):
    t = ToyTrainer(tmp_path, settings(max_bad_steps=3), poison_steps={5, 6, 7, 8})
    with pytest.raises(TrainingStopped, match="3 consecutive steps"):
        t.fit()
    last = t.ckpt.latest_valid()
    assert last is not None and last.name == "step_00000008"
    # The saved weights are the ones after step 5 (steps 6-8 made no update).
    import torch
    sd = t.ckpt.load(last, "model.pt")
    assert all(torch.equal(sd[k], v) for k, v in t.model.state_dict().items())


def test_spike_rolls_back_and_skips_data(tmp_path):
    t = ToyTrainer(tmp_path, settings(spike_factor=3.0, spike_window=3), spike_steps={9})
    t.fit()
    assert t.rollbacks == 1
    assert t.cursor > 12 * 64  # the batches between checkpoint and spike were skipped, not replayed


def test_corrupt_newest_checkpoint_falls_back(tmp_path, capsys):
    t = ToyTrainer(tmp_path, settings())
    t.fit()
    newest = t.ckpt.finished()[-1]
    with open(newest / "model.pt", "r+b") as fh:  # flip bytes in the middle
        fh.seek(100)
        fh.write(b"\xff\xff\xff\xff")
    assert "corrupted" in t.ckpt.verify(newest)
    assert t.ckpt.latest_valid().name == "step_00000008"
    assert "step_00000012 is not usable" in capsys.readouterr().err


def test_truncated_checkpoint_detected(tmp_path):
    t = ToyTrainer(tmp_path, settings())
    t.fit()
    newest = t.ckpt.finished()[-1]
    data = (newest / "optim.pt").read_bytes()
    (newest / "optim.pt").write_bytes(data[: len(data) // 2])
    assert "truncated" in t.ckpt.verify(newest)
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["step"] == 12


def test_hooks_and_eval(tmp_path):
    seen = []
    t = ToyTrainer(tmp_path, settings(eval_every=6))
    t.add_hook("after_eval", lambda tr, info: seen.append(info["step"]))
    t.fit()
    assert seen == [6, 12]
    rows = [r for r in read_metrics(tmp_path) if "eval_loss" in r]
    assert [r["step"] for r in rows] == [6, 12]
    with pytest.raises(ValueError, match="unknown hook"):
        t.add_hook("before_lunch", lambda *a: None)


def test_tokens_per_s_counts_the_whole_iteration(tmp_path):
    """tokens_per_s is over the time since the previous step finished, so what the loop does between
    steps (here a slow after_step hook; really: logging, evaluation, checkpoints) counts;
    step_time_s is train_step alone."""
    import time

    t = ToyTrainer(tmp_path, settings(total_steps=4, checkpoint_every=0))
    t.add_hook("after_step", lambda trainer, row: time.sleep(0.2))
    t.fit()
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    for row in rows:
        assert row["interval_s"] >= row["step_time_s"]
        assert row["tokens_per_s"] * row["interval_s"] == pytest.approx(64)  # the toy's tokens a step
    for row in rows[1:]:  # the previous step's hook slept 0.2 s
        assert row["interval_s"] >= row["step_time_s"] + 0.2
