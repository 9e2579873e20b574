"""AdamW step over a preset's parameters: torch's fused kernel vs TritonAdamW (the CUDA backend's).

Both optimizers as the trainer builds them (``anymoe.trainers.optim.build_optimizer`` with
``optim.fused: on`` and ``auto``: a decay and a no-decay group), over the parameters of
``MoETransformer(preset(...))`` (built on the meta device, then allocated on the GPU in the bench
dtype and filled with random numbers; moe-1b: 111 tensors, 1.306B elements), gradients set once.

Correctness first: two steps of each from the same weights and gradients, then the max abs
difference of p, exp_avg and exp_avg_sq. Then per variant: the median of CUDA-event-timed steps
after warm-up (GPU time: a spin kernel queued first hides the host's issue time, as in a training
step), the median host time to issue one step, and the effective
bandwidth over the minimum traffic (p, exp_avg, exp_avg_sq read and written, the gradient read:
7 x the element size, 14 bytes per element in bf16). JSON with device, versions and config.

    PYTHONPATH=. python bench/optimizer.py --out bench/results/optimizer_h100.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from grouped_gemm import environment  # bench/grouped_gemm.py: device, versions, time

from anymoe.backends import cuda_optim_kernels
from anymoe.core.backend import get_backend
from anymoe.models import MoETransformer, preset
from anymoe.trainers.optim import OptimConfig, build_optimizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_model(name: str, dtype: torch.dtype, dev: torch.device, seed: int) -> torch.nn.Module:
    """The preset's parameters on ``dev`` in ``dtype``, filled with random numbers."""
    with torch.device("meta"):
        model = MoETransformer(preset(name))
    model = model.to(dtype).to_empty(device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model


def set_grads(models: list[torch.nn.Module], seed: int) -> None:
    """The same random gradients on each model's parameters."""
    for params in zip(*(m.parameters() for m in models)):
        first = params[0]
        gen = torch.Generator(device=first.device).manual_seed(seed)
        grad = torch.randn(first.shape, generator=gen, device=first.device, dtype=first.dtype) * 1e-3
        for p in params:
            p.grad = grad.clone()
        seed += 1


def _tensors(opt, key: str):
    for group in opt.param_groups:
        for p in group["params"]:
            if p.numel():
                yield p.detach() if key == "param" else opt.state[p][key]


def max_abs_diffs(opt_a, opt_b) -> dict[str, float]:
    """Largest |a - b| over all parameters, for p and both moments."""
    out = {}
    for key in ("param", "exp_avg", "exp_avg_sq"):
        pairs = zip(_tensors(opt_a, key), _tensors(opt_b, key))
        diffs = [(a.float() - b.float()).abs().max() for a, b in pairs]
        out[f"max_abs_diff_{key}"] = float(torch.stack(diffs).max())
    out["max_abs_param"] = float(torch.stack([p.float().abs().max() for p in _tensors(opt_b, "param")]).max())
    return out


def time_steps(opt, iters: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    gpu_ms, host_ms = [], []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # A 20 ms spin queued first keeps the GPU busy while the host issues the step, so the
        # events time the step's GPU work (as inside a training step, where the host runs ahead),
        # not the host's issue latency; host time is reported on its own.
        torch.cuda._sleep(20_000_000)
        start.record()
        t0 = time.perf_counter()
        opt.step()
        host_ms.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        gpu_ms.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(gpu_ms), "min_ms": min(gpu_ms),
            "host_median_ms": statistics.median(host_ms)}


def run(args) -> dict:
    backend = get_backend("cuda")
    dev = backend.device(0)
    dtype = DTYPES[args.dtype]
    cfg = {"on": OptimConfig(fused="on"), "auto": OptimConfig(fused="auto")}
    model = make_model(args.preset, dtype, dev, args.seed)
    twin = copy.deepcopy(model)  # the same weights
    set_grads([model, twin], args.seed)
    opts = {"torch_fused": build_optimizer(model, cfg["on"], backend),
            "triton": build_optimizer(twin, cfg["auto"], backend)}
    if type(opts["triton"]) is not cuda_optim_kernels.TritonAdamW:
        raise SystemExit(f"optim.fused: auto gave {type(opts['triton']).__name__}, not TritonAdamW "
                         f"(Triton importable: {cuda_optim_kernels.HAVE_TRITON})")
    for _ in range(2):
        for opt in opts.values():
            opt.step()
    check = max_abs_diffs(opts["triton"], opts["torch_fused"])
    print("after 2 steps from the same start, triton vs torch fused: "
          + ", ".join(f"{k} {v:.3g}" for k, v in check.items()), flush=True)
    params = [p for p in model.parameters()]
    numel = sum(p.numel() for p in params)
    min_bytes = 7 * numel * params[0].element_size()
    kernel_tensors = sum(
        cuda_optim_kernels.kernel_takes(p, p.grad, st["exp_avg"], st["exp_avg_sq"], "cuda")
        for p, st in ((p, opts["triton"].state[p]) for p in twin.parameters()))
    results = {}
    for name, opt in opts.items():
        row = time_steps(opt, args.iters, args.warmup)
        row["effective_GBps"] = min_bytes / (row["median_ms"] * 1e-3) / 1e9
        results[name] = row
        print(f"{name:12s} {row['median_ms']:7.3f} ms (min {row['min_ms']:.3f}), host "
              f"{row['host_median_ms']:.3f} ms, {row['effective_GBps']:.0f} GB/s", flush=True)
    summary = {"speedup": results["torch_fused"]["median_ms"] / results["triton"]["median_ms"]}
    print(f"TritonAdamW {summary['speedup']:.2f}x torch's fused AdamW")
    hyper = cfg["on"]
    config = {"preset": args.preset, "dtype": args.dtype, "tensors": len(params), "numel": numel,
              "min_bytes_per_step": min_bytes, "tensors_in_kernel": kernel_tensors,
              "block": cuda_optim_kernels.BLOCK, "lr": hyper.lr, "betas": [hyper.beta1, hyper.beta2],
              "eps": hyper.eps, "weight_decay": hyper.weight_decay,
              "groups": [len(g["params"]) for g in opts["triton"].param_groups],
              "iters": args.iters, "warmup": args.warmup, "seed": args.seed}
    return {"bench": "optimizer", "env": environment(), "config": config, "check": check,
            "results": results, "summary": summary}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="moe-1b")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--iters", type=int, default=30, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.iters < 20:
        ap.error("--iters: at least 20 timed steps for a stable median")
    doc = run(args)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
