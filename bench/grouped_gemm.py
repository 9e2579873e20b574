"""The expert GEMMs one call type at a time: torch._grouped_mm vs the dense floor.

Where does a grouped GEMM lose against a dense GEMM of the same FLOPs, and which of the six
calls of an MoE FFN layer's fwd+bwd loses most? For each shape (issue 9's A/B/C and the
training bench's moe-1b layer), rows sorted by expert with random (multinomial) counts:

    fwd13    x [R, d]     @ w13[e]   [d, 2f]    forward, w1 and w3 fused
    fwd2     act [R, f]   @ w2[e]    [f, d]
    dgrad2   g [R, d]     @ w2[e].T             data gradient
    dgrad13  g13 [R, 2f]  @ w13[e].T
    wgrad2   act_e.T @ g_e      -> [E, f, d]    weight gradient (K-grouped)
    wgrad13  x_e.T @ g13_e      -> [E, d, 2f]
    gather13 fwd13 with the rows gathered from the unsorted tokens (the gather kernel, then the GEMM)

Variants: ``torch`` (torch._grouped_mm, CUTLASS on sm90) and ``dense`` (one torch.mm of the
same M, N, K: the floor). Median of CUDA-event-timed iterations; JSON with device, versions
and shapes. A Triton grouped GEMM with the gather fused into its A load was measured here as a
third variant (bench/results/gpu_h100/session3/grouped_gemm_triton_candidate_h100.json, code in
commit 523410c): 1.1-1.5x slower than torch._grouped_mm on the row-grouped calls and 2.3-2.7x
on the weight gradients, so it was not kept.

    PYTHONPATH=. python bench/grouped_gemm.py --out bench/results/grouped_gemm_h100.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time

import torch

SHAPES = {  # name: (d, f, E, k, T)
    "moe1b": (1024, 512, 64, 8, 16384),
    "A": (4096, 14336, 8, 2, 8192),
    "B": (2048, 1408, 64, 6, 16384),
    "C": (1024, 2816, 16, 2, 8192),
}


def _time(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def calls(d: int, f: int, E: int, k: int, T: int, dev: torch.device, seed: int = 0):
    """(name, M, N, K, torch_fn) for the seven call types of one shape."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    R = T * k
    counts = torch.bincount(torch.randint(0, E, (R,), generator=g), minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32).to(dev)
    bf = dict(device=dev, dtype=torch.bfloat16)
    x = torch.randn(R, d, **bf)
    tok = torch.randn(T, d, **bf)
    idx = torch.randperm(R, generator=g).to(dev) // k  # row r reads token idx[r] (k copies each)
    act = torch.randn(R, f, **bf)
    g_d = torch.randn(R, d, **bf)
    g13 = torch.randn(R, 2 * f, **bf)
    w13 = torch.randn(E, d, 2 * f, **bf) / d**0.5
    w2 = torch.randn(E, f, d, **bf) / f**0.5
    gmm = torch._grouped_mm
    from anymoe.backends.cuda_kernels import launch_gather_rows

    rows = [
        ("fwd13", R, 2 * f, d, lambda: gmm(x, w13, offs=offs)),
        ("fwd2", R, d, f, lambda: gmm(act, w2, offs=offs)),
        ("dgrad2", R, f, d, lambda: gmm(g_d, w2.transpose(-2, -1), offs=offs)),
        ("dgrad13", R, d, 2 * f, lambda: gmm(g13, w13.transpose(-2, -1), offs=offs)),
        ("wgrad2", f, d, R, lambda: gmm(act.t(), g_d, offs=offs)),
        ("wgrad13", d, 2 * f, R, lambda: gmm(x.t(), g13, offs=offs)),
        ("gather13", R, 2 * f, d, lambda: gmm(launch_gather_rows(tok, idx), w13, offs=offs)),
    ]
    return rows


def run(args) -> list[dict]:
    dev = torch.device("cuda")
    out = []
    for name in args.shapes:
        d, f, E, k, T = SHAPES[name]
        for call, M, N, K, torch_fn in calls(d, f, E, k, T, dev):
            flops = 2.0 * M * N * K
            a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            b = torch.randn(K, N, device=dev, dtype=torch.bfloat16)
            row = {"shape": name, "call": call, "M": M, "N": N, "K": K,
                   "dense_ms": _time(functools.partial(torch.mm, a, b), args.iters, args.warmup),
                   "torch_ms": _time(torch_fn, args.iters, args.warmup)}
            for v in ("dense", "torch"):
                row[f"{v}_tflops"] = flops / row[f"{v}_ms"] / 1e9
            out.append(row)
            print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    return out


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["moe1b", "B", "C", "A"], choices=sorted(SHAPES))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    doc = {"bench": "grouped_gemm", "env": environment(), "dtype": "bfloat16",
           "shapes": {n: dict(zip("d f E k T".split(), SHAPES[n])) for n in args.shapes},
           "results": run(args)}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
