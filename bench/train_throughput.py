"""Full training steps on one GPU: anymoe's MoE transformer vs transformers' Qwen3-MoE, same shape.

The issue-9 shape (preset ``moe-1b``): d=1024, 12 layers, 16 heads / 4 KV heads, head_dim 64,
64 experts, top-8, expert hidden 512, vocab 32000, untied: 1.306B total, 216M active.
Batch 8 x 2048 tokens, bf16 parameters, router aux loss on, random tokens. Optimizer: torch's
fused AdamW for transformers; for anymoe the AdamW its trainer builds (``--optimizer torch``:
torch's fused AdamW for all).

For each variant: median step time (CUDA events around one step that starts on an idle GPU)
-> tokens/s, MFU against the datasheet peak (FLOPs per token = 6 * active params + 12 * layers
* seq * heads * head_dim, issue 9), peak memory; the mean step time of the same steps run back
to back (``loop_*``: the host issues the next step while the GPU finishes this one, as in a
training loop that reads the loss only when it logs); optionally with activation
checkpointing; and a kernel-time profile of two steps bucketed by phase (expert GEMMs, dense
GEMMs, attention, dispatch, optimizer, ...).

Variants:
    hf            transformers Qwen3MoeForCausalLM, experts_implementation=grouped_mm, sdpa
    anymoe        anymoe MoETransformer as built by default (LocalDispatcher, eager SwiGLU)
    anymoe_fast   the same model with FastLocalDispatcher (Triton permute/combine) and the
                  one-pass SwiGLU in the experts (fused w13)
    anymoe_fast_compiled     + regional torch.compile of each block (grouped_mm_direct)
    anymoe_fast_compiled_cg  + mode="reduce-overhead" (CUDA graphs: no launch gaps)
    anymoe_trainer_compile   the shipped option: the model as the trainer builds it (preset
                  defaults: fast dispatcher, fused w13 with the one-pass SwiGLU) through
                  anymoe.trainers.compile.compile_blocks(..., "blocks_cudagraphs")

    PYTHONPATH=. python bench/train_throughput.py --out bench/results/train_throughput_h100.json
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import statistics
import sys
import time
import types

import torch

from anymoe.core import dispatch_fast as dfast
from anymoe.core.losses import cross_entropy_sum

H100_PEAK_BF16 = 989e12  # dense bf16 datasheet peak (issue 9's MFU denominator)
SHAPE = dict(d=1024, layers=12, heads=16, kv_heads=4, head_dim=64, experts=64, top_k=8, expert_hidden=512,
             vocab=32000)
AUX_COEF = 0.01  # router aux loss coefficient (anymoe's moe-1b preset; the same for transformers)
ANCHOR = {"hf_tokens_per_s": 76570, "hf_step_s": 0.214, "hf_mfu": 0.124, "hf_peak_gib": 31.8}


def flops_per_token(active_params: int, seq: int) -> float:
    s = SHAPE
    return 6.0 * active_params + 12.0 * s["layers"] * seq * s["heads"] * s["head_dim"]


# ------------------------------------------------------------------------------ models


def build_hf(dev):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    s = SHAPE
    cfg = Qwen3MoeConfig(vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=4 * s["d"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], num_experts=s["experts"],
                         num_experts_per_tok=s["top_k"], moe_intermediate_size=s["expert_hidden"],
                         norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=AUX_COEF,
                         tie_word_embeddings=False, max_position_embeddings=4096, decoder_sparse_step=1,
                         mlp_only_layers=[])
    cfg._experts_implementation = "grouped_mm"
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).to(dev, torch.bfloat16)
    model.config.use_cache = False
    active = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    active -= s["layers"] * (s["experts"] - s["top_k"]) * 3 * s["d"] * s["expert_hidden"]

    def loss_fn(ids, labels):
        out = model(input_ids=ids, labels=labels)  # CE (fp32 upcast inside) + aux_coef * aux loss
        return out.loss

    def checkpointing(on):
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    return model, loss_fn, active, checkpointing


def build_anymoe(dev, fast, compiled=False):
    """compiled: False, "default" (regional torch.compile) or "reduce-overhead" (+ CUDA graphs)."""
    from anymoe.core.backend import get_backend
    from anymoe.models.presets import preset

    cfg = preset("moe-1b", moe={"fused_w13": True, "balance": {"aux_loss": AUX_COEF, "z_loss": 0.0}})
    backend = get_backend("cuda")
    torch.manual_seed(0)
    from anymoe.models.transformer import MoETransformer

    dispatcher = dfast.FastLocalDispatcher(cfg.moe.num_experts) if fast else None
    model = MoETransformer(cfg, backend=backend, dispatcher=dispatcher)
    if compiled:
        from anymoe.backends.cuda_kernels import grouped_mm_direct

        for layer in model.moe_layers():  # no data-pointer probe: one graph per block
            layer.experts.grouped_mm = grouped_mm_direct
    if fast:
        for layer in model.moe_layers():
            layer.experts.forward = types.MethodType(_fused_swiglu_forward, layer.experts)
    model = model.to(dev, torch.bfloat16)
    active = model.num_parameters(active=True)
    if compiled:
        # Regional compilation: each decoder block through torch.compile (one graph shared by
        # the 12 instances), fusing norms, RoPE, router math and residual adds.
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        for block in model.blocks:
            block.compile(mode=None if compiled == "default" else compiled)

    return _anymoe_built(model, active)


def build_anymoe_trainer_compile(dev, checkpointing=False):
    """``train.compile: blocks_cudagraphs`` as shipped: MoETransformer as the trainer builds it
    (the preset's fused w13; the fast dispatcher and one-pass SwiGLU are the defaults), then the
    trainer's compile_blocks (the backend's traceable grouped GEMM, recompile limit, in-place
    block.compile). bf16 parameters and no autocast, like the other variants here.
    checkpointing: full activation checkpointing with ``train.compile: blocks`` (the trainer
    refuses CUDA graphs with checkpointing; the recomputed block body is what gets compiled)."""
    from anymoe.core.backend import get_backend
    from anymoe.models.presets import preset
    from anymoe.models.transformer import MoETransformer
    from anymoe.trainers.compile import compile_blocks

    cfg = preset("moe-1b", moe={"balance": {"aux_loss": AUX_COEF, "z_loss": 0.0}},
                 checkpointing="full" if checkpointing else "none")
    backend = get_backend("cuda")
    torch.manual_seed(0)
    model = MoETransformer(cfg, backend=backend).to(dev, torch.bfloat16)
    compile_blocks(model, backend, "blocks" if checkpointing else "blocks_cudagraphs")
    model, loss_fn, active, _ = _anymoe_built(model, model.num_parameters(active=True))

    def fixed(on):  # checkpointing is chosen before compiling, as the trainer does
        if on != checkpointing:
            raise ValueError("build another anymoe_trainer_compile model to change checkpointing")
    return model, loss_fn, active, fixed


def _anymoe_built(model, active):
    def loss_fn(ids, labels):
        # The trainer's loss: the fused cross-entropy (no fp32 copy of the logits), as a mean.
        out = model(ids, return_aux=True)
        ce = cross_entropy_sum(out.logits.view(-1, out.logits.shape[-1]), labels.view(-1), -100)
        return ce / (labels != -100).sum() + out.aux_loss

    def checkpointing(on):
        model.set_checkpointing("full" if on else "none")
    return model, loss_fn, active, checkpointing


def _fused_swiglu_forward(self, x_ND, counts_E):
    """Experts.forward on fused w13 with the one-pass SwiGLU kernel (dispatch_fast.swiglu)."""
    h = self.grouped_mm(x_ND, self.w13, counts_E)
    return self.grouped_mm(dfast.swiglu(h), self.w2, counts_E)


# ------------------------------------------------------------------------------ measurement


def batch(dev, b, s, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, SHAPE["vocab"], (b, s + 1), generator=g).to(dev)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def run_variant(name, built, args, dev):
    model, loss_fn, active, checkpointing = built
    checkpointing(args.ckpt)
    opt = build_opt(name, model, args.optimizer)
    data = [batch(dev, args.batch, args.seq, i) for i in range(4)]

    def step(i):
        torch.compiler.cudagraph_mark_step_begin()  # CUDA-graph variants: a new step; else no-op
        ids, labels = data[i % len(data)]
        loss = loss_fn(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        loss = step(i)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
        losses.append(float(loss))
    med = statistics.median(times)
    tokens = args.batch * args.seq
    # The same steps back to back, one sync at the end (how a training loop runs when it reads
    # the loss only every few steps): the host issues step i+1 while the GPU finishes step i.
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for i in range(args.steps):
        step(i)
    b.record()
    torch.cuda.synchronize()
    loop = a.elapsed_time(b) / 1e3 / args.steps
    tps = tokens / med
    fpt = flops_per_token(active, args.seq)
    res = {"variant": name, "checkpointing": args.ckpt, "optimizer": type(opt).__name__,
           "step_s": med, "step_s_min": min(times),
           "step_s_max": max(times), "tokens_per_s": tps, "mfu": tps * fpt / H100_PEAK_BF16,
           "loop_step_s": loop, "loop_tokens_per_s": tokens / loop,
           "achieved_tflops": tps * fpt / 1e12, "active_params": active,
           "total_params": sum(p.numel() for p in model.parameters()), "flops_per_token": fpt,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
           "loss_first_last": [losses[0], losses[-1]], "host_issue_s": host_time(step, args.warmup)}
    if args.profile and not args.ckpt:
        path = ""
        if args.out:  # beside the JSON, in profiles/ (keeps the result folder short)
            folder = os.path.join(os.path.dirname(args.out) or ".", "profiles")
            os.makedirs(folder, exist_ok=True)
            stem = os.path.basename(args.out).replace(".json", "")
            path = os.path.join(folder, f"{stem}.{name}.prof.txt")
        trace = path.replace(".prof.txt", ".trace.json") if path and name in args.trace_variants else ""
        res["profile"] = profile_phases(step, path, trace)
    return res


def build_opt(name, model, which):
    """transformers: torch's fused AdamW (torch's fastest AdamW). anymoe: the
    optimizer its trainer builds (``optim.fused: auto``: the backend's AdamW, Triton multi-tensor
    on CUDA), or torch's fused one with ``--optimizer torch``. Same lr, weight decay and betas."""
    if name == "hf" or which == "torch":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    from anymoe.core.backend import get_backend
    from anymoe.trainers.optim import OptimConfig, build_optimizer

    cfg = OptimConfig(lr=1e-4, min_lr=0.0, weight_decay=0.1, beta1=0.9, beta2=0.999, warmup_steps=0)
    return build_optimizer(model, cfg, get_backend("cuda"))


