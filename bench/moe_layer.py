"""One MoE FFN layer, forward + backward: anymoe vs a naive loop vs transformers vs the dense floor.

Issue 9's configs (bf16, SwiGLU experts, softmax top-k router, norm_topk):

    A Mixtral-like   d=4096 f=14336 E=8  k=2 T=8192
    B DeepSeek-like  d=2048 f=1408  E=64 k=6 T=16384
    C small          d=1024 f=2816  E=16 k=2 T=8192

Every variant computes the same function from the same weights and input. Correctness
first: each variant's output and gradients (x, w13, w2) against a float32 reference on the
same routing. Then the median of many CUDA-event-timed fwd+bwd iterations.

Variants:
    dense_floor     the same FLOPs (18*T*k*d*f) as six plain dense GEMMs: the floor
    grouped_gemms   the two grouped GEMMs alone, fwd+bwd, on pre-sorted rows
    anymoe_fast     router + anymoe.core.dispatch_fast with the Triton kernels
    anymoe_twin     the same with the pure-torch ops (what other backends run)
    anymoe_layer    anymoe.core.moe.MoELayer on the cuda backend (when importable)
    anymoe_layer_compiled  the same layer through torch.compile, mode reduce-overhead (CUDA
                    graphs) with the traceable grouped matmul: a block under train.compile
    hf_block        transformers' Qwen3MoeSparseMoeBlock, experts_implementation=grouped_mm
    naive_loop      a per-expert python loop (host syncs), the textbook version

Routing: "balanced" (random router) and "zipf" (router logits biased by -log(rank+1),
through a shared input direction, so every variant routes identically); the measured
max/mean expert load is recorded.

    PYTHONPATH=. python bench/moe_layer.py --out bench/results/moe_layer_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from anymoe.core import dispatch_fast as dfast


@dataclass(frozen=True)
class Shape:
    name: str
    d: int
    f: int
    E: int
    k: int
    T: int

    @property
    def flops(self) -> float:  # fwd + bwd of the expert GEMMs (issue 9's count)
        return 18.0 * self.T * self.k * self.d * self.f


SHAPES = {
    "A": Shape("A", 4096, 14336, 8, 2, 8192),
    "B": Shape("B", 2048, 1408, 64, 6, 16384),
    "C": Shape("C", 1024, 2816, 16, 2, 8192),
    "tiny": Shape("tiny", 64, 96, 8, 2, 256),
}
ZIPF_S = 1.0  # logits bias -s*log(rank+1)
ANCHOR_MS = {  # issue 9's measurements on the H100: transformers block and dense floor
    "A": {"hf": 37.2, "floor": 30.0}, "B": {"hf": 22.4, "floor": 10.8}, "C": {"hf": 4.26, "floor": 2.34},
}


# ---------------------------------------------------------------- problem + routing


def make_problem(s: Shape, routing: str, dev, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(s.T, s.d, generator=gen)
    wr = torch.randn(s.E, s.d, generator=gen) / math.sqrt(s.d)  # logits ~ N(0, 1)
    if routing == "zipf":
        # A shared direction u in every token (x.u ~ 8) and a router row component
        # -s*log(rank+1)/8 along it: each logit gains about -s*log(rank+1).
        u = torch.randn(s.d, generator=gen)
        u /= u.norm()
        x += 8.0 * u
        wr += torch.outer(-ZIPF_S * torch.log(torch.arange(1, s.E + 1.0)) / 8.0, u)
    w13 = torch.randn(s.E, s.d, 2 * s.f, generator=gen) / math.sqrt(s.d)
    w2 = torch.randn(s.E, s.f, s.d, generator=gen) / math.sqrt(s.f)
    gy = torch.randn(s.T, s.d, generator=gen)
    to = dict(device=dev, dtype=dtype)
    return {"x": x.to(**to), "wr": wr.to(**to), "w13": w13.to(**to), "w2": w2.to(**to), "gy": gy.to(**to)}


def route(x, wr, k):
    """Softmax top-k router, normalised top-k weights; router math in fp32 (bf16 logits
    flip near-ties between implementations)."""
    probs = torch.softmax(x.float() @ wr.float().t(), dim=-1)
    w, ids = probs.topk(k, dim=-1)
    return ids, w / w.sum(-1, keepdim=True)


def reference(p, ids, w):
    """Float32 per-expert loop on the given routing: out, and grads of x, w13, w2."""
    leaves = {n: p[n].float().clone().requires_grad_() for n in ("x", "w13", "w2")}
    x, w13, w2 = leaves["x"], leaves["w13"], leaves["w2"]
    out = torch.zeros_like(x)
    Fh = w2.shape[1]
    for e in range(w13.shape[0]):
        t, slot = torch.where(ids == e)
        h = x[t] @ w13[e]
        y = (F.silu(h[:, :Fh]) * h[:, Fh:]) @ w2[e]
        out = out.index_add(0, t, y * w[t, slot, None].float())
    out.backward(p["gy"].float())
    return out.detach(), {n: v.grad for n, v in leaves.items()}


# ---------------------------------------------------------------- variants
# Each builder returns (params: dict name->leaf, fwd(x) -> out, experts_fn(x, ids, w) -> out
# on a given routing, for the correctness check; None where routing is internal).


def build_anymoe_fast(p, s, gmm, ops):
    params = {n: p[n].clone().requires_grad_() for n in ("wr", "w13", "w2")}

    def experts(x, ids, w):
        return dfast.moe_ffn_fast(x, ids, w, params["w13"], params["w2"], gmm, ops)

    def fwd(x):
        ids, w = route(x, params["wr"], s.k)
        return experts(x, ids, w)

    return params, fwd, experts


def build_naive(p, s, gmm):
    params = {n: p[n].clone().requires_grad_() for n in ("wr", "w13", "w2")}

    def experts(x, ids, w):
        out = torch.zeros_like(x)
        for e in range(s.E):
            t, slot = torch.where(ids == e)  # host sync per expert
            h = x[t] @ params["w13"][e]
            y = (F.silu(h[:, : s.f]) * h[:, s.f :]) @ params["w2"][e]
            out = out.index_add(0, t, (y.float() * w[t, slot, None]).to(x.dtype))
        return out

    def fwd(x):
        ids, w = route(x, params["wr"], s.k)
        return experts(x, ids, w)

    return params, fwd, experts


def build_hf(p, s):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=s.d, moe_intermediate_size=s.f, num_experts=s.E,
                         num_experts_per_tok=s.k, norm_topk_prob=True)
    cfg._experts_implementation = "grouped_mm"
    block = Qwen3MoeSparseMoeBlock(cfg).to(p["x"].device, p["x"].dtype)
    with torch.no_grad():
        block.gate.weight.copy_(p["wr"])
        block.experts.gate_up_proj.copy_(p["w13"].transpose(1, 2))  # [E, 2F, D], gate rows first
        block.experts.down_proj.copy_(p["w2"].transpose(1, 2))  # [E, D, F]
    params = {"wr": block.gate.weight, "w13": block.experts.gate_up_proj, "w2": block.experts.down_proj}

    def experts(x, ids, w):
        return block.experts(x, ids, w.to(x.dtype))

    return params, (lambda x: block(x.unsqueeze(0)).squeeze(0)), experts, block


def build_anymoe_layer(p, s):
    """moe-core's MoELayer on the cuda backend's grouped_mm, weights copied in (fused w13)."""
    from anymoe.core.backend import get_backend
    from anymoe.core.moe import MoEConfig, MoELayer
    from anymoe.core.router import RouterConfig

    backend = get_backend("auto")  # cuda on the GPU machine; cpu for a smoke run
    cfg = MoEConfig(num_experts=s.E, top_k=s.k, expert_hidden=s.f, fused_w13=True,
                    router=RouterConfig(normalize_topk=True))
    layer = MoELayer(cfg, s.d, grouped_mm=backend.grouped_mm).to(p["x"].device, p["x"].dtype)
    with torch.no_grad():
        layer.router.weight.copy_(p["wr"])
        layer.experts.w13.copy_(p["w13"])
        layer.experts.w2.copy_(p["w2"])
    params = {"wr": layer.router.weight, "w13": layer.experts.w13, "w2": layer.experts.w2}

    def experts(x, ids, w):
        x_ND, counts, meta = layer.dispatcher.dispatch(x, ids, w)
        return layer.dispatcher.combine(layer.experts(x_ND, counts), meta)

    return params, (lambda x: layer(x)[0]), experts, layer


def _fused_swiglu_forward(self, x_ND, counts_E):
    """Experts.forward with the one-pass SwiGLU (what moe-core can adopt for fused_w13)."""
    h = self.grouped_mm(x_ND, self.w13, counts_E)
    return self.grouped_mm(dfast.swiglu(h), self.w2, counts_E)


def layer_variants(p, s):
    """(name, builder) for the layer as shipped, with FastLocalDispatcher, and with both
    FastLocalDispatcher and the fused SwiGLU; one layer object, parts swapped in turn."""
    import types

    try:
        params, fwd, experts, layer = build_anymoe_layer(p, s)
    except ImportError as exc:
        return [("anymoe_layer", None, f"anymoe.core.moe not importable: {exc}")]
    shipped = layer.dispatcher

    def as_shipped():
        layer.dispatcher = shipped
        layer.experts.forward = types.MethodType(type(layer.experts).forward, layer.experts)
        return params, fwd, experts

    def fast_dispatch():
        layer.dispatcher = dfast.FastLocalDispatcher(s.E)
        return params, fwd, experts

    def fast_all():
        fast_dispatch()
        layer.experts.forward = types.MethodType(_fused_swiglu_forward, layer.experts)
        return params, fwd, experts

    def compiled():
        # What `train.compile: blocks_cudagraphs` gives a block: the layer through torch.compile
        # (mode reduce-overhead: CUDA graphs) on a grouped matmul that traces whole.
        as_shipped()
        eager_out = fwd(p["x"]).detach()
        if p["x"].device.type == "cuda":
            from anymoe.backends.cuda_kernels import grouped_mm_direct

            layer.experts.grouped_mm = grouped_mm_direct
        on_gpu = p["x"].device.type == "cuda"  # CPU smoke runs trace only (aot_eager: no C++ build)
        graphed = (torch.compile(layer, mode="reduce-overhead") if on_gpu
                   else torch.compile(layer, backend="aot_eager"))

        def cfwd(x):
            torch.compiler.cudagraph_mark_step_begin()
            return graphed(x)[0]

        compiled_out = cfwd(p["x"]).detach().clone()
        COMPILED_VS_EAGER[s.name] = rel(compiled_out, eager_out)
        return params, cfwd, experts

    return [("anymoe_layer", as_shipped, ""), ("anymoe_layer_fastdisp", fast_dispatch, ""),
            ("anymoe_layer_fastall", fast_all, ""), ("anymoe_layer_compiled", compiled, "")]


COMPILED_VS_EAGER: dict[str, float] = {}  # config -> rel. difference of compiled vs eager layer output


# ---------------------------------------------------------------- timing


def time_fwd_bwd(fn, x, gy, params, iters, warmup, sync):
    """Median and spread (ms) of event-timed forward+backward."""
    leaves = [x, *params]

    def step():
        for t in leaves:
            t.grad = None
        fn(x).backward(gy)

    return _time_plain(step, iters, warmup, sync)


def time_dense_floor(s, dev, dtype, iters, warmup, sync):
    R = s.T * s.k
    g = torch.Generator(device=dev).manual_seed(1)
    mk = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype, generator=g)  # noqa: E731
    x, w13, act, w2 = mk(R, s.d), mk(s.d, 2 * s.f), mk(R, s.f), mk(s.f, s.d)
    dy, dh = mk(R, s.d), mk(R, 2 * s.f)

    def six():
        x @ w13  # forward
        act @ w2
        dy @ w2.t()  # backward: data grads, then weight grads
        act.t() @ dy
        dh @ w13.t()
        x.t() @ dh

    return _time_plain(six, iters, warmup, sync)


def time_dense_mlp(s, dev, dtype, iters, warmup, sync):
    """A dense SwiGLU MLP on all T*k rows, fwd+bwd through autograd: the floor's GEMMs plus
    the activation an MoE cannot avoid either."""
    R = s.T * s.k
    g = torch.Generator(device=dev).manual_seed(2)
    mk = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype, generator=g)  # noqa: E731
    x = mk(R, s.d).requires_grad_()
    w13 = (mk(s.d, 2 * s.f) / math.sqrt(s.d)).requires_grad_()
    w2 = (mk(s.f, s.d) / math.sqrt(s.f)).requires_grad_()
    gy = mk(R, s.d)

    def fn(x):
        gate, up = (x @ w13).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w2

    return time_fwd_bwd(fn, x, gy, [w13, w2], iters, warmup, sync)


def time_graphed(fwd, p, params, iters, warmup, sync):
    """fwd+bwd captured once as a CUDA graph, timed over replays: the GPU time without the
    host's launch overhead (what torch.compile(mode="reduce-overhead") would reach)."""
    x = p["x"].clone().requires_grad_()
    leaves = [x, *params]

    def step():
        return torch.autograd.grad(fwd(x), leaves, p["gy"])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return _time_plain(graph.replay, iters, warmup, sync)


