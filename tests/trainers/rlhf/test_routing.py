"""Routing agreement, router KL and expert load against plain loops."""

import math

import pytest
import torch

from anymoe.trainers.rlhf.routing import expert_load, layered_agreement, router_kl, routing_agreement


def test_agreement_worked_example():
    a = torch.tensor([[0, 1], [2, 3]])
    b = torch.tensor([[1, 0], [2, 0]])
    assert routing_agreement(a, b) == {"exact": 0.5, "overlap": 0.75}
    assert routing_agreement(a, b, torch.tensor([1, 0]))["exact"] == 1.0


def test_agreement_matches_loop():
    g = torch.Generator().manual_seed(0)
    E, K, T = 6, 2, 50
    a = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    b = a.clone()
    flip = torch.rand(T, generator=g) < 0.4
    b[flip] = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(int(flip.sum()))])
    exact = sum(set(a[t].tolist()) == set(b[t].tolist()) for t in range(T)) / T
    overlap = sum(len(set(a[t].tolist()) & set(b[t].tolist())) / K for t in range(T)) / T
    got = layered_agreement([a, a], [b, a])
    assert got["layer0"] == pytest.approx(exact)
    assert got["layer1"] == 1.0
    assert got["exact"] == pytest.approx((exact + 1) / 2)
    assert got["overlap"] == pytest.approx((overlap + 1) / 2)


def test_router_kl_matches_loop_forward_and_backward():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lq = torch.randn(5, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1])
    out = router_kl(torch.softmax(lp, -1), torch.softmax(lq, -1), mask)
    p, q = torch.softmax(lp.detach(), -1), torch.softmax(lq, -1)
    ref = sum(sum(float(p[t, e]) * math.log(float(p[t, e]) / float(q[t, e])) for e in range(4))
              for t in range(5) if mask[t]) / 4
    assert out.item() == pytest.approx(ref, rel=1e-5)
    out.backward()
    assert lp.grad[2].abs().max() == 0 and lp.grad.abs().sum() > 0
    assert router_kl(q, q).item() == pytest.approx(0.0, abs=1e-7)


def test_expert_load():
    ids = torch.tensor([[0, 1], [0, 2], [3, 0]])
    torch.testing.assert_close(expert_load(ids, 5), torch.tensor([3, 1, 1, 1, 0]) / 6)