def host_time(step, i0, n=3):
    """Host seconds to issue one step when the GPU is idle at its start (launch-bound check)."""
    out = []
    for i in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(i0 + i)  # float(loss) is not read: no sync inside
        out.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(out)


PHASES = [  # (phase, substrings of kernel names), first match wins
    ("dispatch (anymoe triton)", ("_gather_rows", "_gather_sum", "_combine_", "_swiglu_")),
    ("expert grouped GEMMs", ("GroupProblemShape", "grouped", "Grouped")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "_efficient_attention")),
    ("dense GEMMs", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "Kernel2")),
    ("optimizer", ("multi_tensor", "fused_adam", "FusedAdam", "_fused_adamw", "_adamw_kernel")),
    ("sort / scan / index", ("sort", "Sort", "scan", "Scan", "index", "gather", "scatter", "topk", "TopK")),
    ("softmax / norms / reductions", ("softmax", "reduce", "norm", "Norm", "cross_entropy", "nll")),
    ("elementwise / copies", ("elementwise", "vectorized", "copy", "Memcpy", "Memset", "fill", "cat")),
]


def profile_phases(step, path, trace=""):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        a.record()
        for i in range(2):
            step(i)
        b.record()
        torch.cuda.synchronize()
    buckets: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if not t or ev.key.startswith(("aten::", "autograd::", "anymoe::", "Optimizer")):
            continue
        kernels[ev.key] = kernels.get(ev.key, 0.0) + t
        phase = next((p for p, keys in PHASES if any(k in ev.key for k in keys)), "other")
        buckets[phase] = buckets.get(phase, 0.0) + t / 2e3  # ms per step
    if trace:  # the kernel timeline (Chrome trace format), gzipped: where the GPU idles
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            dst.write(src.read())
        os.remove(trace)
    busy = sum(buckets.values())
    buckets["GPU idle (launch gaps, host syncs)"] = max(0.0, a.elapsed_time(b) / 2 - busy)
    if path:
        with open(path, "w") as fh:
            for k, t in sorted(kernels.items(), key=lambda kv: -kv[1])[:60]:
                fh.write(f"{t / 2e3:9.3f} ms/step  {k[:160]}\n")
    return dict(sorted(buckets.items(), key=lambda kv: -kv[1]))