def host_ms(fwd, p, params, iters=10):
    """Host time to issue one fwd+bwd (no sync inside): above the GPU time means launch-bound."""
    x = p["x"].clone().requires_grad_()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.autograd.grad(fwd(x), [x, *params], p["gy"])
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def profile_table(fwd, p, params, path, rows=18):
    """Kernel-level profile of a few fwd+bwd iterations; the table is written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    x = p["x"].clone().requires_grad_()
    for _ in range(2):
        torch.autograd.grad(fwd(x), [x, *params], p["gy"])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            torch.autograd.grad(fwd(x), [x, *params], p["gy"])
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    with open(path, "a") as fh:
        fh.write(table + "\n")
    return table


def time_grouped(s, p, ids, gmm, iters, warmup, sync):
    """The two grouped GEMMs fwd+bwd on pre-sorted rows (the gradient each one receives is
    random: this times the GEMMs alone, not the activation between them)."""
    index = dfast.build_route_index(ids, s.E)
    xs = p["x"].index_select(0, index.src_token_R).requires_grad_()
    act = torch.randn(xs.shape[0], s.f, device=xs.device, dtype=xs.dtype, requires_grad=True)
    w13, w2 = p["w13"].clone().requires_grad_(), p["w2"].clone().requires_grad_()
    gh = torch.randn(xs.shape[0], 2 * s.f, device=xs.device, dtype=xs.dtype)
    gy = torch.randn(xs.shape[0], s.d, device=xs.device, dtype=xs.dtype)

    def fn():
        for t in (xs, act, w13, w2):
            t.grad = None
        h = gmm(xs, w13, index.counts_E)
        y = gmm(act, w2, index.counts_E)
        torch.autograd.backward([h, y], [gh, gy])

    return _time_plain(fn, iters, warmup, sync)


class _HostEvent:
    """perf_counter stand-in for torch.cuda.Event (CPU smoke runs)."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def _event():
    return torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else _HostEvent()


