"""LM cross-entropy, forward + backward: anymoe's fused op vs ``F.cross_entropy(logits.float())``.

Issue 9's training step spends ~7 ms of 88 ms and 4+ GB on the trainer's
``F.cross_entropy(logits.float().view(-1, V), labels, ignore_index=-100, reduction="sum")``
over bf16 logits [16384, 32000]. Variants, each on the same logits and labels:

    fused               anymoe.core.losses.cross_entropy_sum with the device's registered
                        kernels (Triton on CUDA)
    torch_chunked       the same op on its pure-torch chunked ops (what the CPU and NPU run)
    reference           F.cross_entropy(logits.float(), ..., reduction="sum"), as the trainer does
    reference_compiled  the same through torch.compile (inductor; CUDA only)

Correctness first: each variant's loss and logits gradient against F.cross_entropy on
float64 logits. Then the median of CUDA-event-timed fwd+bwd iterations, and the peak memory
each allocates over the logits (the logits gradient included). On a machine without a GPU
it runs a small smoke size in fp32 with host timers, in seconds.

    PYTHONPATH=. python bench/cross_entropy.py --out bench/results/cross_entropy_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from anymoe.backends import cuda_loss_kernels  # noqa: F401  (registers the Triton ops for CUDA)
from anymoe.core import losses

IGNORE = -100


def make_problem(N, V, dtype, dev, ignore_frac, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Logit scale ~2: a softmax as peaked as a trained LM's early on (loss ~ log V - 2).
    logits = (torch.randn(N, V, generator=gen) * 2).to(dev, dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < ignore_frac] = IGNORE
    return logits, labels.to(dev)


def variants(dev):
    def reference(x, y):
        return F.cross_entropy(x.float(), y, ignore_index=IGNORE, reduction="sum")

    out = {
        "fused": lambda x, y: losses.cross_entropy_sum(x, y, IGNORE),
        "torch_chunked": lambda x, y: losses.cross_entropy_sum(x, y, IGNORE, ops=losses.TORCH_OPS),
        "reference": reference,
    }
    if dev.type == "cuda":
        out["reference_compiled"] = torch.compile(reference)
    return out


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reference_f64(logits, labels):
    """Loss and logits gradient in float64 (on the CPU for the smoke size, else on the device)."""
    x = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(x, labels, ignore_index=IGNORE, reduction="sum")
    loss.backward()
    return loss.detach(), x.grad


def check(fn, logits, labels, ref_loss, ref_grad):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, labels)
    loss.backward()
    errs = {"loss": rel(loss, ref_loss), "grad": rel(x.grad, ref_grad),
            "loss_dtype": str(loss.dtype), "grad_dtype": str(x.grad.dtype)}
    errs["ok"] = errs["loss"] < 1e-5 and errs["grad"] < 1e-2 and x.grad.dtype == logits.dtype
    return errs


class _HostEvent:
    """perf_counter stand-in for torch.cuda.Event (CPU smoke runs)."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def _event(dev):
    return torch.cuda.Event(enable_timing=True) if dev.type == "cuda" else _HostEvent()


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn, logits, labels, iters, warmup, dev):
    x = logits.detach().clone().requires_grad_()
    times = []
    for i in range(warmup + iters):
        x.grad = None
        start, end = _event(dev), _event(dev)
        start.record()
        fn(x, labels).backward()
        end.record()
        _sync(dev)
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def peak_extra_bytes(fn, logits, labels, dev):
    """Peak bytes one fwd+bwd allocates beyond what is live before it (the gradient included)."""
    if dev.type != "cuda":
        return None
    x = logits.detach().clone().requires_grad_()
    _sync(dev)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(x, labels).backward()
    _sync(dev)
    return torch.cuda.max_memory_allocated() - base


def environment():
    gpu = torch.cuda.is_available()
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu",
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        env["triton"] = __import__("triton").__version__
    except ImportError:
        env["triton"] = None
    return env


def run(args):
    gpu = torch.cuda.is_available() and not args.cpu
    dev = torch.device("cuda" if gpu else "cpu")
    N, V = (args.rows, args.vocab) if gpu else (args.smoke_rows, args.smoke_vocab)
    dtype = torch.bfloat16 if gpu else torch.float32
    logits, labels = make_problem(N, V, dtype, dev, args.ignore_frac)
    ref_loss, ref_grad = reference_f64(logits, labels)
    fused_ops = losses.loss_ops_for(logits).name
    iters, warmup = (args.iters, args.warmup) if gpu else (min(args.iters, 5), 1)
    results = {}
    for name, fn in variants(dev).items():
        row = {"rel_err": check(fn, logits, labels, ref_loss, ref_grad)}
        row.update(time_fwd_bwd(fn, logits, labels, iters, warmup, dev))
        row["peak_extra_bytes"] = peak_extra_bytes(fn, logits, labels, dev)
        results[name] = row
        mem, err = row["peak_extra_bytes"], row["rel_err"]
        mem_txt = f"{mem / 2**30:6.2f} GiB over the logits" if mem is not None else ""
        print(f"{name:19s} {row['median_ms']:8.3f} ms (min {row['min_ms']:.3f})  {mem_txt}  "
              f"err loss {err['loss']:.1e} grad {err['grad']:.1e} ok={err['ok']}")
    del ref_grad
    # The op's minimum traffic: the logits read in forward, read again and the gradient written in backward.
    min_bytes = 3 * N * V * logits.element_size()
    fused_ms = results["fused"]["median_ms"]
    summary = {"speedup_vs_reference": results["reference"]["median_ms"] / fused_ms,
               "fused_effective_GBps": min_bytes / (fused_ms * 1e-3) / 1e9, "fused_min_bytes": min_bytes}
    if "reference_compiled" in results:
        summary["speedup_vs_reference_compiled"] = results["reference_compiled"]["median_ms"] / fused_ms
    print(f"fused ({fused_ops}) {summary['speedup_vs_reference']:.2f}x the reference, "
          f"{summary['fused_effective_GBps']:.0f} GB/s over its minimum traffic")
    config = {"rows": N, "vocab": V, "dtype": str(dtype).replace("torch.", ""),
              "ignore_frac": args.ignore_frac, "ignore_index": IGNORE, "fused_ops": fused_ops,
              "torch_chunk_bytes": losses.TORCH_OPS.chunk_bytes,
              "iters": iters, "warmup": warmup, "smoke": not gpu}
    ok = all(r["rel_err"]["ok"] for r in results.values()) and all(
        math.isfinite(r["median_ms"]) for r in results.values())
    return {"bench": "cross_entropy", "env": environment(), "config": config, "ok": ok,
            "results": results, "summary": summary}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16384, help="N = batch x sequence (GPU)")
    ap.add_argument("--vocab", type=int, default=32000, help="V (GPU)")
    ap.add_argument("--smoke-rows", type=int, default=512, help="N without a GPU")
    ap.add_argument("--smoke-vocab", type=int, default=3000, help="V without a GPU")
    ap.add_argument("--ignore-frac", type=float, default=0.05, help="share of rows labelled -100")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cpu", action="store_true", help="the smoke run even where a GPU is present")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    doc = run(args)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"wrote {args.out}")
    if not doc["ok"]:
        raise SystemExit("a variant failed its correctness check (see rel_err in the output)")
    return doc


if __name__ == "__main__":
    main()
