"""`anymoe train`: the command-line contract, the run directory, resume (bitwise on the CPU),
and resuming a checkpoint written under a forced pow2 expert sizing under the default one."""

import json

import pytest
import yaml

from anymoe.cli import main
from anymoe.trainers.metrics import read_metrics

FAST = {
    "name": "fast",
    "model": {"preset": "tiny", "vocab_size": 259, "d_model": 32, "max_seq_len": 32,
              "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 48,
                      "balance": {"aux_loss": 0.01, "z_loss": 0.001}}},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32, "eval_split": 0.02},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
    "train": {"steps": 8, "micro_batch": 2, "global_batch": 4, "precision": "fp32", "host_threads": 1},
    "logging": {"progress": False, "plots": False, "tensorboard": False},
    "checkpoint": {"every": 4, "keep_last": 3},
    "eval": {"every": 0, "batches": 1},
}


def write_cfg(tmp_path, **sections):
    data = json.loads(json.dumps(FAST))
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_run_dir_contract(tmp_path, capsys):
    cfg = write_cfg(tmp_path, logging={"plots": True, "tensorboard": True})
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--steps", "6", "--seed", "7",
                 "--set", "optim.lr=2e-3"]) == 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 6 and resolved["train"]["seed"] == 7
    assert resolved["optim"]["lr"] == 2e-3 and resolved["backend"] == "auto"
    assert resolved["model"]["moe"]["num_experts"] == 4  # the preset expanded, overrides merged
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("step", "loss", "lr", "tokens_per_s", "grad_norm", "aux_loss", "aux/aux_loss", "aux/z_loss",
                "layers", "mfu", "memory"):
        assert key in rows[0], key
    layer = rows[0]["layers"][0]
    assert len(layer["share"]) == 4 and abs(sum(layer["share"]) - 1) < 1e-9
    assert {"cv", "max_over_mean", "entropy", "dropped"} <= set(layer)
    assert (run / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    assert (run / "checkpoints" / "step_00000006" / "manifest.json").is_file()
    for png in ("loss.png", "lr.png", "expert_load.png"):
        assert (run / png).stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    info = json.loads((run / "run.json").read_text())
    assert info["backend"] == "cpu" and info["steps"] == 6
    assert "eval_loss" in read_metrics(run)[-1]
    out = capsys.readouterr()
    assert "done: 6 steps" in out.out
    # A second start into the same directory without --resume refuses instead of overwriting.
    assert main(["train", str(cfg), "--out", str(run)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_plot_command(tmp_path):
    cfg = write_cfg(tmp_path, checkpoint={"every": 0})
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--steps", "3"]) == 0
    assert not (run / "loss.png").exists()
    assert main(["plot", str(run)]) == 0
    assert (run / "loss.png").is_file() and (run / "expert_load.png").is_file()
    assert main(["plot", str(tmp_path / "nothing")]) == 2


def test_resume_continues_bitwise(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run)]) == 0
    straight = losses(run)
    # Stopped after step 8 with its last checkpoint at step 4: drop the newer checkpoint, resume.
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_00000008")
    assert main(["train", str(cfg), "--out", str(run), "--resume", "--set", "eval.batches=2"]) == 0
    assert "resuming with changed settings: eval.batches 1 -> 2" in capsys.readouterr().err
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 9))  # steps 5-8 re-run, no duplicate lines
    assert resumed == straight  # bitwise: exact float equality of every step


def test_pow2_checkpoint_resumes_under_default_sizing(tmp_path):
    # expert_hidden 48 is stored as 64 under pow2; checkpoints are canonical (48).
    import shutil

    import torch

    cfg = write_cfg(tmp_path)
    ref, mixed = tmp_path / "ref", tmp_path / "mixed"
    assert main(["train", str(cfg), "--out", str(ref)]) == 0
    assert main(["train", str(cfg), "--out", str(mixed), "--sizing", "pow2"]) == 0
    ck = mixed / "checkpoints" / "step_00000004"
    sd = torch.load(ck / "model.pt", weights_only=True)
    w1 = next(v for k, v in sd.items() if k.endswith("experts.w1"))
    assert w1.shape[-1] == 48
    opt = torch.load(ck / "optim.pt", weights_only=True)
    moments = next(v for k, v in opt["state"].items() if k.endswith("experts.w1"))
    assert moments["exp_avg"].shape[-1] == 48
    shutil.rmtree(mixed / "checkpoints" / "step_00000008")
    assert main(["train", str(cfg), "--out", str(mixed), "--resume"]) == 0  # default (identity) sizing
    a, b = losses(ref), losses(mixed)
    assert sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


