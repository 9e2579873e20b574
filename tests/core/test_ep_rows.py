"""The row moves under every EP dispatcher (anymoe.core.ep_rows), the async all-gather, and the
hop's send index, against plain references (float64).

- ``SendRows`` / ``ReduceSent`` / ``PermuteRows``: forward equals a loop, backward equals
  ``torch.autograd.gradcheck`` (float64), including "nothing" entries (mask 0, the pad row).
- ``all_gather_start(...).wait()`` equals ``all_gather`` in values and gradients, equal and
  uneven sizes, on 2 gloo processes.
- ``hop``'s send order and positions on the worked example of its docstring (2 gloo processes).
"""

from __future__ import annotations

import pytest
import torch

from anymoe.core import collectives as C
from anymoe.core.ep_dispatch import hop
from anymoe.core.ep_rows import PermuteRows, ReduceSent, SendRows, masked_sum
from anymoe.core.launch import launch

D = 3


def _x(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# 3 tokens, P = 2 members: t0 sent to both (rows 0, 2), t1 only to member 1 (row 3; its member-0
# entry points at row 3 with mask 0), t2 only to member 0 (row 1).
SRC_S = torch.tensor([0, 2, 0, 1])
POS_TP = torch.tensor([[0, 2], [3, 3], [1, 1]])
MASK_TP = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)


def test_send_and_reduce_match_loops() -> None:
    x, y = _x(3), _x(4, 1)
    assert torch.equal(SendRows.apply(x, SRC_S, POS_TP, MASK_TP), x[SRC_S])
    want = torch.stack([y[0] + y[2], y[3], y[1]])
    torch.testing.assert_close(ReduceSent.apply(y, SRC_S, POS_TP, MASK_TP), want, rtol=0, atol=1e-15)
    assert torch.equal(masked_sum(y[:0], POS_TP, MASK_TP), torch.zeros(3, D, dtype=torch.float64))


def test_row_moves_gradcheck() -> None:
    x = _x(3).requires_grad_()
    y = _x(4, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: SendRows.apply(t, SRC_S, POS_TP, MASK_TP), (x,))
    assert torch.autograd.gradcheck(lambda t: ReduceSent.apply(t, SRC_S, POS_TP, MASK_TP), (y,))
    # 2 rows, K = 2; pairs (0,0) -> sorted row 1, (1,1) -> 0, (0,1) and (1,0) elsewhere -> pad row 2.
    # The backward assumes the pad row's gradient is 0 (its combine weights are): so check the
    # rows without it.
    pos_TK, src_N = torch.tensor([[1, 2], [2, 0]]), torch.tensor([1, 0, 0])
    out = PermuteRows.apply(x[:2], src_N, pos_TK, True)
    assert torch.equal(out, torch.stack([x[1], x[0], torch.zeros(D, dtype=torch.float64)]).detach())
    assert torch.autograd.gradcheck(lambda t: PermuteRows.apply(t, src_N, pos_TK, True)[:-1], (x[:2],))
    full_TK, src_N = torch.tensor([[1, 2], [3, 0]]), torch.tensor([1, 0, 0, 1])  # every pair here: no pad
    assert torch.autograd.gradcheck(lambda t: PermuteRows.apply(t, src_N, full_TK, False), (x[:2],))


def _gather_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    group = C.world_group()
    out = {}
    for name, sizes in (("equal", [3, 3]), ("uneven", [2, 4])):
        for mode in ("sync", "async"):
            x = _x(sizes[rank], 10 + rank).requires_grad_()
            if mode == "sync":
                y = C.all_gather(x, group, sizes=sizes)
            else:
                y = C.all_gather_start(x, group, sizes).wait()
            (y * _x(sum(sizes), 20 + rank)).sum().backward()
            out[f"{name}/{mode}/y"], out[f"{name}/{mode}/dx"] = y.detach(), x.grad
    # The hop's worked example (docstring): rows r0 dest [0, 1], r1 [1, -1], r2 [0, 0]; rank 1 sends nothing.
    dest = torch.tensor([[0, 1], [1, -1], [0, 0]]) if rank == 0 else torch.full((1, 2), -1)
    ids = torch.where(dest >= 0, dest * 4 + 1, -1)
    w = torch.ones(dest.shape, dtype=torch.float64)
    rows, ids_Q, w_Q, meta = hop(_x(dest.shape[0]), ids, w, dest, group)
    rows.wait()
    out["src_row"], out["pos"], out["mask"] = meta.src_row_S, meta.pos_RP, meta.mask_RP
    out["splits"] = torch.tensor([meta.send_splits, meta.recv_splits, [meta.pairs_in, 0]])
    out["ids_Q"], out["w_Q"] = ids_Q, w_Q
    return out


