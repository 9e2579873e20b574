"""Every loss against a float64 plain-loop reimplementation, forward and backward."""

import math

import pytest
import torch

from anymoe.core.config import ConfigError
from anymoe.trainers.rlhf import losses as L


def _mask(B, R, g):
    lens = torch.randint(1, R + 1, (B,), generator=g)
    return (torch.arange(R) < lens[:, None]).double()


def _ref_policy_loss(logp, old, adv, mask, eps_lo, eps_hi, agg, max_len):
    B, R = logp.shape
    per = [[0.0] * R for _ in range(B)]
    for b in range(B):
        for r in range(R):
            ratio = torch.exp(logp[b, r] - old[b, r])
            s1 = ratio * adv[b, r]
            s2 = torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi) * adv[b, r]
            per[b][r] = -torch.minimum(s1, s2) * mask[b, r]
    if agg == "token-mean":
        return sum(sum(row) for row in per) / mask.sum()
    if agg == "seq-mean":
        return sum(sum(per[b]) / mask[b].sum() for b in range(B)) / B
    return sum(sum(row) for row in per) / (B * max_len)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "dr-grpo"])
@pytest.mark.parametrize("eps_hi", [None, 0.28])
def test_policy_loss_matches_loop(agg, eps_hi):
    g = torch.Generator().manual_seed(1)
    B, R = 4, 6
    logp = (torch.randn(B, R, generator=g, dtype=torch.float64) * 0.3 - 1).requires_grad_()
    old = logp.detach() + torch.randn(B, R, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, R, generator=g, dtype=torch.float64)
    mask = _mask(B, R, g)
    loss, stats = L.policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=eps_hi, agg=agg, max_len=8)
    logp_ref = logp.detach().clone().requires_grad_()
    ref = _ref_policy_loss(logp_ref, old, adv, mask, 0.2, eps_hi or 0.2, agg, 8)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logp.grad, logp_ref.grad)
    assert 0.0 < stats["clip_frac"] < 1.0


def test_policy_loss_ratio_one_gives_minus_mean_advantage_and_no_clip():
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    logp = torch.zeros(1, 3)
    loss, stats = L.policy_loss(logp, logp, adv, torch.ones(1, 3))
    assert loss.item() == pytest.approx(-2.0 / 3)
    assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == 1.0


def test_dual_clip_and_is_weight():
    logp = torch.tensor([[2.0]], dtype=torch.float64)
    old = torch.zeros(1, 1, dtype=torch.float64)
    adv = torch.tensor([[-1.0]], dtype=torch.float64)
    plain, _ = L.policy_loss(logp, old, adv, torch.ones(1, 1))
    assert plain.item() == pytest.approx(math.exp(2.0))
    dual, _ = L.policy_loss(logp, old, adv, torch.ones(1, 1), dual_clip=3.0)
    assert dual.item() == pytest.approx(3.0)
    w = torch.tensor([[0.5]], dtype=torch.float64)
    weighted, _ = L.policy_loss(logp, old, adv, torch.ones(1, 1), is_weight=w)
    assert weighted.item() == pytest.approx(0.5 * math.exp(2.0))


def test_truncated_is_weight_caps_and_detaches():
    train = torch.tensor([0.0, 1.0, -1.0], requires_grad=True)
    roll = torch.zeros(3)
    w = L.truncated_is_weight(train, roll, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, math.exp(-1.0)]))
    assert not w.requires_grad


def test_value_loss_matches_loop():
    g = torch.Generator().manual_seed(2)
    B, R = 3, 5
    v = torch.randn(B, R, generator=g, dtype=torch.float64, requires_grad=True)
    old = v.detach() + 0.3 * torch.randn(B, R, generator=g, dtype=torch.float64)
    ret = torch.randn(B, R, generator=g, dtype=torch.float64)
    mask = _mask(B, R, g)
    loss, _ = L.value_loss(v, old, ret, mask, clip_eps=0.2)
    v2 = v.detach().clone().requires_grad_()
    total = 0
    for b in range(B):
        for r in range(R):
            vc = old[b, r] + torch.clamp(v2[b, r] - old[b, r], -0.2, 0.2)
            err = torch.maximum((v2[b, r] - ret[b, r]) ** 2, (vc - ret[b, r]) ** 2)
            total = total + 0.5 * err * mask[b, r]
    ref = total / mask.sum()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(v.grad, v2.grad)


