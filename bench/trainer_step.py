"""The real trainer's step on one GPU: what ``anymoe train`` gets, next to what it is made of.

``bench/train_throughput.py`` times a hand-written step (bf16 weights, no clipping, no host
read). This bench builds ``PretrainTrainer`` from a run config exactly as ``anymoe train`` does
(default ``bench/configs/moe1b_trainer.yaml``: issue 9's moe-1b shape, batch 8 x 2048, precision
``auto`` = fp32 weights under bf16 autocast, ``blocks_cudagraphs``, gradient clipping at 1.0,
deterministic algorithms) and times, each step followed by a device sync:

    train_step     PretrainTrainer.train_step: forward, backward, the step's one host read,
                   gradient norm and clipping, the optimizer, the MoE statistics
    noclip         the same with optim.grad_clip = 0
    bare           forward, backward and optimizer.step() of the same model and optimizer (no
                   statistics, no host read, no clipping): the floor of this precision policy

then profiles a few steps of ``train_step`` and ``bare`` (kernel time per step by name, the
device's idle gaps, a Chrome trace). JSON with device, versions and config.

    PYTHONPATH=. python bench/trainer_step.py --out bench/results/trainer_step_h100.json
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import torch

from anymoe.core.backend import get_backend
from anymoe.core.losses import cross_entropy_sum
from anymoe.trainers.compile import mark_step_begin
from anymoe.trainers.config import load_run_config
from anymoe.trainers.pretrain import IGNORE, PretrainTrainer


def _sync(trainer) -> None:
    trainer.backend.synchronize()


def timed(trainer, fn, steps: int) -> float:
    """Median seconds of ``fn(i)`` with a device sync before and after each call."""
    times = []
    for i in range(steps):
        _sync(trainer)
        t0 = time.perf_counter()
        fn(i)
        _sync(trainer)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bare_step(trainer, batches):
    def step(i):
        mark_step_begin(trainer.compile_mode)
        ids, labels = batches[i % len(batches)]
        with trainer._autocast():
            out = trainer.model(ids, return_aux=True)
        ce = cross_entropy_sum(out.logits.view(-1, out.logits.shape[-1]), labels.view(-1), IGNORE)
        (ce / labels.numel() + out.aux_loss).backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return step


def kernel_table(trace_path: str, steps: int) -> dict:
    """ms per step by kernel name (CUTLASS grouped GEMMs as one name), and the device's idle gaps
    over 0.15 ms between the first and the last kernel."""
    with open(trace_path) as fh:
        events = json.load(fh)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    per_name: collections.Counter = collections.Counter()
    for e in kernels:
        per_name[re.sub(r"_ZN7cutlass.*", "cutlass_grouped_gemm", e["name"])[:120]] += e["dur"] / 1e3 / steps
    gaps, end = [], kernels[0]["ts"] + kernels[0]["dur"] if kernels else 0
    for e in kernels[1:]:
        if e["ts"] - end > 150:
            gaps.append((e["ts"] - end) / 1e3)
        end = max(end, e["ts"] + e["dur"])
    span = (end - kernels[0]["ts"]) / 1e3 / steps if kernels else 0.0
    return {"kernel_ms_per_step": sum(per_name.values()), "span_ms_per_step": span,
            "idle_gaps_ms_per_step": sum(gaps) / steps, "top": dict(per_name.most_common(40))}


def profile(fn, steps: int, trace_gz: str | None) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            fn(i)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        table = kernel_table(path, steps)
        if trace_gz:
            with open(path, "rb") as src, gzip.open(trace_gz, "wb", compresslevel=1) as dst:
                dst.write(src.read())
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="bench/configs/moe1b_trainer.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    from train_throughput import environment  # bench/train_throughput.py: device and versions

    cfg = load_run_config(args.config, args.set)
    run_dir = tempfile.mkdtemp(prefix="trainer_step_")
    trainer = PretrainTrainer(cfg, run_dir, get_backend(cfg.backend))
    trainer.build()

    def real(i):
        trainer.train_step(i)

    for i in range(args.warmup):
        real(i)
    res = {"train_step_s": timed(trainer, real, args.steps)}
    clip = cfg.optim.grad_clip
    object.__setattr__(cfg.optim, "grad_clip", 0.0)  # the trainer reads it every step
    res["noclip_s"] = timed(trainer, real, args.steps)
    object.__setattr__(cfg.optim, "grad_clip", clip)
    batches = [tuple(t.to(trainer.device) for t in trainer.data.next_step()[0]) for _ in range(2)]
    bare = bare_step(trainer, batches)
    for i in range(2):
        bare(i)
    res["bare_s"] = timed(trainer, bare, args.steps)
    tokens = trainer.tokens_per_step
    for key in ("train_step", "noclip", "bare"):
        res[f"{key}_tokens_per_s"] = tokens / res[f"{key}_s"]
        res[f"{key}_mfu"] = trainer.derived_metrics({"tokens_per_s": tokens / res[f"{key}_s"]})["mfu"]
    print(json.dumps(res), flush=True)
    stem = os.path.splitext(args.out)[0] if args.out else ""
    res["profile"] = {}
    if args.profile_steps and torch.cuda.is_available():
        trace = f"{stem}.train_step.trace.json.gz" if stem else None
        res["profile"] = {"train_step": profile(real, args.profile_steps, trace),
                          "bare": profile(bare, args.profile_steps, None)}
    for name, table in res["profile"].items():
        print(name, {k: round(v, 2) for k, v in table.items() if k != "top"}, flush=True)
    env = environment() if torch.cuda.is_available() else {}
    doc = {"bench": "trainer_step", "env": env, "config": args.config, "overrides": args.set,
           "tokens_per_step": tokens, "precision": cfg.train.precision,
           "autocast": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else None,
           "compile": trainer.compile_mode, "grad_clip": clip, "results": res}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
