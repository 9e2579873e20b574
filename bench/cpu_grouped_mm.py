"""Which grouped expert matmul is fastest on this CPU: per-expert loop, padded bmm or torch._grouped_mm.

Times forward + backward of each implementation on skewed random routing, checks each
against the float64 loop first, and writes bench/results/cpu_grouped_mm.json with the
torch version, the CPU and the thread count. The CPU backend uses the winner.

    PYTHONPATH=. python bench/cpu_grouped_mm.py [--repeats 5] [--out bench/results/cpu_grouped_mm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import torch  # noqa: E402

from anymoe.core.grouped_mm import (  # noqa: E402
    grouped_mm_loop,
    grouped_mm_padded,
    grouped_mm_torch,
    has_torch_grouped_mm,
)

# (rows T = tokens x top-k, D, F, E): a test-sized layer, a small model's, a fine-grained one.
SHAPES = [(512, 64, 128, 8), (4096, 256, 512, 8), (4096, 256, 128, 64)]


def counts_for(T: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """Skewed routing (Zipf-like expert popularity), the case where padding wastes most."""
    pop = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
    return torch.bincount(torch.multinomial(pop / pop.sum(), T, replacement=True, generator=gen), minlength=E)


def time_impl(fn, x, w, counts, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # first call warms up
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        t0 = time.perf_counter()
        y = fn(xg, wg, counts)
        y.backward(torch.ones_like(y))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_grouped_mm.json"))
    args = ap.parse_args()
    impls = {"loop": grouped_mm_loop, "padded": grouped_mm_padded}
    if has_torch_grouped_mm():
        impls["torch_grouped_mm"] = grouped_mm_torch
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for T, D, F, E in SHAPES:
            x = torch.randn(T, D, generator=gen).to(dtype)
            w = (torch.randn(E, D, F, generator=gen) / D**0.5).to(dtype)
            counts = counts_for(T, E, gen)
            ref = grouped_mm_loop(x.double(), w.double(), counts)
            row = {"dtype": str(dtype).removeprefix("torch."), "T": T, "D": D, "F": F, "E": E,
                   "max_count": int(counts.max()), "seconds_fwd_bwd": {}}
            for name, fn in impls.items():
                err = (fn(x, w, counts).double() - ref).abs().max().item()
                assert err < (1e-3 if dtype == torch.float32 else 0.1), (name, dtype, err)
                row["seconds_fwd_bwd"][name] = round(time_impl(fn, x, w, counts, args.repeats), 6)
            row["fastest"] = min(row["seconds_fwd_bwd"], key=row["seconds_fwd_bwd"].get)
            rows.append(row)
            print(row)
    result = {
        "benchmark": "grouped expert matmul, forward + backward, best of --repeats",
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "repeats": args.repeats, "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