@pytest.mark.parametrize("precision", ["fp32", "bf16_master"])  # bf16_master: the step queued on the device
def test_nonfinite_steps_skipped_then_stop_with_checkpoint(tmp_path, monkeypatch, capsys, precision):
    cfg = write_cfg(tmp_path, checkpoint={"every": 0}, train={"max_bad_steps": 3, "precision": precision})
    monkeypatch.setenv("ANYMOE_FAULT_NAN_STEPS", "2")  # one bad step: skipped, counted, run goes on
    run = tmp_path / "one"
    assert main(["train", str(cfg), "--out", str(run), "--steps", "4"]) == 0
    rows = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert rows[3]["skipped"] and not rows[4]["skipped"] and rows[4]["bad_steps"] == 1
    monkeypatch.setenv("ANYMOE_FAULT_NAN_STEPS", "2,3,4,5")  # 3 in a row: stop, exit 3
    run = tmp_path / "stop"
    assert main(["train", str(cfg), "--out", str(run), "--steps", "8"]) == 3
    assert "3 consecutive steps had a non-finite loss" in capsys.readouterr().err
    import torch

    from anymoe.trainers.checkpoint import CheckpointManager

    last = CheckpointManager(run / "checkpoints").latest_valid()
    assert last.name == "step_00000005"  # steps 3-5 made no update: these are step 2's weights
    assert all(torch.isfinite(v).all() for v in torch.load(last / "model.pt", weights_only=True).values())


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    cfg = write_cfg(tmp_path, checkpoint={"every": 0})
    curves = {}
    for mode in ("none", "full"):
        run = tmp_path / mode
        assert main(["train", str(cfg), "--out", str(run), "--steps", "3",
                     "--set", f"model.checkpointing={mode}"]) == 0
        curves[mode] = losses(run)
    assert curves["full"] == pytest.approx(curves["none"], rel=1e-6)


def test_export_hf_at_the_end(tmp_path):
    cfg = write_cfg(tmp_path, checkpoint={"every": 0, "export_hf": True})
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--steps", "2"]) == 0
    hf = run / "hf"
    assert (hf / "config.json").is_file() and any(hf.glob("*.safetensors"))
    assert (hf / "anymoe_step.txt").read_text().strip() == "2"


def test_bf16_master_keeps_fp32_masters_and_resumes_bitwise(tmp_path):
    """train.precision: bf16_master: bf16 weights in the model and in model.pt, fp32 masters and
    moments in optim.pt (canonical, unpadded: also resumed under pow2 sizing), each weight its
    master rounded; a resume from step 4 repeats steps 5-8 bit for bit."""
    import shutil

    import torch

    cfg = write_cfg(tmp_path, train={**FAST["train"], "precision": "bf16_master"})
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run)]) == 0
    straight = losses(run)
    assert straight[8] < straight[1]
    ck = run / "checkpoints" / "step_00000004"
    model = torch.load(ck / "model.pt", weights_only=True)
    state = torch.load(ck / "optim.pt", weights_only=True)["state"]
    w1 = next(k for k in model if k.endswith("experts.w1"))
    assert state[w1]["master"].shape[-1] == 48 and model[w1].shape[-1] == 48
    for name, st in state.items():
        assert st["master"].dtype == st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32, name
        assert model[name].dtype == torch.bfloat16, name
        assert torch.equal(model[name], st["master"].to(torch.bfloat16)), name
    info = json.loads((run / "run.json").read_text())
    assert info["precision"] == "bf16_master"
    pow2 = tmp_path / "pow2"
    shutil.copytree(run, pow2)
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    assert main(["train", str(cfg), "--out", str(run), "--resume"]) == 0
    assert losses(run) == straight  # bitwise
    shutil.rmtree(pow2 / "checkpoints" / "step_00000008")
    assert main(["train", str(cfg), "--out", str(pow2), "--resume", "--sizing", "pow2"]) == 0
    for step, loss in losses(pow2).items():
        assert loss == pytest.approx(straight[step], rel=2e-2), step


def test_bf16_moments_train_resume_bitwise_and_stay_bf16(tmp_path, capsys):
    """optim.moment_dtype: bf16 under bf16_master: bf16 moments in optim.pt, fp32 masters; the loss
    falls, a resume repeats the steps bit for bit, and the curve stays near the fp32-moment one.
    Without bf16_master the setting is refused naming the field, before any work."""
    import shutil

    import torch

    curves = {}
    for moments in ("fp32", "bf16"):
        cfg = write_cfg(tmp_path, train={**FAST["train"], "precision": "bf16_master"},
                        optim={"moment_dtype": moments})
        run = tmp_path / moments
        assert main(["train", str(cfg), "--out", str(run)]) == 0
        curves[moments] = losses(run)
    bf16 = curves["bf16"]
    assert bf16[8] < bf16[1] and bf16 != curves["fp32"]
    for step, loss in bf16.items():
        assert loss == pytest.approx(curves["fp32"][step], rel=2e-2), step
    state = torch.load(tmp_path / "bf16" / "checkpoints" / "step_00000004" / "optim.pt", weights_only=True)
    for name, st in state["state"].items():
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16, name
        assert st["master"].dtype == torch.float32, name
    shutil.rmtree(tmp_path / "bf16" / "checkpoints" / "step_00000008")
    assert main(["train", str(cfg), "--out", str(tmp_path / "bf16"), "--resume"]) == 0
    assert losses(tmp_path / "bf16") == bf16  # bitwise
    cfg = write_cfg(tmp_path, optim={"moment_dtype": "bf16"})
    assert main(["train", str(cfg), "--out", str(tmp_path / "refused")]) == 2
    assert "optim.moment_dtype" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_bf16_master_refused_with_deepspeed(tmp_path, capsys):
    cfg = write_cfg(tmp_path, train={**FAST["train"], "precision": "bf16_master"}, engine="deepspeed")
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "train.precision" in capsys.readouterr().err


def test_plots_of_a_one_step_run_warn_nothing(tmp_path):
    """The expert-load heat map spans half a step each side of every step: a run of one step
    draws without matplotlib's 'identical low and high xlims' warning."""
    import warnings

    from anymoe.trainers.plots import write_plots

    cfg = write_cfg(tmp_path, checkpoint={"every": 0})
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--steps", "1"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = write_plots(run)
    assert (run / "expert_load.png") in written
