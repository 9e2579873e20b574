"""Balance losses equal their paper formulas on hand-computed cases; aux-free bias balances."""

import copy
import math

import pytest
import torch

from anymoe.core import balance as bal
from anymoe.core.config import load_config
from anymoe.core.moe import MoEConfig, MoELayer, moe_stats


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls on a shared 2-core box: OpenMP threads spin against each other (30 ms per
    # 30x16 @ 16x4 with 2 threads under load, 3 us with one).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_switch_aux_loss_hand_case():
    # T=2, E=2, K=1: both tokens pick expert 0 -> counts [2, 0], f = E*c/(T K) = [2, 0];
    # P = mean probs = [0.7, 0.3]; loss = sum f P = 1.4 (1.0 would be perfectly balanced).
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]], dtype=torch.float64)
    ids = torch.tensor([[0], [0]])
    assert bal.aux_loss(probs, ids).item() == pytest.approx(1.4)
    assert bal.aux_loss(probs, ids, group=None).item() == pytest.approx(1.4)  # world of one
    # Balanced choice and uniform probabilities give exactly 1.
    balanced = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    assert bal.aux_loss(torch.full((4, 4), 0.25), balanced).item() == 1.0


def test_seq_aux_loss_hand_case():
    # B=2, S=2, E=2, K=1. Sequence 0 as above: 1.4. Sequence 1: ids [1, 0] -> f = [1, 1],
    # P = [0.4, 0.6] -> 1.0. DeepSeek-V3 averages over sequences: 1.2. The batch-level loss
    # on the same tokens is different: counts [3, 1] -> f = [1.5, 0.5], P = [0.55, 0.45] -> 1.05.
    probs = torch.tensor([[[0.8, 0.2], [0.6, 0.4]], [[0.3, 0.7], [0.5, 0.5]]], dtype=torch.float64)
    ids = torch.tensor([[[0], [0]], [[1], [0]]])
    assert bal.seq_aux_loss(probs, ids).item() == pytest.approx(1.2)
    assert bal.aux_loss(probs.view(4, 2), ids.view(4, 1)).item() == pytest.approx(1.05)


def test_ep_group_loss_hand_case():
    # E=4 in G=2 groups {0,1}, {2,3}; T=3, K=1, ids [0, 1, 0] -> counts [2, 1, 0, 0],
    # f = 4/3 * counts = [8/3, 4/3, 0, 0], f' = group means = [2, 0];
    # P = [0.3, 1.1/3, 0.7/3, 0.1], P' = group sums = [2/3, 1/3]; loss = 2 * 2/3 = 4/3.
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.3, 0.3, 0.3, 0.1]],
                         dtype=torch.float64)
    ids = torch.tensor([[0], [1], [0]])
    assert bal.ep_group_loss(probs, ids, 2).item() == pytest.approx(4 / 3)
    # Expert-level loss on the same case: 8/3 * 0.3 + 4/3 * 1.1/3.
    assert bal.aux_loss(probs, ids).item() == pytest.approx(0.8 + 4.4 / 9)
    # One group per expert is the expert-level loss.
    assert bal.ep_group_loss(probs, ids, 4).item() == pytest.approx(bal.aux_loss(probs, ids).item())
    with pytest.raises(ValueError, match="divide"):
        bal.ep_group_loss(probs, ids, 3)


def test_z_loss_hand_case():
    # logsumexp rows: log(1 + 1) = ln 2, log(3 + 1) = 2 ln 2 -> mean of squares = 2.5 ln(2)^2.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    assert bal.z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2)


def test_sinkhorn_doubly_normalises():
    torch.manual_seed(0)
    logits = torch.randn(12, 4, dtype=torch.float64) * 3
    p = bal.sinkhorn(logits, iters=200)
    torch.testing.assert_close(p.sum(1), torch.full((12,), 1 / 12, dtype=torch.float64))
    torch.testing.assert_close(p.sum(0), torch.full((4,), 1 / 4, dtype=torch.float64))


def test_aux_free_update_rule():
    bias = torch.zeros(4)
    bal.aux_free_update(bias, torch.tensor([10.0, 2.0, 4.0, 4.0]), 0.1)  # mean 5
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def _layer(**balance):
    return MoELayer(load_config(MoEConfig, {"num_experts": 4, "top_k": 2, "expert_hidden": 6,
                                            "balance": balance}), 8)


@pytest.mark.parametrize("name", ["aux_loss", "seq_aux_loss", "ep_group_loss", "z_loss"])
def test_each_loss_gradient_reaches_router_only(name):
    torch.manual_seed(1)
    extra = {"ep_groups": 2} if name == "ep_group_loss" else {}
    layer = _layer(**{name: 0.5}, **extra)
    _, aux = layer(torch.randn(2, 5, 8))
    assert set(aux.losses) == {name}
    torch.testing.assert_close(aux.loss, 0.5 * aux.losses[name])
    aux.loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.experts.parameters())


