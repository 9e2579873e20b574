"""What stock PyTorch accelerates on this CPU: bf16 autocast and torch.compile, one training step.

For the tiny preset (configs/tiny.yaml's batch: 8 x 128) and a 2-layer cut of the small preset
(4 x 256), times a full training step (forward, backward, AdamW) under

    eager fp32 | eager bf16 autocast | compiled fp32 | compiled bf16 autocast

where "compiled" is regional torch.compile (each decoder block, inductor's C++ backend; the
MoE token counts change every step, so ``dynamic=True`` spares a recompile per step). The
first compiled steps (compilation) are timed separately; step times are the median of the
repeats after the warm-up; ``break_even_steps`` is how long a run must be before compilation
pays for itself. Writes bench/results/cpu_accel.json with the CPU flags, threads and
load average beside the numbers (the machine may be shared), and the verdict the CPU backend
follows (anymoe/backends/cpu.py: autocast_dtype, compile).

    PYTHONPATH=. python bench/cpu_accel.py [--repeats 5] [--models tiny small]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from anymoe.core.backend import get_backend
from anymoe.models import MoETransformer, preset

SHAPES = {"tiny": (dict(vocab_size=259), 8, 128), "small": (dict(vocab_size=8192, n_layers=2), 4, 256)}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def build(name: str, compiled: bool):
    over, batch, seq = SHAPES[name]
    torch.manual_seed(0)
    model = MoETransformer(preset(name, **over), backend=get_backend("cpu"))
    if compiled:
        for block in model.blocks:
            block.compile(dynamic=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, over["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    return model, opt, ids


def step(model, opt, ids, dtype) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model(ids, return_aux=True)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]),
                                             ids[:, 1:].reshape(-1)) + out.aux_loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measure(name: str, compiled: bool, dtype, repeats: int, warmup: int) -> dict:
    model, opt, ids = build(name, compiled)
    first = [step(model, opt, ids, dtype) for _ in range(warmup)]
    times = [step(model, opt, ids, dtype) for _ in range(repeats)]
    return {"warmup_s": [round(t, 4) for t in first], "median_step_s": round(statistics.median(times), 4),
            "min_step_s": round(min(times), 4)}


def break_even_steps(row: dict, variant: str) -> float | None:
    """Steps after which ``variant`` (compilation included) beats eager fp32; None: never."""
    eager, other = row["eager_fp32"], row[variant]
    if "median_step_s" not in other:
        return None
    saved = eager["median_step_s"] - other["median_step_s"]
    extra = sum(other["warmup_s"]) - sum(eager["warmup_s"])
    return round(max(extra, 0.0) / saved, 1) if saved > 0 else None


def verdict(results: list[dict], typical_steps: int = 1000) -> dict:
    """What the CPU backend should do: the fastest variant per step, and whether compilation
    pays back within a typical CPU run (``typical_steps``; configs/tiny.yaml runs 200)."""
    fastest = {r["model"]: max(r["speedup_vs_eager_fp32"], key=r["speedup_vs_eager_fp32"].get)
               for r in results}
    pays = {r["model"]: (be := break_even_steps(r, "compiled_fp32")) is not None and be <= typical_steps
            for r in results}
    return {"fastest_per_step": fastest, "compile_pays_back_within_steps": typical_steps,
            "compile_pays_back": pays,
            "autocast": "bf16" if all("bf16" in v for v in fastest.values()) else "fp32",
            "compile": all(pays.values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_accel.json"))
    args = ap.parse_args()
    variants = {"eager_fp32": (False, None), "eager_bf16": (False, torch.bfloat16),
                "compiled_fp32": (True, None), "compiled_bf16": (True, torch.bfloat16)}
    results = []
    for name in args.models:
        row: dict = {"model": name, "batch": SHAPES[name][1], "seq_len": SHAPES[name][2]}
        for variant, (compiled, dtype) in variants.items():
            try:
                row[variant] = measure(name, compiled, dtype, args.repeats, args.warmup)
            except Exception as err:  # a compile failure is a result too
                row[variant] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            print(name, variant, row[variant], flush=True)
        base = row["eager_fp32"]["median_step_s"]
        row["speedup_vs_eager_fp32"] = {v: round(base / row[v]["median_step_s"], 3)
                                        for v in variants if "median_step_s" in row[v]}
        row["break_even_steps"] = {v: break_even_steps(row, v) for v in variants if v != "eager_fp32"}
        results.append(row)
    flags = cpu_flags()
    out = {
        "what": "one training step (forward, backward, AdamW) on the CPU; median after warm-up",
        "results": results,
        "verdict": verdict(results),
        "cpu_has_amx_bf16": "amx_bf16" in flags, "cpu_has_avx512_bf16": "avx512_bf16" in flags,
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["verdict"]), "->", args.out)


if __name__ == "__main__":
    main()