def _time_plain(fn, iters, warmup, sync):
    times = []
    for i in range(warmup + iters):
        start, end = _event(), _event()
        start.record()
        fn()
        end.record()
        sync()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


# ---------------------------------------------------------------- main


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check(name, experts, params_map, p, ids, w, ref_out, ref_grads):
    x = p["x"].clone().requires_grad_()
    for t in params_map.values():
        t.grad = None
    out = experts(x, ids, w)
    out.backward(p["gy"])
    errs = {"out": rel(out, ref_out), "x": rel(x.grad, ref_grads["x"])}
    g13, g2 = params_map["w13"].grad, params_map["w2"].grad
    if name == "hf_block":  # HF stores transposed weights
        g13, g2 = g13.transpose(1, 2), g2.transpose(1, 2)
    errs["w13"], errs["w2"] = rel(g13, ref_grads["w13"]), rel(g2, ref_grads["w2"])
    errs["ok"] = all(math.isfinite(v) and v < 2e-2 for v in errs.values())
    return errs


def run(args):
    import anymoe.backends.cuda_kernels as ck
    from anymoe.core import grouped_mm as gmm_mod

    if torch.cuda.is_available():
        dev, dtype, sync = torch.device("cuda"), torch.bfloat16, torch.cuda.synchronize
        gmm, fast_ops = gmm_mod.grouped_mm_torch, ck.TRITON_OPS
    else:  # smoke run of the script itself: tiny shapes, fp32, loop GEMMs, torch ops
        dev, dtype, sync = torch.device("cpu"), torch.float32, (lambda: None)
        gmm, fast_ops = gmm_mod.grouped_mm_loop, dfast.TORCH_OPS
    results = []
    for name in args.configs:
        s = SHAPES[name]
        iters = args.iters if s.name != "A" else max(10, args.iters // 2)
        floor = time_dense_floor(s, dev, dtype, iters, args.warmup, sync)
        mlp = time_dense_mlp(s, dev, dtype, iters, args.warmup, sync)
        for routing in args.routing:
            p = make_problem(s, routing, dev, dtype)
            ids, w = route(p["x"], p["wr"], s.k)
            load = torch.bincount(ids.flatten(), minlength=s.E).float()
            ref_out, ref_grads = reference(p, ids, w)
            row = {"config": asdict(s), "routing": routing, "dense_floor_ms": floor[0],
                   "dense_mlp_ms": mlp[0], "variants": {},
                   "max_over_mean_load": float(load.max() / load.mean())}
            row["variants"]["grouped_gemms"] = _entry(time_grouped(s, p, ids, gmm, iters, args.warmup, sync),
                                                      s, floor, None)
            builders = {
                "anymoe_fast": lambda p=p, s=s: build_anymoe_fast(p, s, gmm, fast_ops),
                "anymoe_twin": lambda p=p, s=s: build_anymoe_fast(p, s, gmm, dfast.TORCH_OPS),
                "hf_block": lambda p=p, s=s: build_hf(p, s)[:3],
                "naive_loop": lambda p=p, s=s: build_naive(p, s, gmm),
            }
            for vname in args.variants:
                if vname not in builders:
                    continue
                params, fwd, experts = builders[vname]()
                errs = check(vname, experts, params, p, ids, w, ref_out, ref_grads)
                n = iters if vname != "naive_loop" else max(5, iters // 4)
                x = p["x"].clone().requires_grad_()
                timing = time_fwd_bwd(fwd, x, p["gy"], list(params.values()), n, args.warmup, sync)
                row["variants"][vname] = _entry(timing, s, floor, errs)
                if vname in ("anymoe_fast", "hf_block") and dev.type == "cuda":
                    plist = list(params.values())
                    row["variants"][vname]["host_issue_ms"] = host_ms(fwd, p, plist)
                    if vname == "anymoe_fast":
                        row["variants"]["anymoe_fast_graph"] = _entry(
                            time_graphed(fwd, p, plist, iters, args.warmup, sync), s, floor, None)
                    if args.profile and routing == "balanced":
                        profile_table(fwd, p, plist, args.profile + f".{s.name}.{vname}.txt")
                del params, fwd, experts
                torch.cuda.empty_cache()
            if "anymoe_layer" in args.variants:
                for vname, builder, why in layer_variants(p, s):
                    if builder is None:
                        row["variants"][vname] = {"skipped": why}
                        continue
                    params, fwd, experts = builder()
                    errs = check(vname, experts, params, p, ids, w, ref_out, ref_grads)
                    x = p["x"].clone().requires_grad_()
                    timing = time_fwd_bwd(fwd, x, p["gy"], list(params.values()), iters, args.warmup, sync)
                    row["variants"][vname] = _entry(timing, s, floor, errs)
                    if vname == "anymoe_layer_compiled":
                        row["variants"][vname]["rel_err_vs_eager_layer"] = COMPILED_VS_EAGER.get(s.name)
                    if dev.type == "cuda" and vname != "anymoe_layer_compiled":
                        row["variants"][vname]["host_issue_ms"] = host_ms(fwd, p, list(params.values()))
                        if args.profile and routing == "balanced" and vname == "anymoe_layer_fastall":
                            prof_path = args.profile + f".{s.name}.{vname}.txt"
                            profile_table(fwd, p, list(params.values()), prof_path)
                torch.cuda.empty_cache()
            results.append(row)
            _print_row(row)
            del p, ref_out, ref_grads
            torch.cuda.empty_cache()
    return results


def _entry(timing, s, floor, errs):
    med, lo, hi = timing
    e = {"median_ms": med, "min_ms": lo, "max_ms": hi, "x_floor": med / floor[0],  # GEMM-only floor
         "tflops": s.flops / (med * 1e-3) / 1e12}
    if errs is not None:
        e["rel_err"] = errs
    return e


def _print_row(row):
    c = row["config"]
    print(f"\n[{c['name']} {row['routing']}] d={c['d']} f={c['f']} E={c['E']} k={c['k']} T={c['T']} "
          f"load max/mean={row['max_over_mean_load']:.2f} dense GEMM floor {row['dense_floor_ms']:.3f} ms, "
          f"dense SwiGLU MLP {row['dense_mlp_ms']:.3f} ms")
    for v, e in row["variants"].items():
        if "skipped" in e:
            print(f"  {v:14s} skipped: {e['skipped']}")
            continue
        ok = e.get("rel_err", {}).get("ok", "-")
        err = e.get("rel_err", {}).get("out", float("nan"))
        host = f" host {e['host_issue_ms']:.2f} ms" if "host_issue_ms" in e else ""
        print(f"  {v:17s} {e['median_ms']:8.3f} ms  {e['x_floor']:5.2f}x floor  {e['tflops']:6.1f} TFLOP/s  "
              f"err {err:.1e} ok={ok}{host}")
    sys.stdout.flush()


def environment():
    gpu = torch.cuda.is_available()
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu",
           "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if gpu else None,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["A", "B", "C"], choices=sorted(SHAPES))
    ap.add_argument("--routing", nargs="+", default=["balanced", "zipf"], choices=["balanced", "zipf"])
    ap.add_argument("--variants", nargs="+",
                    default=["anymoe_fast", "anymoe_twin", "anymoe_layer", "hf_block", "naive_loop"])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--profile", default="", help="path prefix for kernel profile tables (balanced routing)")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    results = run(args)
    doc = {"bench": "moe_layer", "env": environment(), "dtype": "bfloat16", "zipf_s": ZIPF_S,
           "flops_formula": "18*T*k*d*f (fwd+bwd expert GEMMs)", "iters": args.iters,
           "anchors_issue9_ms": ANCHOR_MS, "results": results}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"\nwrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
