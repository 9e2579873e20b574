"""`anymoe parity compare` on hand-made curves: the table, the tolerance gate, the plot."""

import math

import pytest

from anymoe.cli import main
from anymoe.trainers.curves import compare, read_curve, relative_diff, routing_agreement, write_curve


def _curve(path, losses, meta=None, routing=None):
    rows = []
    for step, loss in enumerate(losses):
        row = {"step": step, "loss": loss}
        if routing is not None:
            row["routing"] = routing[step]
        rows.append(row)
    write_curve(path, meta or {"backend": "cpu", "precision": "fp32"}, rows)
    return path


def test_relative_diff_worked_example():
    # |2.0 - 2.002| / 2.002 = 0.000999...
    assert relative_diff(2.0, 2.002) == pytest.approx(0.002 / 2.002)
    assert relative_diff(1.0, 1.0) == 0.0
    assert relative_diff(math.nan, 1.0) == math.inf


def test_compare_within_tolerance_exits_zero(tmp_path, capsys):
    a = _curve(tmp_path / "a.jsonl", [4.0, 3.0, 2.0])
    b = _curve(tmp_path / "b.jsonl", [4.0, 3.0 * (1 + 1e-7), 2.0])
    png = tmp_path / "p.png"
    assert main(["parity", "compare", str(a), str(b), "--rtol", "1e-6", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "max rel" in out and "yes" in out
    assert png.stat().st_size > 1000


def test_compare_over_tolerance_exits_one_and_names_first_step(tmp_path, capsys):
    a = _curve(tmp_path / "a.jsonl", [4.0, 3.0, 2.0, 1.5])
    b = _curve(tmp_path / "b.jsonl", [4.0, 3.0, 2.1, 1.5])
    assert main(["parity", "compare", str(a), str(b), "--rtol", "1e-3"]) == 1
    report = compare(read_curve(a), read_curve(b), 1e-3)
    assert report.first_over == 2
    assert report.max_rel == pytest.approx(0.1 / 2.1)
    assert "NO" in capsys.readouterr().out


def test_routing_agreement_counts_expert_sets():
    # layer 0: token sets {0,1} vs {1,0} agree; {2,3} vs {2,4} do not -> 1/2
    a = {"routing": [[[0, 1], [2, 3]]]}
    b = {"routing": [[[1, 0], [2, 4]]]}
    assert routing_agreement(a, b) == 0.5
    assert routing_agreement({"routing": None}, b) is None


def test_malformed_curve_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0, "loss": 1.0}\nnot json\n')
    good = _curve(tmp_path / "a.jsonl", [1.0])
    assert main(["parity", "compare", str(good), str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_compare_json_holds_pairs_and_meta(tmp_path):
    import json

    meta = {"backend": "cpu", "precision": "fp32", "recipe_sha256": "x"}
    a = _curve(tmp_path / "a.jsonl", [4.0, 3.0], meta=meta)
    b = _curve(tmp_path / "b.jsonl", [4.0, 3.3], meta=meta)
    out = tmp_path / "t.json"
    assert main(["parity", "compare", str(a), str(b), "--rtol", "1e-3", "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert data["rtol"] == 1e-3 and data["curves"][1]["meta"]["recipe_sha256"] == "x"
    (pair,) = data["pairs"]
    assert pair["ok"] is False and pair["first_over"] == 1 and pair["max_rel"] == pytest.approx(0.3 / 3.3)
