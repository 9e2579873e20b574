"""EP = 2 vs one process on accelerator backends (NCCL / HCCL), 2 real processes, one device each.

The same check as tests/core/test_ep_parity.py, with tensors on ``backend.device(rank)`` and
the backend's collective library: MoE layer outputs and every gradient (after
``sync_gradients``) at EP 2 with each dispatcher equal one process holding all experts on the
concatenated batch (fp32, max rel diff <= 1e-5). On the CPU the gloo version runs in
test_ep_parity.py; here CPU is skipped. Weights are drawn on the CPU from the seed and moved.
"""

from __future__ import annotations

import pytest
import torch

from anymoe.core.backend import create_backend, probe_backends
from anymoe.core.balance import BalanceConfig
from anymoe.core.ep_dispatch import build_dispatcher
from anymoe.core.launch import launch
from anymoe.core.moe import MoEConfig, MoELayer
from anymoe.core.parallel import ParallelConfig, attach_groups, build_parallel_groups, sync_gradients

E, K, D, FH, B, S = 8, 3, 32, 24, 2, 8
MARKS = {"cuda": [pytest.mark.gpu], "npu": [pytest.mark.npu]}


def _params() -> list:
    params = []
    for name, status in probe_backends().items():
        if name == "cpu":
            continue
        marks = [pytest.mark.multiproc, *MARKS.get(name, [])]
        if not status.ok:
            marks.append(pytest.mark.skip(reason=f"backend {name!r} not usable here: {status.reason}"))
        elif create_backend(name).device_count() < 2:
            marks.append(pytest.mark.skip(reason=f"EP 2 needs 2 {name} devices"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _step(layer, x, target):
    x = x.clone().requires_grad_()
    y, aux = layer(x)
    ((y * target).sum(-1).mean() + aux.loss).backward()
    return y.detach(), x.grad


def ep_parity_worker(rank: int, world: int, name: str) -> dict[str, dict[str, float]]:
    backend = create_backend(name)
    dev = backend.device(rank)
    if dev.type != "cpu":
        torch.accelerator.set_device_index(dev.index)
    backend.set_deterministic(True)
    g = torch.Generator().manual_seed(3)
    x_all = torch.randn(world * B, S, D, generator=g).to(dev)
    t_all = torch.randn(world * B, S, D, generator=g).to(dev)
    cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden=FH, shared_experts=1,
                    balance=BalanceConfig(aux_loss=0.01, global_batch=True, z_loss=1e-3))
    out = {}
    for disp_name in ("alltoall", "allgather", "hierarchical"):
        groups = build_parallel_groups(ParallelConfig(ep=world, node_size=1, dispatcher=disp_name),
                                       backend.device_type, num_experts=E)
        torch.manual_seed(11)
        ref = MoELayer(cfg, D).to(dev)
        torch.manual_seed(11)
        layer = MoELayer(cfg, D, dispatcher=build_dispatcher(cfg, groups)).to(dev)
        attach_groups(layer, groups)
        shard = slice(rank * B, (rank + 1) * B)
        y, dx = _step(layer, x_all[shard], t_all[shard])
        sync_gradients(layer, groups)
        y_ref, dx_ref = _step(ref, x_all, t_all)
        res = {"y": _rel(y, y_ref[shard]), "dx": _rel(dx / world, dx_ref[shard])}
        lo, hi = groups.expert_range(E)
        ref_params = dict(ref.named_parameters())
        for pname, p in layer.named_parameters():
            want = ref_params[pname].grad
            res["grad." + pname] = _rel(p.grad, want[lo:hi] if pname.startswith("experts.") else want)
        out[disp_name] = res
    backend.synchronize()
    return out


@pytest.mark.parametrize("name", _params())
def test_ep2_parity_on_devices(name: str) -> None:
    backend = create_backend(name)
    results = launch(ep_parity_worker, 2, (name,), dist_backend=backend.dist_backend, timeout_s=300)
    for rank, per_case in enumerate(results):
        for case, diffs in per_case.items():
            bad = {k: v for k, v in diffs.items() if not v <= 1e-5}
            assert not bad, f"{name} rank {rank} {case}: {bad}"
