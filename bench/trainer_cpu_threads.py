"""Intra-op threads for small models on the CPU: one training step of configs/tiny.yaml with 1
and with all cores, CPU seconds and wall seconds per step (min over repeats); writes
bench/results/cpu_threads.json. Each setting runs in a fresh process (torch fixes its thread
pool at first use). The load average is recorded: on a shared host spinning OMP barriers
make extra threads much worse than on an idle one.

    python bench/trainer_cpu_threads.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, os, sys, tempfile, time, torch
torch.set_num_threads(int(sys.argv[1]))
from anymoe.core.backend import get_backend
from anymoe.core.parallel import build_parallel_groups
from anymoe.trainers.config import load_run_config
from anymoe.trainers.pretrain import PretrainTrainer
cfg = load_run_config(sys.argv[2], ["logging.progress=false", "train.host_threads=null"])
t = PretrainTrainer(cfg, tempfile.mkdtemp(), get_backend("cpu"), groups=build_parallel_groups(cfg.parallel))
t.build()
t.train_step(0)
cpu, wall = [], []
for i in range(1, 8):
    c, w = time.process_time(), time.perf_counter()
    t.train_step(i)
    cpu.append(time.process_time() - c)
    wall.append(time.perf_counter() - w)
print(json.dumps({"threads": torch.get_num_threads(), "tokens_per_step": t.tokens_per_step,
                  "cpu_s_per_step": round(min(cpu), 4), "wall_s_per_step": round(min(wall), 4)}))
"""


def main() -> None:
    cfg = ROOT / "configs" / "tiny.yaml"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(cfg)], env=env, check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    record = {"what": "one train step of configs/tiny.yaml (fp32), min over 7 steps, per thread count",
              "results": rows, "load_average": os.getloadavg(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "torch": __import__("torch").__version__}
    path = ROOT / "bench" / "results" / "cpu_threads.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
