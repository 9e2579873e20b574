"""`anymoe plot RUN_DIR`: PNGs of a run's loss, learning rate and expert load over time.

Reads RUN_DIR/metrics.jsonl and writes into RUN_DIR (or --out):
  loss.png         training loss per step (and eval loss where evaluated)
  lr.png           learning rate per step
  expert_load.png  one heat map per MoE layer: share of tokens per expert (rows) over steps,
                   with the coefficient of variation of the load underneath
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from anymoe.trainers.metrics import read_metrics


def _num(x: Any) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


def write_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the PNGs; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = [r for r in rows if _num(r.get("loss")) is not None]
    written: list[Path] = []
    if not train:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} holds no logged training steps to plot")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    evals = [r for r in rows if _num(r.get("eval_loss")) is not None]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend()
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    lr_rows = [r for r in train if _num(r.get("lr")) is not None]
    if lr_rows:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows])
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.set_title("learning rate")
        fig.tight_layout()
        written.append(out / "lr.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    load_rows = [r for r in train if r.get("layers")]
    if load_rows:
        n_layers = max(len(r["layers"]) for r in load_rows)
        fig, axes = plt.subplots(n_layers + 1, 1, figsize=(8, 2.0 * n_layers + 2.5), squeeze=False)
        steps = [r["step"] for r in load_rows]
        for i in range(n_layers):
            ax = axes[i][0]
            shares = [r["layers"][i].get("share") if i < len(r["layers"]) else None for r in load_rows]
            width = max((len(s) for s in shares if s), default=0)
            grid = [[(s[e] if s else float("nan")) for s in shares] for e in range(width)]
            im = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest",
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, width - 0.5), cmap="viridis")
            ax.set_ylabel(f"layer {i}\nexpert")
            fig.colorbar(im, ax=ax, label="token share")
        ax = axes[n_layers][0]
        for i in range(n_layers):
            ax.plot(steps, [r["layers"][i].get("cv", float("nan")) if i < len(r["layers"]) else float("nan")
                            for r in load_rows], label=f"layer {i}")
        ax.set_ylabel("load CV")
        ax.set_xlabel("step")
        ax.legend(fontsize=7, ncol=4)
        fig.suptitle("expert load per layer over time")
        fig.tight_layout()
        written.append(out / "expert_load.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `anymoe train`")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR)")


def run(args: argparse.Namespace) -> int:
    try:
        paths = write_plots(args.run_dir, args.out)
    except (OSError, ValueError) as err:
        print(f"anymoe plot: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


__all__ = ["configure", "run", "write_plots"]
