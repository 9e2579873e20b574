"""EP dispatchers vs a float64 plain-loop reference, forward and backward, on 2 and 4 processes.

Each rank has its own (uneven) number of tokens, K expert ids per token (some -1: dropped),
combine weights and a per-expert linear "expert" (W_e, all experts replicated, each rank
computing only its own). Reference on the concatenated batch, one loop over (t, k):

    out[t] = sum_k w[t, k] * (x[t] @ W[ids[t, k]])      (dropped pairs contribute 0)

The loss sums every rank's sum(out * g); gradients of x, w (per rank) and W (each rank's
experts, summed over all ranks' tokens) must match the reference.
"""

from __future__ import annotations

import pytest
import torch

from anymoe.core.collectives import world_group
from anymoe.core.ep_dispatch import (
    AllGatherDispatcher,
    AllToAllDispatcher,
    HierarchicalDispatcher,
    OneReadAllToAllDispatcher,
    combine_with,
    local_combine,
    local_permute,
    resolve_dispatcher,
)
from anymoe.core.launch import launch
from anymoe.core.parallel import ParallelConfig, build_parallel_groups

E, K, D, F = 8, 3, 4, 5


def _rank_inputs(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + rank)
    T = 3 + 2 * rank  # uneven: 3, 5, 7, 9 tokens
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    drop = torch.rand(T, K, generator=g) < 0.15
    ids = torch.where(drop, -1, ids)
    w = torch.rand(T, K, generator=g, dtype=torch.float64) * (~drop)
    return {"x": torch.randn(T, D, generator=g, dtype=torch.float64), "ids": ids, "w": w,
            "g": torch.randn(T, F, generator=g, dtype=torch.float64)}