def test_kl_estimators():
    p = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    q = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    torch.testing.assert_close(L.kl_penalty(p, q, "k1"), p - q)
    torch.testing.assert_close(L.kl_penalty(p, q, "k2"), 0.5 * (p - q) ** 2)
    torch.testing.assert_close(L.kl_penalty(p, q, "k3"), torch.exp(q - p) - 1 - (q - p))
    assert (L.kl_penalty(p, q, "k3") >= 0).all()
    # k1 and k3 are unbiased: their means over samples of p approach KL(p||q).
    g = torch.Generator().manual_seed(0)
    pp = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    qq = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    x = torch.multinomial(pp, 200000, replacement=True, generator=g)
    exact = (pp * (pp / qq).log()).sum()
    for kind in ("k1", "k3"):
        est = L.kl_penalty(pp.log()[x], qq.log()[x], kind).mean()
        assert abs(est - exact) < 5e-3
    with pytest.raises(ConfigError, match="kl.kind"):
        L.kl_penalty(p, q, "k9")


def _ref_dpo(pc, pr, rc, rr, beta, loss_type, ls):
    """Float64, scalar by scalar, from the papers' formulas."""
    out, cr, rj = [], [], []
    for i in range(len(pc)):
        h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        if loss_type == "sigmoid":
            sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
            out.append(-(1 - ls) * math.log(sig(beta * h)) - ls * math.log(sig(-beta * h)))
        else:
            out.append((h - 1 / (2 * beta)) ** 2)
        cr.append(beta * (float(pc[i]) - float(rc[i])))
        rj.append(beta * (float(pr[i]) - float(rr[i])))
    return torch.tensor(out, dtype=torch.float64), torch.tensor(cr, dtype=torch.float64), \
        torch.tensor(rj, dtype=torch.float64)


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_loss_and_rewards_match_independent_float64(loss_type, ls):
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 5 - 20 for _ in range(4))
    pc.requires_grad_()
    losses, cr, rj = L.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=ls)
    ref, cr_ref, rj_ref = _ref_dpo(pc.detach(), pr, rc, rr, 0.2, loss_type, ls)
    torch.testing.assert_close(losses, ref)
    torch.testing.assert_close(cr, cr_ref)
    torch.testing.assert_close(rj, rj_ref)
    # Backward against a central finite difference in float64.
    losses.sum().backward()
    for i in range(3):
        e = torch.zeros(6, dtype=torch.float64)
        e[i] = 1e-6
        up, _, _ = L.dpo_loss(pc.detach() + e, pr, rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=ls)
        dn, _, _ = L.dpo_loss(pc.detach() - e, pr, rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=ls)
        assert pc.grad[i].item() == pytest.approx(((up - dn).sum() / 2e-6).item(), rel=1e-5, abs=1e-8)


def test_bradley_terry():
    rc = torch.tensor([1.0, 0.0], dtype=torch.float64)
    rr = torch.tensor([0.0, 2.0], dtype=torch.float64)
    ref = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(2.0))) / 2
    assert L.bradley_terry_loss(rc, rr).item() == pytest.approx(ref)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "dr-grpo"])
def test_aggregate_weights(agg):
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    want = {"token-mean": 8 / 5, "seq-mean": (1 + 4) / 2, "dr-grpo": 8 / (2 * 4)}[agg]
    assert L.aggregate(loss, mask, agg).item() == pytest.approx(want)


def test_token_logprobs_and_entropy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    tgt = torch.randint(0, 7, (2, 3), generator=g)
    lp = L.token_logprobs(logits, tgt)
    for b in range(2):
        for s in range(3):
            p = torch.softmax(logits[b, s], -1)
            assert lp[b, s].item() == pytest.approx(math.log(p[tgt[b, s]].item()), rel=1e-5)
            ent = -(p * p.log()).sum().item()
            assert L.entropy_from_logits(logits)[b, s].item() == pytest.approx(ent, rel=1e-5)
