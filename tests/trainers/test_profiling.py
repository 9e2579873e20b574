"""`profile:` (anymoe/trainers/profiling.py): a real trainer run records the configured steps with
torch's profiler and writes a trace, an op table and a summary whose phases and step times come
from that run; the window is checked before work; a resume past it records nothing."""

import gzip
import json
import random

import pytest
import torch

from anymoe.core.backend import get_backend, probe_backends
from anymoe.core.config import ConfigError
from anymoe.trainers.config import config_from_data
from anymoe.trainers.pretrain import PretrainTrainer
from anymoe.trainers.profiling import ProfileConfig, StepProfiler, _union_ms, step_profiler

CFG = {
    "name": "prof",
    "model": {"preset": "tiny", "vocab_size": 259, "d_model": 32, "max_seq_len": 32,
              "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 48}},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32, "eval_split": 0.02},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "train": {"steps": 5, "micro_batch": 2, "global_batch": 4, "host_threads": 1},
    "logging": {"progress": False, "plots": False, "tensorboard": False},
    "checkpoint": {"every": 0, "at_end": False},
    "eval": {"every": 0, "at_end": False},
    "profile": {"enabled": True, "start_step": 3, "steps": 2},
}
PHASES = {"data", "forward", "backward", "grad_sync_norm", "optimizer", "host_read", "statistics"}


def _run(tmp_path, backend="cpu", **profile):
    status = probe_backends().get(backend)
    if not status.ok:
        pytest.skip(f"backend {backend!r} not usable here: {status.reason}")
    data = {**CFG, "profile": {**CFG["profile"], **profile}}
    trainer = PretrainTrainer(config_from_data(data), tmp_path / "run", get_backend(backend))
    messages = []
    trainer.message = messages.append
    trainer.fit()
    return tmp_path / "run" / "profile", messages


def test_union_of_intervals_against_a_grid():
    rng = random.Random(0)
    for _ in range(50):
        starts = [rng.randint(0, 200) for _ in range(rng.randint(0, 12))]
        spans = [(a, a + rng.randint(0, 30)) for a in starts]
        covered = {t for a, b in spans for t in range(a, b)}  # unit cells [t, t+1)
        assert _union_ms([(float(a), float(b)) for a, b in spans]) == pytest.approx(len(covered) / 1e3)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_profiled_run_writes_trace_table_and_summary(tmp_path, backend):
    out, messages = _run(tmp_path, backend)
    summary = json.loads((out / "summary_rank0.json").read_text())
    assert summary["steps"] == [3, 4] and len(summary["step_ms"]) == 2
    assert all(ms > 0 for ms in summary["step_ms"])
    assert set(summary["phases"]) == PHASES
    assert summary["phases"]["forward"]["calls_per_step"] == 2  # two micro-batches a step
    for name in ("forward", "backward", "optimizer"):
        assert summary["phases"][name]["host_ms"] > 0
    # the phases run inside the step: their host time cannot exceed it
    assert sum(p["host_ms"] for p in summary["phases"].values()) <= max(summary["step_ms"]) * 2
    names = {op["name"] for op in summary["top_ops"]}
    assert any(n.startswith("aten::") for n in names)
    trace = json.loads(gzip.decompress((out / "trace_rank0.json.gz").read_bytes()))
    events = [e.get("name", "") for e in trace["traceEvents"] if e.get("cat") != "gpu_user_annotation"]
    assert sum(n.startswith("ProfilerStep#") for n in events) == 2
    assert "anymoe/forward" in events and "anymoe/optimizer" in events
    assert "Name" in (out / "ops_rank0.txt").read_text()
    assert any("profile of steps 3-4 written" in m for m in messages)
    if backend == "cuda":  # the device's kernels are in: busy time, the forward's span, kernel times
        assert 0 < summary["device_busy_ms_per_step"] <= summary["wall_ms_per_step"]
        assert summary["phases"]["forward"]["device_span_ms"] > 0
        assert summary["top_ops"][0]["self_device_ms"] > 0


def test_window_outside_the_run_is_refused_before_work(tmp_path):
    data = {**CFG, "profile": {"enabled": True, "start_step": 5, "steps": 2}}
    with pytest.raises(ConfigError, match="profile.start_step") as err:
        config_from_data(data)
    assert "5-6" in str(err.value) and "train.steps" in str(err.value)
    config_from_data({**data, "profile": {"enabled": False, "start_step": 5, "steps": 2}})  # off: no check


def test_resume_past_the_window_and_other_ranks_record_nothing(tmp_path):
    cfg = ProfileConfig(enabled=True, start_step=3, steps=2)
    log = []
    backend = get_backend("cpu")
    assert step_profiler(cfg, backend, tmp_path, rank=0, done_steps=3, log=log.append) is None
    assert "taken before this resume" in log[0]
    assert step_profiler(cfg, backend, tmp_path, rank=1, done_steps=0, log=log.append) is None
    assert step_profiler(ProfileConfig(), backend, tmp_path, rank=0, done_steps=0, log=log.append) is None
    prof = step_profiler(ProfileConfig(enabled=True, start_step=3, steps=2, all_ranks=True), backend,
                         tmp_path, rank=1, done_steps=2, log=log.append)  # resumed right before: no warm-up
    assert prof is not None
    for _ in range(2):
        torch.randn(64, 64) @ torch.randn(64, 64)
        prof.step()
    summary = json.loads((tmp_path / "profile" / "summary_rank1.json").read_text())
    assert summary["steps"] == [3, 4] and len(summary["step_ms"]) == 2


def test_a_run_that_stops_inside_the_window_writes_what_it_recorded(tmp_path):
    prof = StepProfiler(ProfileConfig(enabled=True, start_step=2, steps=3), get_backend("cpu"), tmp_path,
                        rank=0, done_steps=0, log=lambda _: None)
    for _ in range(3):  # warm-up step 1, recorded steps 2 and 3; step 4 never comes
        torch.randn(32, 32).sum()
        prof.step()
    prof.close()
    summary = json.loads((tmp_path / "profile" / "summary_rank0.json").read_text())
    assert summary["steps"] == [2, 3] and len(summary["step_ms"]) == 2


def test_rlhf_runs_profile_their_phases(tmp_path):
    from anymoe.cli import main

    out = tmp_path / "grpo"
    code = main(["rlhf", "grpo", "configs/rlhf/grpo_addition.yaml", "--out", str(out), "--steps", "3",
                 "--set", "logging.progress=false", "--set", "logging.plots=false", "--set", "eval.every=0",
                 "--set", "eval.at_end=false", "--set", "checkpoint.at_end=false",
                 "--set", "profile.enabled=true", "--set", "profile.start_step=2",
                 "--set", "profile.steps=2"])
    assert code == 0
    summary = json.loads((out / "profile" / "summary_rank0.json").read_text())
    assert summary["steps"] == [2, 3]
    assert {"rollout", "update", "statistics"} <= set(summary["phases"])
    assert summary["phases"]["rollout"]["host_ms"] > 0
