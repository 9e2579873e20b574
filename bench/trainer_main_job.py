"""The README's main job, timed: `anymoe train configs/tiny.yaml` in a fresh process; records
wall time, first/final loss, eval loss and the host load in bench/results/tiny_main_job.json.

    python bench/trainer_main_job.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    run = Path(tempfile.mkdtemp()) / "tiny"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "anymoe", "train", str(ROOT / "configs" / "tiny.yaml"), "--out", str(run)]
    subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    record = {
        "command": "anymoe train configs/tiny.yaml", "wall_s": round(wall, 1),
        "train_s": json.loads((run / "run.json").read_text())["seconds"],
        "steps": len(steps), "first_loss": round(steps[0]["loss"], 4),
        "final_loss": round(steps[-1]["loss"], 4),
        "loss_at": {s["step"]: round(s["loss"], 4) for s in steps if s["step"] % 25 == 0},
        "eval_loss": [(e["step"], round(e["eval_loss"], 4)) for e in evals],
        "files": sorted(p.name for p in run.iterdir()),
        "load_average": os.getloadavg(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": __import__("torch").__version__,
    }
    out = ROOT / "bench" / "results" / "tiny_main_job.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