@pytest.mark.multiproc
def test_all_gather_start_and_hop_index() -> None:
    results = launch(_gather_worker, 2, timeout_s=60, start_method="fork")
    for res in results:
        for name in ("equal", "uneven"):
            for key in ("y", "dx"):
                assert torch.equal(res[f"{name}/async/{key}"], res[f"{name}/sync/{key}"]), (name, key)
    r0, r1 = results
    assert r0["src_row"].tolist() == [0, 2, 0, 1]
    assert r0["pos"].tolist() == [[0, 2], [3, 3], [1, 1]]
    assert r0["mask"].tolist() == [[1, 1], [0, 1], [1, 0]]
    assert r0["splits"].tolist() == [[2, 2], [2, 0], [3, 0]]  # send, receive, pairs received
    assert r1["splits"].tolist() == [[0, 0], [2, 0], [2, 0]]
    # Member 1 gets r0 (slot 1 here: id 5, slot 0 elsewhere) and r1 (slot 0: id 5): ids masked to it.
    assert r1["ids_Q"].tolist() == [[-1, 5], [5, -1]] and r1["w_Q"].tolist() == [[0, 1], [1, 0]]


# ------------------------------------------------------------------------------------------------
# On an accelerator (one device): every dispatcher over an EP group of one, with the device kernels
# (the Triton gathers and combines on CUDA: the pad row read by many pairs, 1-member sums).
# ------------------------------------------------------------------------------------------------

MARKS = {"cuda": [pytest.mark.gpu], "npu": [pytest.mark.npu]}


def _device_params() -> list:
    from anymoe.core.backend import probe_backends

    params = []
    for name, status in probe_backends().items():
        if name == "cpu":
            continue
        marks = list(MARKS.get(name, []))
        if not status.ok:
            marks.append(pytest.mark.skip(reason=f"backend {name!r} not usable here: {status.reason}"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("name", _device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatchers_on_one_device_match_float64(name: str, dtype: torch.dtype) -> None:
    from anymoe.core.backend import create_backend

    check_dispatchers_on(create_backend(name).device(0), dtype)


def check_dispatchers_on(dev: torch.device, dtype: torch.dtype) -> None:
    """Forward and backward of every dispatcher at EP 1 on ``dev`` vs a float64 reference on the CPU."""
    from anymoe.core.ep_dispatch import build_dispatcher
    from anymoe.core.parallel import ParallelConfig, build_parallel_groups

    class Shape:
        num_experts, top_k = 8, 3

    g = torch.Generator().manual_seed(3)
    T, Dm = 64, 32
    x = torch.randn(T, Dm, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(T)])
    ids[::7, 1] = -1  # dropped pairs
    w = torch.rand(T, 3, generator=g, dtype=torch.float64) * (ids >= 0)
    W = torch.randn(8, Dm, Dm, generator=g, dtype=torch.float64) / Dm**0.5
    gy = torch.randn(T, Dm, generator=g, dtype=torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    # Reference: out[t] = sum_k w[t, k] x[t] @ W[ids[t, k]] (dropped pairs: weight 0).
    ref = [t.clone().requires_grad_() for t in (x, w, W)]
    y_ref = torch.einsum("td,tkdf,tk->tf", ref[0], ref[2][ids.clamp_min(0)], ref[1] * (ids >= 0))
    (y_ref * gy).sum().backward()
    want = [y_ref.detach(), *(t.grad for t in ref)]
    for kind in ("alltoall", "alltoall_oneread", "allgather", "hierarchical"):
        groups = build_parallel_groups(ParallelConfig(ep=1, dispatcher=kind), dev.type, num_experts=8)
        disp = build_dispatcher(Shape, groups)
        xs, ws, Ws = (t.to(dev, dtype).requires_grad_() for t in (x, w, W))
        x_ND, counts, meta = disp.dispatch(xs, ids.to(dev), ws)
        y_ND = torch.cat([c @ Ws[e] for e, c in enumerate(x_ND.split(counts.tolist()))])
        y = disp.combine(y_ND, meta)
        (y * gy.to(dev, dtype)).sum().backward()
        got = [t.detach().double().cpu() for t in (y, xs.grad, ws.grad, Ws.grad)]
        for a, b, what in zip(got, want, ("y", "dx", "dw", "dW")):
            rel = float((a - b).abs().max() / b.abs().max())
            assert rel <= tol, f"{dev} {kind} {dtype} {what}: max rel diff {rel:.2e}"
