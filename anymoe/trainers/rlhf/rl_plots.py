"""PNG plots of an RLHF run, next to the trainer's loss / lr / expert-load plots.

Reads RUN_DIR/metrics.jsonl and writes what the run logged:
  reward.png      reward mean +- std per step, each reward part, greedy eval reward/exact
                  (from step 0: the score before any update)
  rl_stats.png    KL to the reference, entropy, clip fraction, response length
  routing.png     routing agreement rollout vs training forward, |log pi_train - log pi_rollout|
  preference.png  (rm / dpo) accuracy and margin, train and eval
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anymoe.trainers.metrics import read_metrics


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _panel(ax, rows, keys: list[str], title: str) -> bool:
    drawn = False
    for key in keys:
        x, y = _series(rows, key)
        if x:
            ax.plot(x, y, "o-" if len(x) < 3 else "-", label=key, markersize=3)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def write_rl_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir or run_dir)
    written: list[Path] = []

    if any("reward_mean" in r for r in rows):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        x, mean = _series(rows, "reward_mean")
        _, std = _series(rows, "reward_std")
        axes[0].plot(x, mean, label="reward mean")
        if len(std) == len(mean):
            axes[0].fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                 alpha=0.2, label="+- std")
        for key in ("eval_reward", "eval_exact"):
            ex, ey = _series(rows, key)
            bx, by = _series(rows, f"{key}_before")
            ex, ey = [0] * len(bx) + ex, by + ey  # the score before any update sits at step 0
            if ex:
                axes[0].plot(ex, ey, "o--", label=key, markersize=4)
        axes[0].set_title("reward")
        axes[0].set_xlabel("step")
        axes[0].legend(fontsize=7)
        parts = sorted({k for r in rows for k in r if k.startswith("reward/")})
        _panel(axes[1], rows, parts, "reward parts (unweighted)")
        fig.tight_layout()
        written.append(out / "reward.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

        fig, axes = plt.subplots(2, 2, figsize=(10, 6))
        _panel(axes[0][0], rows, ["kl", "kl_loss", "router_kl"], "KL to the reference")
        _panel(axes[0][1], rows, ["entropy"], "policy entropy")
        _panel(axes[1][0], rows, ["clip_frac", "approx_kl"], "PPO clipping")
        _panel(axes[1][1], rows, ["response_len"], "response length (tokens)")
        fig.tight_layout()
        written.append(out / "rl_stats.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        _panel(axes[0], rows, ["routing_agreement", "routing_overlap"], "routing agreement rollout vs train")
        _panel(axes[1], rows, ["rollout_train_logp_gap", "first_ratio_max_dev"], "rollout/train mismatch")
        fig.tight_layout()
        written.append(out / "routing.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    if any("accuracy" in r or "eval_accuracy" in r for r in rows):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        _panel(axes[0], rows, ["accuracy", "eval_accuracy"], "preference accuracy")
        _panel(axes[1], rows, ["margin", "eval_margin", "chosen_reward", "rejected_reward"],
               "margin / rewards")
        fig.tight_layout()
        written.append(out / "preference.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


__all__ = ["write_rl_plots"]
