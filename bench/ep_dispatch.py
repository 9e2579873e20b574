"""Expert-parallel dispatch + combine time vs the raw all_to_all_single of the same bytes.

Issue 4's setting: T=16384 tokens per rank, d=2048, k=6, E=64 experts, bf16, EP over 2 GPUs
(NCCL). Each dispatcher (alltoall, allgather, hierarchical) runs dispatch -> identity
experts -> combine, so the time is the dispatcher's alone (packing, split exchange, host
reads of the splits, the all-to-alls, local sort, weighted combine). In the same run:

    raw_same_bytes_ms   all_to_all_single with the alltoall dispatcher's exact splits (one way)
    raw_round_trip_ms   two of those (dispatch and combine each move the rows once)
    raw_per_pair_ms     all_to_all_single of T*k rows split evenly: a per-(token, expert)
                        dispatcher's volume (384 MiB per rank at the issue's shape; the issue
                        quotes 0.81 ms for it measured elsewhere)

The issue's target: dispatch + combine within 1.5x of the raw all-to-all time. Correctness
first: identity experts give out = x * sum_k w (in fp32) on every rank, checked before
timing. Timings: median over iterations of the slowest rank (host clock around a device
synchronize), forward only and forward + backward.

Where the time goes, per dispatcher (the JSON's ``breakdown``; rank 0):

    phases          per phase of the dispatcher (``ep/<phase>`` profiler ranges, anymoe.core.ep_rows.phase):
                    host_ms (host time inside the phase, host syncs included), device_ms (kernel
                    time launched from it), kernels (count), per iteration of dispatch + combine
    device_busy_ms  union of all device activity per iteration; dispatch_combine_ms minus it is
                    the device idle time (host syncs, launch latency)
    top_kernels     the kernels taking the most device time, with their phase
    backward        the same for forward + backward, bucketed by autograd node
    host_sync_sites file:line -> count of the host syncs (CUDA sync debug mode) in one dispatch + combine

``--nproc 1`` (one GPU): every dispatcher over an EP group of one, whose collectives are the
identity (a local hop still packs, sorts and combines). That isolates the local overhead that
the 2-GPU number pays on top of the wire time; ``fast_local`` (the one-rank fast dispatcher
of the MoE layer: one sort, one gather, one fused combine) is the floor for it. At world 1 the
rows per hop are T (at EP 2 about 2T), the pairs sorted are T*k at both.

    python bench/ep_dispatch.py --nproc 2 --out bench/results/ep_dispatch_h200x2.json
    python bench/ep_dispatch.py --nproc 1 --full --out $OUT/ep1.json          # 1-GPU proxy
    torchrun --standalone --nproc_per_node 2 bench/ep_dispatch.py --out ...
    python bench/ep_dispatch.py --nproc 2 --out /tmp/ep.json   # on the CPU: smoke sizes (--full: the issue's)

alltoall is the one-hop dispatcher of anymoe.core.ep_dispatch; alltoall_oneread
(anymoe.core.ep_alltoall, sender-computed receiver slots) can be added with --dispatchers; the
hierarchical one takes two generic hops (anymoe.core.ep_dispatch.hop), one where a level has
one member.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anymoe.core import collectives as C  # noqa: E402
from anymoe.core.backend import get_backend  # noqa: E402
from anymoe.core.dispatch_fast import FastLocalDispatcher  # noqa: E402
from anymoe.core.ep_dispatch import build_dispatcher, combine_with  # noqa: E402
from anymoe.core.launch import launch  # noqa: E402
from anymoe.core.parallel import ParallelConfig, build_parallel_groups  # noqa: E402


class _MoEShape:
    def __init__(self, num_experts: int, top_k: int) -> None:
        self.num_experts, self.top_k = num_experts, top_k


def _routing(T: int, E: int, K: int, skew: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(T, E, generator=gen) - skew * torch.log(torch.arange(1, E + 1).float())
    top = logits.topk(K, dim=-1)
    return top.indices, torch.softmax(top.values, dim=-1)


def _time(fn, iters: int, warmup: int, sync) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _slowest_median(ms: list[float], group) -> float:
    med = torch.tensor([statistics.median(ms)], dtype=torch.float64)
    return float(C.all_reduce(med, group, "max"))


def worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    backend = get_backend(args.backend)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = backend.device(local_rank)
    if dev.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.set_device_index(dev.index if dev.index is not None else local_rank)
    sync = backend.synchronize
    dtype = getattr(torch, args.dtype)
    T, D, K, E = args.tokens, args.d_model, args.top_k, args.experts
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, D, generator=gen).to(dev, dtype)
    ids, w = _routing(T, E, K, args.skew, gen)
    ids, w = ids.to(dev), w.to(dev)
    world_group = C.world_group()
    results: dict[str, dict] = {}
    send_splits = None
    names = list(args.dispatchers) + (["fast_local"] if world == 1 else [])
    for name in names:
        groups = build_parallel_groups(ParallelConfig(ep=world, node_size=args.node_size,
                                                      dispatcher="auto" if name == "fast_local" else name),
                                       backend.device_type, num_experts=E)
        # fast_local: the MoE layer's one-rank dispatcher, the floor for the local work at world 1.
        disp = FastLocalDispatcher(E) if name == "fast_local" else build_dispatcher(_MoEShape(E, K), groups)

        def fwd(disp=disp, xin=x):
            x_ND, counts, meta = disp.dispatch(xin, ids, w)
            return disp.combine(x_ND, meta), meta

        out, meta = fwd()
        want = x.float() * w.sum(-1, keepdim=True)
        err = float((out.float() - want).abs().max() / want.abs().max())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        if not err <= tol:  # correctness first: no timing of a wrong dispatcher
            raise AssertionError(f"{name}: identity experts give max rel error {err:.3g} > {tol}")
        hop0 = meta if hasattr(meta, "send_splits") else (meta.hops[0] if getattr(meta, "hops", ()) else None)
        rows_sent = sum(hop0.send_splits) if hop0 is not None else None
        if name == "alltoall":
            send_splits = (hop0.send_splits, hop0.recv_splits)
        syncs, sync_sites = _count_syncs(fwd, dev)
        fwd_ms = _time(lambda fwd=fwd: fwd(), args.iters, args.warmup, sync)
        xg = x.detach().clone().requires_grad_()
        wg = w.detach().clone().requires_grad_()
        gy = torch.randn_like(x)

        def fwd_bwd(disp=disp, xg=xg, wg=wg, gy=gy):
            x_ND, counts, m = disp.dispatch(xg, ids, wg)
            disp.combine(x_ND, m).backward(gy)

        fb_ms = _time(fwd_bwd, args.iters, args.warmup, sync)
        results[name] = {"dispatch_combine_ms": _slowest_median(fwd_ms, world_group),
                         "fwd_bwd_ms": _slowest_median(fb_ms, world_group), "max_rel_err": err,
                         "rows_sent_incl_self": rows_sent, "host_syncs_dispatch_combine": syncs,
                         "host_sync_sites": sync_sites}
        if args.breakdown:
            n = args.breakdown_iters
            results[name]["breakdown"] = _guarded(_breakdown, fwd, sync, dev, n)
            results[name]["breakdown"]["backward"] = _guarded(_breakdown, fwd_bwd, sync, dev, n, top=12)
        del groups
    overlap = {}
    if args.shared_hidden:
        overlap = _measure_overlap(args, world, x, ids, w, backend, sync, world_group)
    elem = torch.empty((), dtype=dtype).element_size()
    raw: dict[str, float | int] = {}
    if send_splits is not None:
        s_send, s_recv = send_splits
        src = torch.randn(sum(s_send), D, device=dev).to(dtype)
        dst = torch.empty(sum(s_recv), D, device=dev, dtype=dtype)
        ms = _time(lambda: dist.all_to_all_single(dst, src, s_recv, s_send), args.iters, args.warmup, sync)
        raw["raw_same_bytes_ms"] = _slowest_median(ms, world_group)
        raw["raw_round_trip_ms"] = 2 * raw["raw_same_bytes_ms"]
        raw["same_bytes_per_rank"] = sum(s_send) * D * elem
    pair_rows = T * K - (T * K) % world
    src = torch.randn(pair_rows, D, device=dev).to(dtype)
    dst = torch.empty_like(src)
    ms = _time(lambda: dist.all_to_all_single(dst, src), args.iters, args.warmup, sync)
    raw["raw_per_pair_ms"] = _slowest_median(ms, world_group)
    raw["per_pair_bytes_per_rank"] = pair_rows * D * elem
    for r in results.values():
        if "raw_same_bytes_ms" in raw:
            r["over_raw_same_bytes"] = r["dispatch_combine_ms"] / raw["raw_same_bytes_ms"]
            r["over_raw_round_trip"] = r["dispatch_combine_ms"] / raw["raw_round_trip_ms"]
        r["over_raw_per_pair"] = r["dispatch_combine_ms"] / raw["raw_per_pair_ms"]
    if rank != 0:
        return {}
    device_name = platform.processor() or "cpu"
    if dev.type != "cpu":
        device_name = _device_name(dev)
    return {
        "bench": "ep_dispatch", "device": device_name, "world": world, "backend": backend.name,
        "dist_backend": backend.dist_backend, "torch": torch.__version__, "python": platform.python_version(),
        "collective_lib_version": _lib_version(dev),
        "config": {"tokens_per_rank": T, "d_model": D, "top_k": K, "experts": E, "dtype": args.dtype,
                   "routing_skew": args.skew, "iters": args.iters, "warmup": args.warmup,
                   "node_size": args.node_size, "smoke": args.smoke},
        "results": results, "raw": raw, "overlap": overlap,
        "target": "dispatch + combine <= 1.5 x raw all_to_all time (issue 4)",
        "timing": "median over iterations of the slowest rank; host clock around backend.synchronize()",
    }


def _measure_overlap(args, world, x, ids, w, backend, sync, world_group) -> dict[str, float]:
    """Forward of dispatch -> identity experts -> combine plus a shared SwiGLU expert on the
    same tokens: one after the other vs the shared expert computed while the return
    all-to-all is in flight (``combine_with``). Measured, since overlap depends on the device."""
    groups = build_parallel_groups(ParallelConfig(ep=world, dispatcher="alltoall"), backend.device_type,
                                   num_experts=args.experts)
    disp = build_dispatcher(_MoEShape(args.experts, args.top_k), groups)
    gen = torch.Generator().manual_seed(7)
    H = args.shared_hidden
    w13 = (torch.randn(args.d_model, 2 * H, generator=gen) * 0.02).to(x.device, x.dtype)
    w2 = (torch.randn(H, args.d_model, generator=gen) * 0.02).to(x.device, x.dtype)

    def shared() -> torch.Tensor:
        gate, up = (x @ w13).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ w2

    def serial():
        x_ND, _, meta = disp.dispatch(x, ids, w)
        return disp.combine(x_ND, meta) + shared()

    def overlapped():
        x_ND, _, meta = disp.dispatch(x, ids, w)
        y, s = combine_with(disp, x_ND, meta, shared)
        return y + s

    torch.testing.assert_close(serial(), overlapped(), rtol=0, atol=0)
    res = {}
    for name, fn in (("shared_alone_ms", shared), ("serial_ms", serial), ("overlapped_ms", overlapped)):
        res[name] = _slowest_median(_time(fn, args.iters, args.warmup, sync), world_group)
    res["saved_ms"] = res["serial_ms"] - res["overlapped_ms"]
    res["shared_hidden"] = H
    return res


def _count_syncs(fn, dev: torch.device) -> tuple[int | None, dict[str, int] | None]:
    """Host syncs in one call of ``fn`` and where they happen (file:line -> count), from torch's
    sync debug mode (CUDA only; None elsewhere)."""
    if dev.type != "cuda":
        return None, None
    import warnings

    torch.cuda.synchronize(dev)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{_short(w.filename)}:{w.lineno}"
            sites[where] = sites.get(where, 0) + 1
    return sum(sites.values()), sites


def _short(path: str) -> str:
    """A path relative to the repository when it is inside it."""
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    return path[len(root):] if path.startswith(root) else path


def _guarded(fn, *args, **kwargs) -> dict:
    """``fn(*args, **kwargs)``, or the error it raised: a profiler quirk must not lose the timings."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON instead
        return {"error": f"{type(exc).__name__}: {exc}"}


