"""Local dispatch and capacity against plain loops, forward and backward."""

import math

import pytest
import torch

from anymoe.core.dispatch import (
    LocalDispatcher,
    TokenDispatcher,
    apply_capacity,
    capacity_per_expert,
    sort_by_expert,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_worked_example():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    perm, counts, pos = sort_by_expert(ids, 3)
    assert perm.tolist() == [1, 2, 3, 5, 0, 4]
    assert counts.tolist() == [2, 2, 2]
    assert pos.tolist() == [[4, 0], [1, 2], [5, 3]]


def _ids(T, K, E, gen):
    return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])


@pytest.mark.parametrize("T,K,E", [(1, 1, 1), (9, 2, 4), (31, 3, 7), (16, 4, 16)])
def test_sort_by_expert_matches_loop(T, K, E):
    gen = torch.Generator().manual_seed(T + E)
    ids = _ids(T, K, E, gen)
    perm, counts, pos = sort_by_expert(ids, E)
    order = [(t, k) for e in range(E) for t in range(T) for k in range(K) if ids[t, k] == e]
    assert perm.tolist() == [t * K + k for t, k in order]
    assert counts.tolist() == [sum(1 for t, k in order if ids[t, k] == e) for e in range(E)]
    for r, (t, k) in enumerate(order):
        assert pos[t, k] == r


@pytest.mark.parametrize("drop", [False, True])
def test_local_dispatch_combine_matches_loop(drop):
    gen = torch.Generator().manual_seed(1)
    T, K, E, D = 13, 3, 5, 4
    ids = _ids(T, K, E, gen)
    if drop:
        ids[torch.rand(T, K, generator=gen) < 0.3] = -1
    x = torch.randn(T, D, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, generator=gen) * (ids >= 0)
    w.requires_grad_()
    scale = torch.randn(E, dtype=torch.float64, generator=gen, requires_grad=True)  # a per-expert "expert"
    disp = LocalDispatcher(E)
    assert isinstance(disp, TokenDispatcher)
    x_N, counts, meta = disp.dispatch(x, ids, w)
    assert x_N.shape == (T * K, D) and int(counts.sum()) == T * K
    expert_N = torch.repeat_interleave(torch.arange(E), counts)
    y = disp.combine(x_N * scale[expert_N].unsqueeze(1), meta)
    ref = torch.stack([sum((w[t, k] * scale[ids[t, k]] * x[t] for k in range(K) if ids[t, k] >= 0),
                           torch.zeros(D, dtype=torch.float64)) for t in range(T)])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-14)
    g = torch.randn(T, D, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((y * g).sum(), (x, w, scale), allow_unused=True)
    want = torch.autograd.grad((ref * g).sum(), (x, w, scale), allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    if drop:  # dropped rows are zero rows at the end of the last expert's block
        kept = int((ids >= 0).sum())
        assert torch.count_nonzero(x_N[kept:]) == 0


def ref_capacity(ids, priority, E, cap, policy):
    """Plain loop: per expert, rank its pairs (best score first, or token order), drop past cap."""
    T, K = ids.shape
    keep = torch.ones(T, K, dtype=torch.bool)
    for e in range(E):
        pairs = [(t, k) for t in range(T) for k in range(K) if ids[t, k] == e]
        if policy == "probs":
            pairs.sort(key=lambda p: -float(priority[p]))
        for t, k in pairs[cap:]:
            keep[t, k] = False
    return keep


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0, 1.5])
def test_capacity_matches_reference(policy, factor):
    gen = torch.Generator().manual_seed(int(factor * 8))
    T, K, E = 40, 2, 6
    logits = torch.randn(T, E, generator=gen) - torch.log(torch.arange(1, E + 1.0)) * 1.5  # skewed
    pri, ids = torch.softmax(logits, -1).topk(K)
    cap = capacity_per_expert(T, K, E, factor)
    assert cap == math.ceil(factor * T * K / E)
    new_ids, new_w, dropped = apply_capacity(ids, pri, pri, E, cap, policy)
    keep = ref_capacity(ids, pri, E, cap, policy)
    assert torch.equal(new_ids >= 0, keep)
    assert int(dropped) == int((~keep).sum())
    assert torch.equal(new_ids[keep], ids[keep]) and (new_w[~keep] == 0).all()
    load = torch.bincount(new_ids[new_ids >= 0], minlength=E)
    assert load.max() <= cap
    if factor == 0.25:
        assert int(dropped) > 0


def test_capacity_large_enough_drops_nothing():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2]])
    w = torch.rand(3, 2)
    new_ids, new_w, dropped = apply_capacity(ids, w, w, 3, 3, "probs")
    assert int(dropped) == 0 and torch.equal(new_ids, ids) and torch.equal(new_w, w)


def test_capacity_position_worked_example():
    # Expert 0 is chosen by tokens 0, 1, 2 (slots 0, 0, 0); capacity 2 keeps tokens 0 and 1.
    ids = torch.tensor([[0, 1], [0, 1], [0, 2]])
    new_ids, _, dropped = apply_capacity(ids, torch.ones(3, 2), torch.ones(3, 2), 3, 2, "position")
    assert new_ids.tolist() == [[0, 1], [0, 1], [-1, 2]] and int(dropped) == 1
    # By probability the highest-scoring two stay.
    pri = torch.tensor([[0.1, 0.5], [0.9, 0.5], [0.5, 0.5]])
    new_ids, _, _ = apply_capacity(ids, pri, pri, 3, 2, "probs")
    assert new_ids.tolist() == [[-1, 1], [0, 1], [0, 2]]
