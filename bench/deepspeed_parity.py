"""Loss-curve parity of ``engine: deepspeed`` against anymoe's own loop (fp32, CPU, gloo).

Runs the same config (a 4-expert tiny MoE, global batch 8, grad clipping on) as
    native   one process, anymoe's loop
    zero2_ep2   DeepSpeed ZeRO-2, 2 processes, expert parallel 2 (dp 1 x ep 2)
    zero1_dp2   DeepSpeed ZeRO-1, 2 processes, data parallel 2
and writes every step's loss and grad norm with the largest relative difference to the native
curve to bench/results/deepspeed_parity.json (DeepSpeed on its CPU accelerator).

    PYTHONPATH=. python bench/deepspeed_parity.py [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from anymoe.trainers.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CFG = {
    "name": "ds_parity",
    "model": {"preset": "tiny", "vocab_size": 259, "d_model": 32, "max_seq_len": 32,
              "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32}},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32, "eval_split": 0.02},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "grad_clip": 1.0},
    "train": {"micro_batch": 2, "global_batch": 8, "precision": "fp32"},
    "logging": {"progress": False, "plots": False, "tensorboard": False},
    "checkpoint": {"at_end": False},
    "eval": {"batches": 1},
}
RUNS = {"native": [], "zero2_ep2": ["--nproc", "2", "--set", "engine=deepspeed", "--set", "parallel.ep=2"],
        "zero1_dp2": ["--nproc", "2", "--set", "engine=deepspeed", "--set", "deepspeed.zero_stage=1"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "deepspeed_parity.json"))
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    curves: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cfg.yaml"
        cfg.write_text(yaml.safe_dump({**CFG, "train": {**CFG["train"], "steps": args.steps}}))
        for name, extra in RUNS.items():
            cmd = [sys.executable, "-m", "anymoe", "train", str(cfg), "--out", str(Path(tmp) / name), *extra]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            curves[name] = [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"]}
                            for r in read_metrics(Path(tmp) / name) if "loss" in r]
            print(name, [round(r["loss"], 6) for r in curves[name]], flush=True)
    base = curves["native"]

    def max_rel(name: str, key: str) -> float:
        return max(abs(a[key] - b[key]) / abs(a[key]) for a, b in zip(base, curves[name]))

    import deepspeed  # noqa: E402  (version only)

    out = {
        "what": "per-step loss and grad norm, engine: deepspeed vs anymoe's loop, fp32, CPU + gloo",
        "config": CFG, "steps": args.steps, "curves": curves,
        "max_rel_diff": {name: {"loss": max_rel(name, "loss"), "grad_norm": max_rel(name, "grad_norm")}
                         for name in RUNS if name != "native"},
        "tolerance_asserted_in_tests": {"loss": 1e-6, "grad_norm": 1e-4},
        "deepspeed": deepspeed.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["max_rel_diff"]), "->", args.out)


if __name__ == "__main__":
    main()
