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


def _rank_inputs(rank: int, variant: str = "random") -> dict[str, torch.Tensor]:
    """One rank's inputs. Variants for the edge cases (EP 2, E_l = 4): ``own_experts`` (every
    pair on the rank's own experts: nothing is computed elsewhere, so no pad row), ``empty``
    (rank 1 has no tokens), ``all_dropped`` (rank 1's pairs are all dropped)."""
    g = torch.Generator().manual_seed(50 + rank)
    T = 3 + 2 * rank  # uneven: 3, 5, 7, 9 tokens
    if variant == "empty" and rank == 1:
        T = 0
    rows = [torch.randperm(E, generator=g)[:K] for _ in range(T)]
    ids = torch.stack(rows) if rows else torch.zeros(0, K, dtype=torch.long)
    if variant == "own_experts":
        ids = torch.stack([torch.randperm(E // 2, generator=g)[:K] for _ in range(T)]) + rank * (E // 2)
    drop = torch.rand(T, K, generator=g) < (1.0 if variant == "all_dropped" and rank == 1 else 0.15)
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


def _dispatch_worker(rank: int, world: int, variant: str = "random", cases=None) -> dict[str, dict]:
    out = {}
    inp = _rank_inputs(rank, variant)
    for kind, ep, node in cases or CASES[world]:
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
        W_grad = _grad(W)
        from anymoe.core.collectives import all_reduce_
        all_reduce_(W_grad, groups.edp)
        out[f"{kind}/{ep}/{node}"] = {"y": y.detach(), "x": _grad(x), "w": _grad(w), "W": W_grad,
                                      "lo": torch.tensor(lo), "hi": torch.tensor(hi),
                                      "overlap_diff": _overlap_diff(disp, inp, W.detach())}
    assert world_group().size == world
    return out


def _grad(t: torch.Tensor) -> torch.Tensor:
    """t's gradient; zeros where the loss did not reach t (a rank with no tokens)."""
    return torch.zeros_like(t) if t.grad is None else t.grad.clone()


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
        results.append(torch.cat([y.detach().flatten(), _grad(x).flatten(), _grad(w).flatten()]))
    return torch.cat([(results[0] - results[1]).abs(), results[0].new_zeros(1)]).max()


def _reference(world: int, variant: str = "random") -> list[dict[str, torch.Tensor]]:
    W = _weights().requires_grad_()
    ranks = [_rank_inputs(r, variant) for r in range(world)]
    xs = [r["x"].clone().requires_grad_() for r in ranks]
    ws = [r["w"].clone().requires_grad_() for r in ranks]
    loss = 0
    ys = []
    for r, inp in enumerate(ranks):
        rows = [torch.zeros(0, F, dtype=torch.float64)]
        for t in range(inp["x"].shape[0]):
            acc = torch.zeros(F, dtype=torch.float64)
            for k in range(K):
                e = int(inp["ids"][t, k])
                if e >= 0:
                    acc = acc + ws[r][t, k] * (xs[r][t] @ W[e])
            rows.append(acc.unsqueeze(0))
        y = torch.cat(rows)
        ys.append(y.detach())
        loss = loss + (y * inp["g"]).sum()
    loss.backward()
    return [{"y": ys[r], "x": _grad(xs[r]), "w": _grad(ws[r]), "W": _grad(W)} for r in range(world)]


def _check(results: list[dict], ref: list[dict]) -> None:
    for rank, per_case in enumerate(results):
        for case, got in per_case.items():
            lo, hi = int(got["lo"]), int(got["hi"])
            for key in ("y", "x", "w"):
                torch.testing.assert_close(got[key], ref[rank][key], rtol=1e-12, atol=1e-12,
                                           msg=f"rank {rank} {case} {key}")
            torch.testing.assert_close(got["W"], ref[rank]["W"][lo:hi], rtol=1e-12, atol=1e-12,
                                       msg=f"rank {rank} {case} W")
            assert got["overlap_diff"] == 0, f"rank {rank} {case}: overlapped combine differs"


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_dispatchers_match_loop_reference(world: int) -> None:
    _check(launch(_dispatch_worker, world, timeout_s=120, start_method="fork"), _reference(world))


EDGE_CASES = ("own_experts", "empty", "all_dropped")


def _edge_worker(rank: int, world: int) -> dict[str, dict]:
    return {v: _dispatch_worker(rank, world, v, CASES[2][:4]) for v in EDGE_CASES}


@pytest.mark.multiproc
def test_dispatchers_edge_cases() -> None:
    """Nothing computed elsewhere (no pad row), a rank with no tokens, a rank with every pair dropped."""
    results = launch(_edge_worker, 2, timeout_s=120, start_method="fork")
    for variant in EDGE_CASES:
        _check([r[variant] for r in results], _reference(2, variant))


def test_dispatchers_on_a_group_of_one() -> None:
    """EP 1 (what bench/ep_dispatch.py --nproc 1 times): every collective is the identity, the
    dispatchers' local work is the same; no process group needed."""
    cases = [(kind, 1, None) for kind in ("alltoall", "alltoall_oneread", "allgather")]
    cases.append(("hierarchical", 1, 1))
    _check([_dispatch_worker(0, 1, "random", cases)], _reference(1))


def test_local_permute_worked_example() -> None:
    # Local experts [2, 4) of E=4; rows r0: ids [2, 0], r1: [3, 2], r2: [-1, 3].
    # Pairs here: (0,0)->e0, (1,0)->e1, (1,1)->e0, (2,1)->e1; sorted by local expert:
    # [(0,0), (1,1), (1,0), (2,1)] -> source rows [0, 1, 1, 2], then the zero pad row 4 that the
    # pairs (0,1) and (2,0) (elsewhere / dropped) point at, counted into the last expert: counts [2, 3].
    x = torch.arange(1.0, 4.0).unsqueeze(1).repeat(1, 2)
    ids = torch.tensor([[2, 0], [3, 2], [-1, 3]])
    w = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.0, 1.0]])
    for pairs in (None, 4):  # N read on the host, or known from the split exchange
        x_ND, counts, meta = local_permute(x, ids, w, offset=2, num_local=2, pairs=pairs)
        assert x_ND[:, 0].tolist() == [1.0, 2.0, 2.0, 3.0, 0.0] and counts.tolist() == [2, 3]
        assert meta.pos_RK.tolist() == [[0, 4], [2, 1], [4, 3]]
    y = local_combine(x_ND * 10, meta)
    # row 0: 0.5 * 10; row 1: (0.25 + 0.75) * 20; row 2: 1.0 * 30; the pair (0,1) on expert 0 is elsewhere.
    assert y[:, 0].tolist() == [5.0, 20.0, 30.0]
    # Every pair here: no pad row, N = R * K rows.
    x_ND, counts, meta = local_permute(x[:2], torch.tensor([[3, 2], [2, 3]]), w[:2], offset=2, num_local=2)
    assert x_ND[:, 0].tolist() == [1.0, 2.0, 1.0, 2.0] and counts.tolist() == [2, 2]


def test_auto_rule() -> None:
    assert resolve_dispatcher("auto", 1, 6, False) == "local"
    assert resolve_dispatcher("auto", 2, 6, False) == "allgather"  # 1 - 0.5^6 = 0.98
    assert resolve_dispatcher("auto", 2, 2, False) == "alltoall"  # 0.75
    assert resolve_dispatcher("auto", 4, 8, False) == "alltoall"  # 0.8999
    assert resolve_dispatcher("auto", 4, 9, False) == "allgather"  # 0.925
    assert resolve_dispatcher("auto", 8, 8, False) == "alltoall"  # 0.66
    assert resolve_dispatcher("auto", 8, 8, True) == "hierarchical"
    assert resolve_dispatcher("alltoall", 2, 6, False) == "alltoall"