def _weights() -> torch.Tensor:
    return torch.randn(E, D, F, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _experts(x_ND: torch.Tensor, counts_E: torch.Tensor, W_EDF: torch.Tensor) -> torch.Tensor:
    return torch.cat([c @ W_EDF[e] for e, c in enumerate(x_ND.split(counts_E.tolist()))]) if len(x_ND) else \
        x_ND.new_zeros(0, W_EDF.shape[2])


def _make(kind: str, groups):
    if kind == "alltoall":
        return AllToAllDispatcher(E, groups.ep)
    if kind == "alltoall_oneread":
        return OneReadAllToAllDispatcher(E, groups.ep)
    if kind == "allgather":
        return AllGatherDispatcher(E, groups.ep)
    return HierarchicalDispatcher(E, groups.ep, groups.ep_intra, groups.ep_inter)


CASES = {2: [("alltoall", 2, None), ("alltoall_oneread", 2, None), ("allgather", 2, None),
             ("hierarchical", 2, 1)],
         4: [("alltoall", 4, None), ("allgather", 4, None), ("hierarchical", 4, 2), ("hierarchical", 4, 1),
             ("alltoall", 2, None)]}


def _dispatch_worker(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    inp = _rank_inputs(rank)
    for kind, ep, node in CASES[world]:
        groups = build_parallel_groups(ParallelConfig(ep=ep, node_size=node), "cpu", num_experts=E)
        disp = _make(kind, groups)
        lo, hi = groups.expert_range(E)
        W = _weights()[lo:hi].clone().requires_grad_()
        x = inp["x"].clone().requires_grad_()
        w = inp["w"].clone().requires_grad_()
        x_ND, counts_E, meta = disp.dispatch(x, inp["ids"], w)
        y = disp.combine(_experts(x_ND, counts_E, W), meta)
        (y * inp["g"]).sum().backward()
        # Expert grads: this rank's experts got every EP-group rank's contributions; sum over EDP.
        W_grad = W.grad.clone()
        from anymoe.core.collectives import all_reduce_
        all_reduce_(W_grad, groups.edp)
        out[f"{kind}/{ep}/{node}"] = {"y": y.detach(), "x": x.grad, "w": w.grad, "W": W_grad,
                                      "lo": torch.tensor(lo), "hi": torch.tensor(hi),
                                      "overlap_diff": _overlap_diff(disp, inp, W.detach())}
    assert world_group().size == world
    return out


def _overlap_diff(disp, inp, W) -> torch.Tensor:
    """combine_with(side) vs combine then side: max difference of outputs and gradients."""
    side_w = torch.randn(D, F, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    results = []
    for overlapped in (False, True):
        x = inp["x"].clone().requires_grad_()
        w = inp["w"].clone().requires_grad_()
        x_ND, counts_E, meta = disp.dispatch(x, inp["ids"], w)
        y_ND = _experts(x_ND, counts_E, W)
        if overlapped:
            y, side = combine_with(disp, y_ND, meta, lambda x=x: x @ side_w)
        else:
            y, side = disp.combine(y_ND, meta), x @ side_w
        ((y + side) * inp["g"]).sum().backward()
        results.append(torch.cat([y.detach().flatten(), x.grad.flatten(), w.grad.flatten()]))
    return (results[0] - results[1]).abs().max()


def _reference(world: int) -> list[dict[str, torch.Tensor]]:
    W = _weights().requires_grad_()
    ranks = [_rank_inputs(r) for r in range(world)]
    xs = [r["x"].clone().requires_grad_() for r in ranks]
    ws = [r["w"].clone().requires_grad_() for r in ranks]
    loss = 0
    ys = []
    for r, inp in enumerate(ranks):
        rows = []
        for t in range(inp["x"].shape[0]):
            acc = torch.zeros(F, dtype=torch.float64)
            for k in range(K):
                e = int(inp["ids"][t, k])
                if e >= 0:
                    acc = acc + ws[r][t, k] * (xs[r][t] @ W[e])
            rows.append(acc)
        y = torch.stack(rows)
        ys.append(y.detach())
        loss = loss + (y * inp["g"]).sum()
    loss.backward()
    return [{"y": ys[r], "x": xs[r].grad, "w": ws[r].grad, "W": W.grad} for r in range(world)]


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_dispatchers_match_loop_reference(world: int) -> None:
    results = launch(_dispatch_worker, world, timeout_s=120, start_method="fork")
    ref = _reference(world)
    for rank in range(world):
        for case, got in results[rank].items():
            lo, hi = int(got["lo"]), int(got["hi"])
            for key in ("y", "x", "w"):
                torch.testing.assert_close(got[key], ref[rank][key], rtol=1e-12, atol=1e-12,
                                           msg=f"rank {rank} {case} {key}")
            torch.testing.assert_close(got["W"], ref[rank]["W"][lo:hi], rtol=1e-12, atol=1e-12,
                                       msg=f"rank {rank} {case} W")
            assert got["overlap_diff"] == 0, f"rank {rank} {case}: overlapped combine differs"


def test_local_permute_worked_example() -> None:
    # Local experts [2, 4) of E=4; rows r0: ids [2, 0], r1: [3, 2], r2: [-1, 3].
    # Pairs here: (0,0)->e0, (1,0)->e1, (1,1)->e0, (2,1)->e1; sorted by local expert:
    # [(0,0), (1,1), (1,0), (2,1)] -> source rows [0, 1, 1, 2], counts [2, 2].
    x = torch.arange(3.0).unsqueeze(1).repeat(1, 2)
    ids = torch.tensor([[2, 0], [3, 2], [-1, 3]])
    w = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.0, 1.0]])
    x_ND, counts, meta = local_permute(x, ids, w, offset=2, num_local=2)
    assert x_ND[:, 0].tolist() == [0.0, 1.0, 1.0, 2.0] and counts.tolist() == [2, 2]
    y = local_combine(x_ND * 10, meta)
    # row 0: 0.5 * 0; row 1: (0.25 + 0.75) * 10; row 2: 1.0 * 20; the pair (0,1) on expert 0 is elsewhere.
    assert y[:, 0].tolist() == [0.0, 10.0, 20.0]


def test_auto_rule() -> None:
    assert resolve_dispatcher("auto", 1, 6, False) == "local"
    assert resolve_dispatcher("auto", 2, 6, False) == "allgather"  # 1 - 0.5^6 = 0.98
    assert resolve_dispatcher("auto", 2, 2, False) == "alltoall"  # 0.75
    assert resolve_dispatcher("auto", 4, 8, False) == "alltoall"  # 0.8999
    assert resolve_dispatcher("auto", 4, 9, False) == "allgather"  # 0.925
    assert resolve_dispatcher("auto", 8, 8, False) == "alltoall"  # 0.66
    assert resolve_dispatcher("auto", 8, 8, True) == "hierarchical"
    assert resolve_dispatcher("alltoall", 2, 6, False) == "alltoall"