def test_layer_losses_match_functions():
    torch.manual_seed(2)
    layer = _layer(aux_loss=1.0, seq_aux_loss=1.0, z_loss=1.0, ep_group_loss=1.0, ep_groups=2)
    x = torch.randn(3, 4, 8)
    _, aux = layer(x)
    ids, probs = aux.expert_ids, aux.router_probs
    logits = x.reshape(12, 8) @ layer.router.weight.t()
    torch.testing.assert_close(aux.losses["aux_loss"], bal.aux_loss(probs, ids))
    want_seq = bal.seq_aux_loss(probs.view(3, 4, 4), ids.view(3, 4, 2))
    torch.testing.assert_close(aux.losses["seq_aux_loss"], want_seq)
    torch.testing.assert_close(aux.losses["ep_group_loss"], bal.ep_group_loss(probs, ids, 2))
    torch.testing.assert_close(aux.losses["z_loss"], bal.z_loss(logits))


def test_sigmoid_seq_loss_uses_normalised_scores():
    torch.manual_seed(3)
    cfg = load_config(MoEConfig, {"num_experts": 4, "top_k": 2, "expert_hidden": 6,
                                  "router": {"score": "sigmoid"}, "balance": {"seq_aux_loss": 1.0}})
    layer = MoELayer(cfg, 8)
    x = torch.randn(2, 3, 8)
    _, aux = layer(x)
    s = torch.sigmoid(x.reshape(6, 8) @ layer.router.weight.t())
    torch.testing.assert_close(aux.router_probs, s / s.sum(-1, keepdim=True))


def test_aux_free_bias_balances_a_skewed_stream_without_touching_the_output():
    torch.manual_seed(4)
    cfg = load_config(MoEConfig, {"num_experts": 8, "top_k": 2, "expert_hidden": 4,
                                  "router": {"score": "sigmoid", "normalize_topk": True},
                                  "balance": {"aux_free": True, "bias_update_rate": 0.01}})
    layer = MoELayer(cfg, 16)
    skew = torch.randn(16) * 2  # a shared offset: a few experts win nearly every token
    stream = lambda: torch.randn(4, 32, 16) * 0.5 + skew  # noqa: E731
    layer.router.weight.data.normal_(0, 0.3)
    with torch.no_grad():
        first = moe_stats(layer(stream())[1])["max_over_mean"]
        for _ in range(300):
            layer(stream())
            layer.update_bias()
        last = sum(moe_stats(layer(stream())[1])["max_over_mean"] for _ in range(5)) / 5
    assert first > 2.5 and last < 1.5, (first, last)
    assert layer.router.load_accum.sum() > 0  # loads of the measuring calls, reset on the next update
    layer.update_bias()
    assert layer.router.load_accum.sum() == 0
    # Selection only: the same expert choice gives the same output and gradients with or
    # without the bias, and the bias gets no gradient.
    fresh = copy.deepcopy(layer)
    fresh.router.expert_bias.zero_()
    x = stream()
    y, aux = layer(x)
    y2, _ = fresh(x, replay_ids=aux.expert_ids)
    torch.testing.assert_close(y, y2)
    y.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(layer.router.weight.grad, fresh.router.weight.grad)
    assert not layer.router.expert_bias.requires_grad
    assert "router.expert_bias" in layer.state_dict()  # resumes with its bias


def test_bias_not_updated_in_eval_or_when_disabled():
    layer = _layer(aux_free=True)
    layer.eval()
    layer(torch.randn(2, 3, 8))
    assert layer.router.load_accum.sum() == 0
    plain = _layer()
    plain(torch.randn(2, 3, 8))
    plain.update_bias()
    assert plain.router.expert_bias.abs().sum() == 0


def _global_worker(rank: int, world: int) -> dict[str, object]:
    import torch.distributed as dist

    from anymoe.core.collectives import world_group

    torch.manual_seed(0)  # same weights on every rank
    layer = _layer(aux_loss=1.0, ep_group_loss=1.0, ep_groups=2, global_batch=True, aux_free=True)
    group = world_group() if rank == 0 else dist.group.WORLD  # a Group and a raw ProcessGroup both work
    layer.set_process_groups(dp=group, ep=group, bias=group)
    torch.manual_seed(100 + rank)  # different tokens per rank
    _, aux = layer(torch.randn(1, 6 + rank, 8))
    aux.loss.backward()
    loads = layer.router.load_accum.clone()
    layer.update_bias()
    return {"ids": aux.expert_ids, "probs": aux.router_probs.detach(), "losses": {k: v.detach() for k, v in
            aux.losses.items()}, "bias": layer.router.expert_bias.clone(), "loads": loads,
            "grad": layer.router.weight.grad.abs().sum()}


@pytest.mark.multiproc
def test_global_batch_and_ep_group_losses_over_two_processes():
    from anymoe.core.launch import launch

    res = launch(_global_worker, 2, timeout_s=120, start_method="fork")
    all_ids = torch.cat([r["ids"] for r in res])
    counts = torch.bincount(all_ids.reshape(-1), minlength=4).float()
    f = counts * 4 / all_ids.numel()  # f_i from the counts of both ranks
    for r in res:
        P = r["probs"].mean(0)  # P_i from this rank's tokens
        assert r["losses"]["aux_loss"].item() == pytest.approx(float((f * P).sum()))
        want_ep = float(f.view(2, 2).mean(-1) @ P.view(2, 2).sum(-1))
        assert r["losses"]["ep_group_loss"].item() == pytest.approx(want_ep)
        assert r["grad"] > 0
    loads = res[0]["loads"] + res[1]["loads"]
    torch.testing.assert_close(res[0]["bias"], res[1]["bias"])  # every replica takes the same step
    torch.testing.assert_close(res[0]["bias"], 1e-3 * torch.sign(loads.mean() - loads))
