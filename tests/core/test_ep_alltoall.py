"""The EP dispatchers' host reads and the MoE layer's overlap switch, on 2 gloo processes.

- Host syncs: one host read per dispatch (the split matrix / the gathered counts), none in
  combine or backward, and no op that syncs on an accelerator (nonzero, masked_select, unique,
  bincount, item) anywhere, for every dispatcher (alltoall, alltoall_oneread, allgather,
  hierarchical). Counted with a TorchDispatchMode over every aten op and a counter on
  ``Tensor.tolist``/``item``/``int``; the op counts are recorded (printed with ``-s``) as the
  CPU-side evidence for the GPU run.
- ``ParallelConfig.overlap_shared`` (set on the layers by ``attach_groups``): the layer with the
  shared experts computed during the return all-to-all gives bitwise the plain layer's outputs
  and gradients.
(Values are checked against the float64 loop reference in test_ep_dispatch.py.)
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anymoe.core.ep_dispatch import build_dispatcher
from anymoe.core.launch import launch
from anymoe.core.moe import MoEConfig, MoELayer
from anymoe.core.parallel import ParallelConfig, attach_groups, build_parallel_groups

E, K, D, T = 16, 4, 32, 64
SYNC_OPS = {"nonzero", "masked_select", "unique", "_unique2", "bincount", "_local_scalar_dense",
            "repeat_interleave", "index_put", "index_put_"}


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _HostReads:
    """Counts Tensor.tolist / Tensor.item calls (each one a device->host sync on an accelerator)
    and, with ``ops``, how many aten ops ran after the last one (launched with an empty queue)."""

    def __init__(self, ops: _OpCounter | None = None) -> None:
        self.counter = ops
        self.at = 0

    def after(self) -> int:
        return sum(self.counter.ops.values()) - self.at if self.counter else 0

    def __enter__(self):
        self.n = 0
        self._saved = torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__

        def counted(fn):
            def wrapper(t, *a, **kw):
                self.n += 1
                out = fn(t, *a, **kw)
                self.at = sum(self.counter.ops.values()) if self.counter else 0
                return out
            return wrapper

        torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__ = map(counted, self._saved)
        return self

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__ = self._saved


DISPATCHERS = ("alltoall", "alltoall_oneread", "allgather", "hierarchical")


def _count_worker(rank: int, world: int) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for name in DISPATCHERS:  # hierarchical with node_size 1: one hop across "nodes"
        cfg = ParallelConfig(ep=2, node_size=1, dispatcher=name)
        groups = build_parallel_groups(cfg, "cpu", num_experts=E)
        disp = build_dispatcher(MoEConfig(num_experts=E, top_k=K, expert_hidden=8), groups)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(T, D, generator=g, requires_grad=True)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        ids[0, 1] = -1  # a dropped pair
        w = torch.rand(T, K, generator=g).requires_grad_()
        res: dict[str, object] = {}
        for phase in ("dispatch", "combine", "backward"):
            with _OpCounter() as ops, _HostReads(ops) as reads:
                if phase == "dispatch":
                    x_ND, counts_E, meta = disp.dispatch(x, ids, w)
                elif phase == "combine":
                    y = disp.combine(x_ND * 2, meta)
                else:
                    y.square().sum().backward()
            res[phase] = {"host_reads": reads.n, "ops": sum(ops.ops.values()), "by_op": dict(ops.ops),
                          "after_read": reads.after()}
        # Identity experts times 2: out = 2 x * sum_k w over the kept pairs, wherever their experts live.
        torch.testing.assert_close(y, 2 * x * (w * (ids >= 0)).sum(1, keepdim=True))
        out[name] = res
    return out


@pytest.mark.multiproc
def test_one_host_read_per_dispatch() -> None:
    results = launch(_count_worker, 2, timeout_s=120, start_method="fork")
    for rank, per_disp in enumerate(results):
        for name, res in per_disp.items():
            print(f"rank {rank} {name}: " + ", ".join(
                f"{p}: {r['host_reads']} host reads, {r['ops']} aten ops ({r['after_read']} after the read)"
                for p, r in res.items()))
            reads = [res[p]["host_reads"] for p in ("dispatch", "combine", "backward")]
            assert reads == [1, 0, 0], (name, res)
            for phase, r in res.items():
                bad = SYNC_OPS & set(r["by_op"])
                assert not bad, f"rank {rank} {name} {phase}: ops that sync on an accelerator: {bad}"


def _overlap_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(30 + rank)
    x0 = torch.randn(2, T // 2, D, generator=g)
    target = torch.randn(2, T // 2, D, generator=g)
    out = {}
    for overlap in (False, True):
        groups = build_parallel_groups(ParallelConfig(ep=2, dispatcher="alltoall", overlap_shared=overlap),
                                       "cpu", num_experts=E)
        cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden=8, shared_experts=1, shared_gate=True)
        torch.manual_seed(4)
        layer = MoELayer(cfg, D, dispatcher=build_dispatcher(cfg, groups))
        attach_groups(layer, groups)
        assert layer.overlap_shared is overlap
        x = x0.clone().requires_grad_()
        y, aux = layer(x)
        ((y * target).sum() + aux.loss).backward()
        grads = [p.grad.flatten() for _, p in sorted(layer.named_parameters())]
        out[str(overlap)] = torch.cat([y.detach().flatten(), x.grad.flatten(), *grads])
    return out


@pytest.mark.multiproc
def test_overlap_shared_is_bitwise_the_plain_layer() -> None:
    for rank, res in enumerate(launch(_overlap_worker, 2, timeout_s=120, start_method="fork")):
        assert torch.equal(res["True"], res["False"]), f"rank {rank}: overlap_shared changed the numbers"
