"""Advantage estimators against float64 plain loops written from the papers."""

import pytest
import torch

from anymoe.core.config import ConfigError
from anymoe.trainers.rlhf.advantages import ADVANTAGES, AdvantageInputs, get_advantage, register_advantage


def _batch(B=4, R=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, R + 1, (B,), generator=g)
    mask = (torch.arange(R) < lens[:, None]).double()
    rewards = torch.randn(B, R, generator=g, dtype=torch.float64) * mask
    values = torch.randn(B, R, generator=g, dtype=torch.float64)
    return rewards, mask, values, lens


def test_gae_matches_loop():
    rewards, mask, values, lens = _batch()
    gamma, lam = 0.97, 0.9
    adv, ret = ADVANTAGES["gae"](AdvantageInputs(rewards, mask, values, gamma=gamma, lam=lam))
    for b in range(rewards.shape[0]):
        n = int(lens[b])
        a_next = 0.0
        for t in reversed(range(n)):
            v_next = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * v_next - float(values[b, t])
            a_next = delta + gamma * lam * a_next
            assert adv[b, t].item() == pytest.approx(a_next, abs=1e-10)
            assert ret[b, t].item() == pytest.approx(a_next + float(values[b, t]), abs=1e-10)
        assert (adv[b, n:] == 0).all()


def test_gae_lambda_one_is_return_minus_value():
    rewards, mask, values, lens = _batch(seed=1)
    adv, _ = ADVANTAGES["gae"](AdvantageInputs(rewards, mask, values, gamma=1.0, lam=1.0))
    ret = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1])
    torch.testing.assert_close(adv, (ret - values) * mask)


@pytest.mark.parametrize("norm_std", [True, False])
def test_grpo_matches_loop(norm_std):
    B, R, G = 6, 4, 3
    _, mask, _, lens = _batch(B, R, seed=2)
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, -1.0], dtype=torch.float64)
    rewards = torch.zeros(B, R, dtype=torch.float64)
    rewards[torch.arange(B), lens - 1] = scores
    adv, _ = ADVANTAGES["grpo"](AdvantageInputs(rewards, mask, group_size=G, norm_std=norm_std, eps=0.0))
    for b in range(B):
        grp = [float(s) for s in scores[(b // G) * G:(b // G + 1) * G]]
        mean = sum(grp) / G
        std = (sum((x - mean) ** 2 for x in grp) / (G - 1)) ** 0.5
        want = (float(scores[b]) - mean) / (std if norm_std else 1.0)
        for t in range(R):
            assert adv[b, t].item() == pytest.approx(want * float(mask[b, t]))


def test_rloo_matches_loop():
    B, R, G = 4, 3, 4
    mask = torch.ones(B, R, dtype=torch.float64)
    scores = torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    rewards = torch.zeros(B, R, dtype=torch.float64)
    rewards[:, -1] = scores
    adv, _ = ADVANTAGES["rloo"](AdvantageInputs(rewards, mask, group_size=G))
    # worked example: sample 0 -> 3 - (1+0+0)/3 = 8/3
    assert adv[0, 0].item() == pytest.approx(8 / 3)
    for b in range(B):
        others = [float(scores[j]) for j in range(G) if j != b]
        assert adv[b, 1].item() == pytest.approx(float(scores[b]) - sum(others) / (G - 1))


def test_reinforce_pp_matches_loop():
    rewards, mask, _, lens = _batch(seed=3)
    gamma = 0.9
    adv, ret = ADVANTAGES["reinforce_pp"](AdvantageInputs(rewards, mask, gamma=gamma))
    G = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        run = 0.0
        for t in reversed(range(int(lens[b]))):
            run = float(rewards[b, t]) + gamma * run
            G[b, t] = run
    torch.testing.assert_close(ret, G)
    vals = [float(G[b, t]) for b in range(G.shape[0]) for t in range(int(lens[b]))]
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    torch.testing.assert_close(adv, (G - mean) / std * mask, atol=1e-6, rtol=1e-6)


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="twice"):
        register_advantage("gae")(lambda inp: inp)
    with pytest.raises(ConfigError, match="unknown advantage estimator 'ppo'"):
        get_advantage("ppo")
    with pytest.raises(ConfigError, match="group_size"):
        ADVANTAGES["grpo"](AdvantageInputs(torch.zeros(5, 2), torch.ones(5, 2), group_size=2))
    with pytest.raises(ConfigError, match="critic"):
        ADVANTAGES["gae"](AdvantageInputs(torch.zeros(2, 2), torch.ones(2, 2)))
