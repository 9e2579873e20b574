"""Loss curves of parity runs: the JSONL format, and how two curves are compared.

A curve file holds one JSON object per line. The first line may be a header
``{"meta": {...}}`` (backend, precision, EP size, versions); every other line is one
training step: ``{"step", "loss", "grad_norm", "loads": [[per-expert share] per layer],
"routing": [[expert ids of a fixed probe of tokens] per layer]}`` (the last two optional).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Curve:
    path: str
    meta: dict[str, Any] = field(default_factory=dict)
    steps: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        parts = [str(self.meta[k]) for k in ("backend", "precision") if k in self.meta]
        if self.meta.get("ep", 1) != 1:
            parts.append(f"ep{self.meta['ep']}")
        name = Path(self.path).stem
        return f"{name} ({', '.join(parts)})" if parts else name


def read_curve(path: str | Path) -> Curve:
    """Parse a curve file; a malformed line is an error naming the file and line."""
    curve = Curve(str(path))
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"curve file {str(p)!r} does not exist")
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}:{lineno}: not a JSON object ({err.msg})") from None
        if "meta" in row:
            curve.meta = row["meta"]
            continue
        if "step" not in row or "loss" not in row:
            raise ValueError(f"{p}:{lineno}: a step line needs 'step' and 'loss'")
        curve.steps[int(row["step"])] = row
    if not curve.steps:
        raise ValueError(f"{p}: holds no steps")
    return curve


def write_curve(path: str | Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as fh:
        fh.write(json.dumps({"meta": meta}) + "\n")
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def relative_diff(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude; inf when exactly one is not finite."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return 0.0 if a == b else math.inf
    scale = max(abs(a), abs(b), 1e-12)
    return abs(a - b) / scale


@dataclass(frozen=True)
class PairReport:
    reference: str
    other: str
    steps: int
    max_rel: float
    mean_rel: float
    first_over: int | None
    routing_agreement: float | None
    rel_by_step: tuple[tuple[int, float], ...]

    def ok(self) -> bool:
        return self.first_over is None and self.steps > 0


def routing_agreement(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Share of probe tokens whose expert set is the same in both runs, over all layers."""
    ra, rb = a.get("routing"), b.get("routing")
    if not ra or not rb or len(ra) != len(rb):
        return None
    same = total = 0
    for layer_a, layer_b in zip(ra, rb):
        for ids_a, ids_b in zip(layer_a, layer_b):
            same += set(ids_a) == set(ids_b)
            total += 1
    return same / total if total else None


def compare(reference: Curve, other: Curve, rtol: float) -> PairReport:
    common = sorted(set(reference.steps) & set(other.steps))
    rels = [(s, relative_diff(reference.steps[s]["loss"], other.steps[s]["loss"])) for s in common]
    first_over = next((s for s, r in rels if r > rtol), None)
    pairs = (routing_agreement(reference.steps[s], other.steps[s]) for s in common)
    agreements = [x for x in pairs if x is not None]
    return PairReport(
        reference=reference.label,
        other=other.label,
        steps=len(common),
        max_rel=max((r for _, r in rels), default=math.nan),
        mean_rel=sum(r for _, r in rels) / len(rels) if rels else math.nan,
        first_over=first_over,
        routing_agreement=sum(agreements) / len(agreements) if agreements else None,
        rel_by_step=tuple(rels),
    )


def format_table(reports: list[PairReport], rtol: float) -> str:
    header = ("reference", "other", "steps", "max rel", "mean rel", "first step > rtol",
              "routing agree", "ok")
    rows = [header]
    for r in reports:
        agree = "-" if r.routing_agreement is None else f"{r.routing_agreement:.3f}"
        first = "-" if r.first_over is None else str(r.first_over)
        rows.append((r.reference, r.other, str(r.steps), f"{r.max_rel:.2e}", f"{r.mean_rel:.2e}",
                     first, agree, "yes" if r.ok() else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"tolerance: max relative loss difference <= {rtol:g}")
    return "\n".join(lines)


def write_report_json(path: str | Path, curves: list[Curve], reports: list[PairReport], rtol: float) -> None:
    """The compare table as JSON (one object per pair, plus every curve's path and meta)."""
    pairs = [{"reference": r.reference, "other": r.other, "steps": r.steps, "max_rel": r.max_rel,
              "mean_rel": r.mean_rel, "first_over": r.first_over, "routing_agreement": r.routing_agreement,
              "ok": r.ok()} for r in reports]
    data = {"rtol": rtol, "pairs": pairs, "curves": [{"path": c.path, "meta": c.meta} for c in curves]}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def plot_curves(curves: list[Curve], reports: list[PairReport], out: str | Path) -> None:
    """Loss curves (top) and relative difference to the reference (bottom, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_diff) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for curve in curves:
        steps = sorted(curve.steps)
        ax_loss.plot(steps, [curve.steps[s]["loss"] for s in steps], label=curve.label)
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    for report in reports:
        steps = [s for s, _ in report.rel_by_step]
        rels = [max(r, 1e-16) for _, r in report.rel_by_step]
        ax_diff.semilogy(steps, rels, label=f"{report.other} vs {report.reference}")
    ax_diff.set_ylabel("relative loss difference")
    ax_diff.set_xlabel("step")
    ax_diff.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
