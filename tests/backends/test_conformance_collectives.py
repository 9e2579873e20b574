"""Every collective on every backend present, across 2 and 4 real processes.

The same worker runs over the backend's own collective library (gloo on the CPU, NCCL on
GPUs, HCCL on NPUs) with tensors on ``backend.device(rank)``; the parent recomputes each
result in float64 from every rank's inputs. anymoe.core.collectives is the implementation
under test (shared by all backends); tests/core/test_collectives.py covers it in depth on
gloo, this file checks that each backend's library gives the same answers.
"""

import pytest
import torch

from anymoe.core import collectives as C
from anymoe.core.backend import create_backend, probe_backends
from anymoe.core.launch import launch

D = 6
MARKS = {"cuda": [pytest.mark.gpu], "npu": [pytest.mark.npu]}


def _params() -> list:
    params = []
    for name, status in probe_backends().items():
        for world in (2, 4):
            marks = [pytest.mark.multiproc, *MARKS.get(name, [])]
            if name == "cpu" and world == 4:  # ~20 s here; tests/core/test_collectives.py runs gloo x4 too
                marks.append(pytest.mark.slow)
            if not status.ok:
                marks.append(pytest.mark.skip(reason=f"backend {name!r} not usable here: {status.reason}"))
            elif name != "cpu" and create_backend(name).device_count() < world:
                marks.append(pytest.mark.skip(reason=f"{world} processes need {world} {name} devices"))
            params.append(pytest.param(name, world, marks=marks, id=f"{name}-{world}proc"))
    return params


def _splits(rank: int, world: int) -> list[int]:
    # rows rank r sends to rank j: uneven, with zeros (r = 0 sends nothing to j = 1 when world > 1)
    return [(rank + 2 * j) % 3 for j in range(world)]


def _inputs(rank: int, world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + rank)
    return {
        "x": torch.randn(3, D, generator=g),
        "xu": torch.randn(rank + 1, D, generator=g),  # uneven rows: 1, 2, 3, 4
        "xrs": torch.randn(2 * world, D, generator=g),
        "xa2a": torch.randn(sum(_splits(rank, world)), D, generator=g),
        "wa2a": torch.randn(sum(_splits(r, world)[rank] for r in range(world)), D, generator=g),
    }


def _worker(rank: int, world: int, name: str) -> dict[str, torch.Tensor]:
    b = create_backend(name)
    dev = b.device(rank if b.device_type != "cpu" else 0)
    if dev.type != "cpu":
        torch.accelerator.set_device_index(dev.index)
    group = C.world_group()
    inp = {k: v.to(dev) for k, v in _inputs(rank, world).items()}
    out = {
        "sum": C.all_reduce(inp["x"], group, "sum"),
        "max": C.all_reduce(inp["x"], group, "max"),
        "gather_uneven": C.all_gather(inp["xu"], group, sizes=C.gather_sizes(rank + 1, group, dev)),
        "reduce_scatter": C.reduce_scatter(inp["xrs"], group),
        "broadcast": C.broadcast(inp["x"], group, src=world - 1),
    }
    send = torch.tensor(_splits(rank, world), device=dev)
    recv = C.exchange_splits(send, group).tolist()
    x = inp["xa2a"].clone().requires_grad_()
    y = C.all_to_all(x, group, output_splits=recv, input_splits=send.tolist())
    (y * inp["wa2a"]).sum().backward()  # d loss_j / d (row sent to j) = w_j's matching row
    out["a2a"], out["a2a_grad"] = y.detach(), x.grad
    C.barrier(group)
    b.synchronize()
    return {k: v.detach().cpu() for k, v in out.items()}


def _expected(world: int) -> list[dict[str, torch.Tensor]]:
    inps = [{k: v.double() for k, v in _inputs(r, world).items()} for r in range(world)]
    x_all = torch.stack([i["x"] for i in inps])
    gathered = torch.cat([i["xu"] for i in inps])
    rs_total = sum(i["xrs"] for i in inps)
    # chunk[r][j]: the rows rank r sends to rank j
    chunks = [list(i["xa2a"].split(_splits(r, world))) for r, i in enumerate(inps)]
    received = [torch.cat([chunks[r][j] for r in range(world)]) for j in range(world)]
    w_chunks = [list(i["wa2a"].split([_splits(r, world)[j] for r in range(world)]))
                for j, i in enumerate(inps)]
    grads = [torch.cat([w_chunks[j][r] for j in range(world)]) for r in range(world)]
    return [{
        "sum": x_all.sum(0), "max": x_all.max(0).values, "gather_uneven": gathered,
        "reduce_scatter": rs_total.chunk(world)[r], "broadcast": inps[-1]["x"],
        "a2a": received[r], "a2a_grad": grads[r],
    } for r in range(world)]


@pytest.mark.parametrize("name, world", _params())
def test_collectives_match_float64_reference(name, world):
    b = create_backend(name)
    got = launch(_worker, world, (name,), dist_backend=b.dist_backend, timeout_s=180)
    for rank, (g, e) in enumerate(zip(got, _expected(world))):
        for key, ref in e.items():
            torch.testing.assert_close(g[key].double(), ref, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, k=key, r=rank: f"{name} rank {r} {k}: {m}")
