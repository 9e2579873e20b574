"""`anymoe train` on an accelerator (CUDA: marked gpu, Ascend: marked npu; skipped with the
reason where the backend is not usable). The same file as on the CPU: the loss falls, MFU is
reported (the backend knows its peak FLOP/s), and in fp32 the first steps match the CPU run."""

import json

import pytest
import yaml

from anymoe.core.backend import probe_backends
from anymoe.trainers.metrics import read_metrics

CFG = {
    "name": "device",
    "model": {"preset": "tiny", "vocab_size": 259},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 64, "eval_split": 0.02},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5},
    "train": {"steps": 30, "micro_batch": 8, "global_batch": 16},
    "logging": {"progress": False, "plots": False, "tensorboard": False},
    "eval": {"batches": 1},
}
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("npu", marks=pytest.mark.npu)]


def _usable(name):
    status = probe_backends().get(name)
    if status is None or not status.ok:
        pytest.skip(f"backend {name!r} not usable here: {status.reason if status else 'not registered'}")


def _run(tmp_path, name, backend, *extra):
    from anymoe.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    run = tmp_path / name
    assert main(["train", str(cfg), "--out", str(run), "--backend", backend, *extra]) == 0
    return run


@pytest.mark.parametrize("backend", DEVICES)
def test_loss_falls_with_mixed_precision(tmp_path, backend):
    _usable(backend)
    run = _run(tmp_path, backend, backend)
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert rows[-1]["mfu"] is not None and rows[-1]["mfu"] > 0
    assert json.loads((run / "run.json").read_text())["precision"] == "bfloat16"


@pytest.mark.parametrize("backend", DEVICES)
def test_bf16_master_trains_close_to_autocast(tmp_path, backend):
    """bf16 weights with fp32 masters in the optimizer (on CUDA the AdamW kernel writes both):
    the loss falls as under autocast over fp32 weights, step by step within bf16 noise."""
    _usable(backend)
    auto = {r["step"]: r["loss"] for r in read_metrics(_run(tmp_path, "auto", backend)) if "loss" in r}
    run = _run(tmp_path, "master", backend, "--set", "train.precision=bf16_master")
    master = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert master[max(master)] < master[1] - 1.0
    for step, loss in auto.items():
        assert master[step] == pytest.approx(loss, rel=0.1), step
    assert json.loads((run / "run.json").read_text())["precision"] == "bf16_master"


@pytest.mark.parametrize("backend", DEVICES)
def test_fp32_matches_the_cpu(tmp_path, backend):
    _usable(backend)
    args = ("--steps", "5", "--set", "train.precision=fp32")
    cpu = {r["step"]: r["loss"] for r in read_metrics(_run(tmp_path, "cpu", "cpu", *args)) if "loss" in r}
    dev = {r["step"]: r["loss"] for r in read_metrics(_run(tmp_path, backend, backend, *args)) if "loss" in r}
    for step, loss in cpu.items():
        assert dev[step] == pytest.approx(loss, rel=1e-3), step  # fp32 kernels differ in summation order


@pytest.mark.multiproc
@pytest.mark.parametrize("backend", DEVICES)
def test_two_devices_data_parallel_match_one(tmp_path, backend):
    """`--nproc 2` over NCCL / HCCL: the loss, gradient norm and every rank's statistics (reduced on
    the device before the step's host read) equal one device's with twice the micro-batches."""
    from anymoe.core.backend import get_backend

    _usable(backend)
    if get_backend(backend).device_count() < 2:
        pytest.skip(f"needs 2 {backend} devices, {get_backend(backend).device_count()} visible")
    args = ("--steps", "6", "--set", "train.precision=fp32", "--set", "train.deterministic=true")
    one = {r["step"]: r for r in read_metrics(_run(tmp_path, "one", backend, *args)) if "loss" in r}
    two = {r["step"]: r for r in read_metrics(_run(tmp_path, "two", backend, "--nproc", "2", *args))
           if "loss" in r}
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step, a in one.items():
        b = two[step]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), step
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), step
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-4), step
        for la, lb in zip(a["layers"], b["layers"]):
            assert lb["share"] == pytest.approx(la["share"], abs=1e-3)
            assert lb["entropy"] == pytest.approx(la["entropy"], rel=1e-4)