def environment():
    import platform

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["hf", "anymoe", "anymoe_fast", "anymoe_fast_compiled",
                                                      "anymoe_fast_compiled_cg", "anymoe_trainer_compile"])
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--fp32-matmul", default="high", choices=["highest", "high"],
                    help="torch.set_float32_matmul_precision for all variants (high = TF32)")
    ap.add_argument("--ckpt-variants", nargs="+", default=["hf", "anymoe", "anymoe_fast"],
                    help="variants also measured with activation checkpointing")
    ap.add_argument("--optimizer", default="framework", choices=["framework", "torch"],
                    help="anymoe variants: the trainer's AdamW (framework) or torch's fused AdamW")
    ap.add_argument("--trace-variants", nargs="*", default=[],
                    help="variants whose profiled steps are also saved as a gzipped Chrome trace")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    # fp32 matmuls (anymoe's router logits) on TF32 tensor cores, for every variant alike.
    torch.set_float32_matmul_precision(args.fp32_matmul)
    builders = {"hf": lambda: build_hf(dev), "anymoe": lambda: build_anymoe(dev, fast=False),
                "anymoe_fast": lambda: build_anymoe(dev, fast=True),
                "anymoe_fast_compiled": lambda: build_anymoe(dev, fast=True, compiled="default"),
                "anymoe_fast_compiled_cg": lambda: build_anymoe(dev, fast=True, compiled="reduce-overhead"),
                "anymoe_trainer_compile": lambda: build_anymoe_trainer_compile(dev)}
    results = []
    for name in args.variants:
        built = builders[name]()
        for ck in args.checkpointing:
            args.ckpt = ck == "on"
            if args.ckpt and name not in args.ckpt_variants:
                continue
            try:
                if name == "anymoe_trainer_compile" and args.ckpt:
                    del built
                    gc.collect()
                    torch.cuda.empty_cache()
                    built = build_anymoe_trainer_compile(dev, checkpointing=True)
                res = run_variant(name, built, args, dev)
            except torch.OutOfMemoryError as exc:
                res = {"variant": name, "checkpointing": args.ckpt, "error": f"out of memory: {exc}"[:300]}
            except Exception as exc:  # e.g. a torch.compile failure: record it, go on with the rest
                res = {"variant": name, "checkpointing": args.ckpt, "error": repr(exc)[:600]}
            results.append(res)
            _print(res)
            _write(args, results)  # after every variant: a run cut short keeps what it measured
            torch.cuda.empty_cache()
        del built
        gc.collect()
        torch.cuda.empty_cache()
    results = _write(args, results)
    print("\nvariant        ckpt   step s   tokens/s     MFU   peak GiB  vs hf   back to back: step s  vs hf")
    for r in results:
        if "tokens_per_s" in r:
            sp, lsp = r.get("speedup_vs_hf", float("nan")), r.get("loop_speedup_vs_hf", float("nan"))
            print(f"{r['variant']:14s} {str(r['checkpointing']):5s} {r['step_s']:7.4f} "
                  f"{r['tokens_per_s']:10.0f} {100 * r['mfu']:6.1f}% {r['peak_mem_gib']:8.1f}  {sp:.2f}x"
                  f"  {r['loop_step_s']:7.4f} {lsp:.2f}x")
    print(f"wrote {args.out}" if args.out else "")