_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def _breakdown(fn, sync, dev: torch.device, iters: int, top: int = 8) -> dict:
    """Profile ``iters`` calls of ``fn``; kernel and host time per dispatcher phase (the
    ``ep/<phase>`` ranges), per autograd node outside them (``bwd:<node>``), else ``other``.

    Numbers are per call. ``sync_wait_ms``: host time in device-sync calls of the runtime
    (cudaStreamSynchronize & co., where the profiler records them) inside the phase.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    fn()
    sync()
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        sync()
    events = prof.events()
    phases: dict[str, dict[str, float]] = {}
    kernels: dict[tuple[str, str], list[float]] = {}
    intervals: list[tuple[float, float]] = []

    def bucket(e) -> str:
        while e is not None:
            if e.name.startswith("ep/"):
                return e.name[3:]
            if e.name.startswith("autograd::engine::evaluate_function: "):
                return "bwd:" + e.name.split(": ", 1)[1]
            e = e.cpu_parent
        return "other"

    def slot(name: str) -> dict[str, float]:
        return phases.setdefault(name, {"host_ms": 0.0, "device_ms": 0.0, "kernels": 0, "sync_wait_ms": 0.0})

    for e in events:
        if e.device_type != DeviceType.CPU:
            if not (e.is_user_annotation or e.name.startswith("ep/")):  # kernels, copies, memsets
                intervals.append((e.time_range.start, e.time_range.end))
            continue
        if e.name.startswith("ep/"):
            slot(e.name[3:])["host_ms"] += e.time_range.elapsed_us() / 1e3 / iters
        if e.name in _SYNC_CALLS:
            slot(bucket(e))["sync_wait_ms"] += e.time_range.elapsed_us() / 1e3 / iters
        if e.kernels:
            name = bucket(e)
            for k in e.kernels:
                slot(name)["device_ms"] += k.duration / 1e3 / iters
                slot(name)["kernels"] += 1 / iters
                kernels.setdefault((name, k.name), []).append(k.duration)
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):  # union of the device intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    ranked = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "iters": iters,
        "phases": {k: {f: round(v, 4) for f, v in d.items()} for k, d in phases.items()},
        "device_busy_ms": round(busy / 1e3 / iters, 4),
        "top_kernels": [{"phase": ph, "kernel": name[:120], "calls": len(d) / iters,
                         "ms": round(sum(d) / 1e3 / iters, 4)} for (ph, name), d in ranked],
    }


def _device_name(dev: torch.device) -> str:
    try:
        return torch.cuda.get_device_name(dev)
    except Exception:  # another accelerator: its type is still informative
        return str(dev)


def _lib_version(dev: torch.device) -> str:
    try:
        if dev.type == "cuda":
            return "nccl " + ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:
        pass
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--nproc", type=int, default=2, help="processes to start (ignored under torchrun)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skew", type=float, default=0.0,
                    help="router logit bias -skew*log(rank+1): 0 = balanced")
    ap.add_argument("--node-size", type=int, default=1,
                    help="ranks per 'node' for the hierarchical dispatcher")
    ap.add_argument("--dispatchers", nargs="+", default=["alltoall", "allgather", "hierarchical"])
    ap.add_argument("--shared-hidden", type=int, default=2816,
                    help="hidden of the shared SwiGLU expert in the overlap measurement (0: skip it)")
    ap.add_argument("--breakdown", type=int, default=1, help="1: per-phase profile into the JSON; 0: skip")
    ap.add_argument("--breakdown-iters", type=int, default=5, help="profiled calls per dispatcher")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/ep_dispatch.json or print only)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes (512 tokens, d 64, 3 iterations); the default on the CPU backend")
    ap.add_argument("--full", action="store_true", help="the issue's sizes even on the CPU backend")
    args = ap.parse_args(argv)
    args.smoke = args.smoke or (get_backend(args.backend).name == "cpu" and not args.full)
    if args.smoke:  # sizes left at their defaults shrink; a size given on the command line stays
        for flag, small in (("tokens", 512), ("d_model", 64), ("iters", 3), ("warmup", 1),
                            ("shared_hidden", 64), ("breakdown_iters", 2)):
            if getattr(args, flag) == ap.get_default(flag):
                setattr(args, flag, small)
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        backend = get_backend(args.backend)
        dist.init_process_group(backend.dist_backend)
        rank = dist.get_rank()
        result = worker(rank, dist.get_world_size(), args)
        dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        backend = get_backend(args.backend)
        result = launch(worker, args.nproc, (args,), dist_backend=backend.dist_backend, timeout_s=600,
                        start_method="spawn")[0]
    text = json.dumps(result, indent=2)
    print(text)
    out = args.out or (os.path.join(os.environ["OUT"], "ep_dispatch.json") if "OUT" in os.environ else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
