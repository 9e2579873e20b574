"""Is bf16 autocast worth it on this CPU? Times one training micro-step (forward + backward) of
the tiny and small presets under fp32 and under bf16 autocast; writes
bench/results/cpu_precision.json. The CPU backend's autocast_dtype() (None = fp32) should agree
with the result. Timings are the minimum over repeats (the machine may be shared: the load
average is recorded beside them).

    python bench/trainer_cpu_precision.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from anymoe.core.backend import get_backend
from anymoe.models import MoETransformer, preset

SHAPES = {"tiny": dict(vocab_size=259), "small": dict(vocab_size=8192, n_layers=2)}


def time_step(model, ids, dtype, repeats):
    def step():
        on = dtype is not None
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=on):
            out = model(ids, return_aux=True)
        loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_precision.json"))
    args = parser.parse_args()
    backend = get_backend("cpu")
    results = []
    for name, over in SHAPES.items():
        torch.manual_seed(0)
        model = MoETransformer(preset(name, **over), backend=backend)
        batch, seq = (8, 128) if name == "tiny" else (4, 256)
        ids = torch.randint(0, over["vocab_size"], (batch, seq))
        fp32 = time_step(model, ids, None, args.repeats)
        bf16 = time_step(model, ids, torch.bfloat16, args.repeats)
        results.append({"model": name, "batch": batch, "seq_len": seq, "fp32_s": round(fp32, 4),
                        "bf16_autocast_s": round(bf16, 4), "bf16_speedup": round(fp32 / bf16, 3)})
        print(results[-1], flush=True)
    cpu_flags = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu_flags = next(line for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    record = {
        "what": "one forward+backward micro-step, fp32 vs bf16 autocast, min over repeats",
        "results": results,
        "verdict": ("bf16 faster" if all(r["bf16_speedup"] > 1.1 for r in results)
                    else "fp32 (bf16 not faster)"),
        "backend_autocast_dtype": str(backend.autocast_dtype()),
        "cpu_has_amx_bf16": "amx_bf16" in cpu_flags, "cpu_has_avx512_bf16": "avx512_bf16" in cpu_flags,
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"written {args.out}: {record['verdict']}")


if __name__ == "__main__":
    main()