def _write(args, results):
    base = {r["checkpointing"]: r for r in results if r["variant"] == "hf" and "tokens_per_s" in r}
    for r in results:
        b = base.get(r["checkpointing"])
        if b and "tokens_per_s" in r:
            r["speedup_vs_hf"] = r["tokens_per_s"] / b["tokens_per_s"]
            r["loop_speedup_vs_hf"] = r["loop_tokens_per_s"] / b["loop_tokens_per_s"]
    doc = {"bench": "train_throughput", "env": environment(), "shape": SHAPE, "batch": args.batch,
           "seq": args.seq, "dtype": "bf16 params", "optimizer_choice": args.optimizer, "aux_coef": AUX_COEF,
           "fp32_matmul_precision": args.fp32_matmul,
           "peak_flops": H100_PEAK_BF16, "anchor_issue9": ANCHOR, "results": results}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
    return results


def _print(r):
    if "error" in r:
        print(f"[{r['variant']} ckpt={r['checkpointing']}] {r['error']}")
    else:
        print(f"[{r['variant']} ckpt={r['checkpointing']}] step {r['step_s'] * 1e3:.1f} ms, "
              f"{r['tokens_per_s']:.0f} tok/s, MFU {100 * r['mfu']:.1f}%, peak {r['peak_mem_gib']:.1f} GiB, "
              f"host issue {r['host_issue_s'] * 1e3:.0f} ms, back to back {r['loop_step_s'] * 1e3:.1f} ms, "
              f"loss {r['loss_first_last']}")
        if "profile" in r:
            for k, v in r["profile"].items():
                print(f"    {k:32s} {v:8.2f} ms/step")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
