"""The Experience record keeps rows and their routing ids together when split."""

import torch

from anymoe.trainers.rlhf.experience import Experience


def _exp(B=4, P=2, R=3, K=2):
    L = P + R
    z = torch.zeros(B, R)
    return Experience(
        sequences_BL=torch.arange(B * L).view(B, L), prompt_len=P, mask_BR=torch.ones(B, R),
        rollout_logp_BR=z.clone(), old_logp_BR=torch.arange(B * R).float().view(B, R),
        scores_B=torch.arange(B).float(),
        token_rewards_BR=z.clone(), advantages_BR=z.clone(), returns_BR=z.clone(),
        routing_NTK=[torch.arange(B * L).view(-1, 1).repeat(1, K)], texts=[str(i) for i in range(B)],
        reward_parts={"x": torch.arange(B).float()},
    ).check()


def test_select_keeps_rows_and_routing_aligned():
    e = _exp()
    sub = e.select(torch.tensor([2, 0]))
    assert sub.sequences_BL[:, 0].tolist() == [10, 0]
    # routing ids of token (b, l) were set to b*L + l: the selected tokens follow their rows
    assert sub.routing_NTK[0][:, 0].tolist() == list(range(10, 15)) + list(range(0, 5))
    assert sub.texts == ["2", "0"] and sub.reward_parts["x"].tolist() == [2.0, 0.0]
    sub.check()


def test_micro_batches_cover_every_row_once():
    e = _exp(B=5)
    parts = e.micro_batches(2, torch.Generator().manual_seed(0))
    assert [p.batch_size for p in parts] == [2, 2, 1]
    rows = sorted(int(s) for p in parts for s in p.scores_B)
    assert rows == [0, 1, 2, 3, 4]
