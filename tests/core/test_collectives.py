"""Every collective across 2 and 4 real gloo processes vs the single-process result (float64).

The reference is plain tensor code on the concatenated inputs of all ranks, computed in the
test process; gradients of the differentiable ops come from autograd on that reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from anymoe.core import collectives as C
from anymoe.core.launch import launch

D = 5


def _inputs(rank: int, world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    rows = rank + 1  # uneven row counts: 1, 2, 3, 4
    # all_to_all: rank r sends (r + 2j) % 3 rows to rank j (zeros included).
    send = [(rank + 2 * j) % 3 for j in range(world)]
    return {
        "x": torch.randn(3, D, generator=g, dtype=torch.float64),
        "xu": torch.randn(rows, D, generator=g, dtype=torch.float64),
        "xrs": torch.randn(2 * world, D, generator=g, dtype=torch.float64),
        "xrsu": torch.randn(sum(range(1, world + 1)), D, generator=g, dtype=torch.float64),
        "xa2a": torch.randn(sum(send), D, generator=g, dtype=torch.float64),
        "send": torch.tensor(send),
        "w_ag": torch.randn(sum(range(1, world + 1)), D, generator=g, dtype=torch.float64),
        "w_rs": torch.randn(2, D, generator=g, dtype=torch.float64),
        "w_ar": torch.randn(3, D, generator=g, dtype=torch.float64),
    }


def _collectives_worker(rank: int, world: int) -> dict[str, object]:
    group = C.world_group()
    inp = _inputs(rank, world)
    out: dict[str, object] = {}
    for op in ("sum", "avg", "max", "min"):
        out[f"all_reduce_{op}"] = C.all_reduce(inp["x"], group, op)
    y = inp["x"].clone()
    C.all_reduce_(y, group, "sum")
    out["all_reduce_"] = y
    out["all_gather"] = C.all_gather(inp["x"], group)
    out["all_gather_dim1"] = C.all_gather(inp["x"], group, dim=1)
    sizes = C.gather_sizes(inp["xu"].shape[0], group)
    out["sizes"] = sizes
    out["all_gather_uneven"] = C.all_gather(inp["xu"], group, sizes=sizes)
    out["all_gather_list"] = C.all_gather_list(inp["xu"], group, sizes=sizes)
    out["reduce_scatter"] = C.reduce_scatter(inp["xrs"], group)
    out["reduce_scatter_dim1"] = C.reduce_scatter(inp["xrs"].t().contiguous(), group, dim=1)
    out["reduce_scatter_uneven"] = C.reduce_scatter(inp["xrsu"], group, sizes=list(range(1, world + 1)))
    out["broadcast"] = C.broadcast(inp["x"], group, src=world - 1)
    C.barrier(group)

    # Differentiable ops: loss_r = sum(op(x) * w_r); the reference sums every rank's loss.
    recv = C.exchange_splits(inp["send"], group)
    out["recv"] = recv
    xa = inp["xa2a"].clone().requires_grad_()
    ya = C.all_to_all(xa, group, recv.tolist(), inp["send"].tolist())
    wa = torch.arange(ya.numel(), dtype=torch.float64).view_as(ya) * 0.1 + rank
    (ya * wa).sum().backward()
    out["a2a"], out["a2a_grad"] = ya.detach(), xa.grad
    # The same exchange started asynchronously, waited for after other work.
    xa = inp["xa2a"].clone().requires_grad_()
    pending = C.all_to_all_start(xa * 1.0, group, recv.tolist(), inp["send"].tolist())
    _ = torch.randn(64, 64) @ torch.randn(64, 64)  # work while the exchange is in flight
    ya = pending.wait()
    assert pending.wait() is ya
    (ya * wa).sum().backward()
    out["a2a_async"], out["a2a_async_grad"] = ya.detach(), xa.grad

    xg = inp["xu"].clone().requires_grad_()
    (C.all_gather(xg, group, sizes=sizes) * inp["w_ag"]).sum().backward()
    out["ag_grad"] = xg.grad
    xr = inp["xrs"].clone().requires_grad_()
    (C.reduce_scatter(xr, group) * inp["w_rs"]).sum().backward()
    out["rs_grad"] = xr.grad
    xs = inp["x"].clone().requires_grad_()
    (C.all_reduce(xs, group, "sum", differentiable=True) * inp["w_ar"]).sum().backward()
    out["ar_grad"] = xs.grad
    return out


def _reference(world: int) -> list[dict[str, object]]:
    inps = [_inputs(r, world) for r in range(world)]
    xs = torch.stack([i["x"] for i in inps])
    ref: list[dict[str, object]] = [{} for _ in range(world)]
    # all_to_all: what rank j receives is, in source-rank order, the j-th chunk of every rank.
    chunks = [i["xa2a"].split(i["send"].tolist()) for i in inps]
    xa = [i["xa2a"].clone().requires_grad_() for i in inps]
    xg = [i["xu"].clone().requires_grad_() for i in inps]
    xr = [i["xrs"].clone().requires_grad_() for i in inps]
    xa_chunks = [x.split(i["send"].tolist()) for x, i in zip(xa, inps)]
    gathered = torch.cat(xg)
    loss = 0
    for j in range(world):
        ya = torch.cat([xa_chunks[r][j] for r in range(world)])
        wa = torch.arange(ya.numel(), dtype=torch.float64).view_as(ya) * 0.1 + j
        loss = loss + (ya * wa).sum() + (gathered * inps[j]["w_ag"]).sum()
        rs = sum(x[2 * j:2 * j + 2] for x in xr)
        loss = loss + (rs * inps[j]["w_rs"]).sum()
    loss.backward()
    rs_full = sum(i["xrs"] for i in inps)
    rsu_full = sum(i["xrsu"] for i in inps)
    rsu_starts = [sum(range(1, j + 1)) for j in range(world + 1)]
    w_ar_sum = sum(i["w_ar"] for i in inps)
    for j in range(world):
        ref[j] = {
            "all_reduce_sum": xs.sum(0), "all_reduce_avg": xs.mean(0), "all_reduce_max": xs.amax(0),
            "all_reduce_min": xs.amin(0), "all_reduce_": xs.sum(0),
            "all_gather": torch.cat(list(xs)), "all_gather_dim1": torch.cat(list(xs), dim=1),
            "sizes": [r + 1 for r in range(world)],
            "all_gather_uneven": torch.cat([i["xu"] for i in inps]),
            "all_gather_list": [i["xu"] for i in inps],
            "reduce_scatter": rs_full[2 * j:2 * j + 2],
            "reduce_scatter_dim1": rs_full[2 * j:2 * j + 2].t(),
            "reduce_scatter_uneven": rsu_full[rsu_starts[j]:rsu_starts[j + 1]],
            "broadcast": inps[world - 1]["x"],
            "recv": torch.tensor([inps[r]["send"][j].item() for r in range(world)]),
            "a2a": torch.cat([chunks[r][j] for r in range(world)]),
            "a2a_grad": xa[j].grad, "ag_grad": xg[j].grad, "rs_grad": xr[j].grad,
            "a2a_async": torch.cat([chunks[r][j] for r in range(world)]), "a2a_async_grad": xa[j].grad,
            "ar_grad": w_ar_sum,
        }
    return ref


def _assert_same(got: object, want: object, key: str) -> None:
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), key
        for g, w in zip(got, want):
            _assert_same(g, w, key)
        return
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=key)
        return
    assert got == want, key


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_collectives_match_single_process(world: int) -> None:
    results = launch(_collectives_worker, world, timeout_s=120, start_method="fork")
    ref = _reference(world)
    for rank in range(world):
        assert set(results[rank]) == set(ref[rank])
        for key in ref[rank]:
            _assert_same(results[rank][key], ref[rank][key], f"rank {rank} {key}")


@pytest.mark.slow
@pytest.mark.multiproc
def test_collectives_with_spawned_workers() -> None:
    """The library default start method (spawn: fresh interpreters) gives the same results."""
    results = launch(_collectives_worker, 2, timeout_s=180)
    ref = _reference(2)
    for rank in range(2):
        for key in ref[rank]:
            _assert_same(results[rank][key], ref[rank][key], f"rank {rank} {key}")


def test_world_of_one_is_identity_without_init() -> None:
    assert not dist.is_initialized()
    group = C.world_group()
    assert group.size == 1 and group.pg is None
    x = torch.randn(4, 3, requires_grad=True)
    for op in ("sum", "avg", "max", "min"):
        assert torch.equal(C.all_reduce(x, group, op), x)
    assert torch.equal(C.all_gather(x, group), x)
    assert [t.shape for t in C.all_gather_list(x, group)] == [x.shape]
    assert torch.equal(C.reduce_scatter(x, group), x)
    assert torch.equal(C.broadcast(x, group), x)
    assert torch.equal(C.exchange_splits(torch.tensor([4]), group), torch.tensor([4]))
    assert C.gather_sizes(7, group) == [7]
    assert C.all_to_all_start(x, group, [4], [4]).wait() is x
    y = C.all_to_all(x, group, [4], [4])
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    C.barrier(group)
    assert not dist.is_initialized()


def test_launch_reraises_worker_error() -> None:
    with pytest.raises(Exception, match="boom on rank 1"):
        launch(_failing_worker, 2, timeout_s=60, start_method="fork")


def _failing_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")


def test_launch_times_out_instead_of_hanging() -> None:
    with pytest.raises(TimeoutError, match="did not finish"):
        launch(_hanging_worker, 2, timeout_s=3, start_method="fork")


def _hanging_worker(rank: int, world: int) -> None:
    import time

    time.sleep(60)


def test_tensors_are_staged_onto_a_device_the_group_supports() -> None:
    """A CPU statistic reduced over an accelerator-only group travels through that device."""
    from types import SimpleNamespace

    from anymoe.core.collectives import _staged

    x = torch.ones(3)
    cpu_ok = SimpleNamespace(pg=SimpleNamespace(_device_types=[torch.device("meta"), torch.device("cpu")]))
    assert _staged(x, cpu_ok) is x
    meta_only = SimpleNamespace(pg=SimpleNamespace(_device_types=[torch.device("meta")]))
    assert _staged(x, meta_only).device.type == "meta"
    assert _staged(x, SimpleNamespace(pg=object())) is x  # a library that does not say: as is
