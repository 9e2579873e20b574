"""Expert-load statistics against a float64 plain loop; JSONL writer; progress line and ETA."""

import io
import json
import math

import pytest
import torch

from anymoe.trainers.metrics import MetricsWriter, load_stats, read_metrics, router_entropy
from anymoe.trainers.progress import Progress, format_seconds


def test_load_stats_against_plain_loop():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        counts = torch.randint(0, 50, (8,), generator=g).float()
        stats = load_stats(counts)
        c = [float(x) for x in counts]
        total, mean = sum(c), sum(c) / len(c)
        std = math.sqrt(sum((x - mean) ** 2 for x in c) / len(c))
        assert stats["share"] == pytest.approx([x / total for x in c])
        assert stats["cv"] == pytest.approx(std / mean)
        assert stats["max_over_mean"] == pytest.approx(max(c) / mean)


def test_router_entropy_against_plain_loop():
    probs = torch.softmax(torch.randn(6, 4, dtype=torch.float64), -1)
    ref = sum(-sum(p * math.log(p) for p in row) for row in probs.tolist()) / 6
    assert router_entropy(probs) == pytest.approx(ref)


def test_jsonl_rows_truncated_on_resume(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in range(1, 6):
        w.log({"step": s, "loss": float(s), "bad": float("nan")})
    w.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["bad"] == "nan"  # valid JSON, non-finite kept as text
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')  # a line cut by a kill
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=3)
    w.log({"step": 4, "loss": 40.0})
    w.close()
    rows = [(r["step"], r["loss"]) for r in read_metrics(tmp_path)]
    assert rows == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_progress_line_and_eta():
    out = io.StringIO()
    p = Progress(100, stream=out)
    p.update(10, loss=2.5, lr=1e-3, tokens_per_s=12345.0)
    p._t0 -= 9.0  # as if 9 s passed since step 10
    line = p.line(19, loss=2.0)
    assert "step 19/100" in line and "loss 2.0000" in line
    assert "ETA 1:21" in line  # 1 s/step x 81 steps left
    assert "12.3k tok/s" in out.getvalue()
    assert format_seconds(3725) == "1:02:05" and format_seconds(float("nan")) == "?"


def test_tensorboard_events_written_by_their_thread_are_all_there(tmp_path):
    """Scalars and load histograms go through a writer thread; after close() every step's events
    are in the files (read back with TensorBoard's own reader), with the values logged."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path, tensorboard=True)
    for step in range(1, 21):
        row = {"step": step, "loss": 1.0 / step, "lr": 1e-3,
               "layers": [{"share": [0.5, 0.25, 0.25], "cv": 0.3}, {"share": [1.0, 0.0, 0.0], "cv": 1.4}]}
        w.log(row)
        row["loss"] = -1.0  # changed after log(): TensorBoard still gets the logged value
    w.close()
    ea = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss")] == list(range(1, 21))
    assert [e.value for e in ea.Scalars("loss")] == pytest.approx([1.0 / s for s in range(1, 21)])
    assert len(ea.Histograms("load/layer0")) == len(ea.Histograms("load/layer1")) == 20
