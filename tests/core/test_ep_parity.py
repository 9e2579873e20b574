"""EP = 1, 2, 4 give the single-process MoE layer's outputs and gradients (fp32, rel diff <= 1e-5).

Every worker also builds the reference: one process, all experts, the concatenated batch of
every rank, ``LocalDispatcher``. Each rank's loss is the mean over its own tokens plus the
balance losses; the reference loss is the mean over all tokens plus its balance losses, so
(with equal local batches) it is the mean of the rank losses and, after ``sync_gradients``,
every parameter's gradient must equal the reference's. Balance statistics: the global-batch
aux loss averaged over the world, and the EP-group loss averaged over an EP group, equal
the single-process values on the concatenated batch (global, resp. that EP group's).
Relative difference = max |a - b| / max |b| per tensor.
"""

from __future__ import annotations

import pytest
import torch

from anymoe.core import collectives as C
from anymoe.core.balance import BalanceConfig
from anymoe.core.ep_dispatch import build_dispatcher
from anymoe.core.launch import launch
from anymoe.core.moe import MoEConfig, MoELayer
from anymoe.core.parallel import ParallelConfig, attach_groups, build_parallel_groups, sync_gradients

E, K, D, FH, B, S = 8, 3, 16, 12, 2, 5
TOL = 1e-5


def _moe_cfg(ep_groups: int, ep_loss: bool) -> MoEConfig:
    balance = BalanceConfig(aux_loss=0.01, global_batch=True, z_loss=1e-3, aux_free=True,
                            ep_group_loss=0.02 if ep_loss else 0.0, ep_groups=ep_groups)
    return MoEConfig(num_experts=E, top_k=K, expert_hidden=FH, balance=balance, shared_experts=1)


def _batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(world * B, S, D, generator=g), torch.randn(world * B, S, D, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _step(layer: MoELayer, x: torch.Tensor, target: torch.Tensor):
    x = x.clone().requires_grad_()
    y, aux = layer(x)
    loss = (y * target).sum(-1).mean() + aux.loss
    loss.backward()
    return y.detach(), x.grad, aux


# (world, ep, dispatcher, node_size, EP-group loss in the gradient check)
CASES = {
    2: [(2, 1, "auto", None, True), (2, 2, "alltoall", None, True), (2, 2, "allgather", None, True),
        (2, 2, "hierarchical", 1, True)],
    4: [(4, 4, "alltoall", None, True), (4, 4, "allgather", None, True), (4, 4, "hierarchical", 2, True),
        (4, 2, "alltoall", None, False), (4, 2, "hierarchical", 1, False)],
}


def _parity_worker(rank: int, world: int) -> dict[str, dict[str, float]]:
    x_all, t_all = _batch(world)
    out = {}
    for _, ep, name, node, ep_loss in CASES[world]:
        groups = build_parallel_groups(ParallelConfig(ep=ep, node_size=node, dispatcher=name), "cpu",
                                       num_experts=E)
        cfg = _moe_cfg(0, ep_loss)
        torch.manual_seed(11)
        ref = MoELayer(_moe_cfg(ep, ep_loss), D)
        torch.manual_seed(11)
        layer = MoELayer(cfg, D, dispatcher=build_dispatcher(cfg, groups) if ep > 1 else None)
        attach_groups(layer, groups)
        shard = slice(rank * B, (rank + 1) * B)
        y, dx, aux = _step(layer, x_all[shard], t_all[shard])
        sync_gradients(layer, groups)
        y_ref, dx_ref, aux_ref = _step(ref, x_all, t_all)
        res = {"y": _rel(y, y_ref[shard]), "dx": _rel(dx / world, dx_ref[shard])}
        lo, hi = groups.expert_range(E)
        ref_params = dict(ref.named_parameters())
        for pname, p in layer.named_parameters():
            want = ref_params[pname].grad
            if pname.startswith("experts."):
                want = want[lo:hi]
            assert p.grad is not None and p.grad.shape == want.shape, pname
            res["grad." + pname] = _rel(p.grad, want)
        # Balance statistics over the right group.
        res["aux_loss"] = _rel(C.all_reduce(aux.losses["aux_loss"], groups.world, "avg"),
                               aux_ref.losses["aux_loss"])
        res["z_loss"] = _rel(C.all_reduce(aux.losses["z_loss"], groups.world, "avg"),
                             aux_ref.losses["z_loss"])
        # EP-group loss: an EP group's mean equals one process on that group's batch.
        first = groups.ep.ranks[0]
        ep_rows = slice(first * B, (first + groups.ep.size) * B)
        torch.manual_seed(11)
        sub_ref = MoELayer(_moe_cfg(ep, True), D)
        _, _, aux_sub = _step(sub_ref, x_all[ep_rows], t_all[ep_rows])
        layer_ep = MoELayer(_moe_cfg(0, True), D,
                            dispatcher=build_dispatcher(cfg, groups) if ep > 1 else None)
        attach_groups(layer_ep, groups)
        layer_ep.load_state_dict(layer.state_dict(), strict=False)
        if ep > 1:
            _, _, aux_ep = _step(layer_ep, x_all[shard], t_all[shard])
            res["ep_group_loss"] = _rel(C.all_reduce(aux_ep.losses["ep_group_loss"], groups.ep, "avg"),
                                        aux_sub.losses["ep_group_loss"])
        # Aux-free bias: loads summed over every replica of the router give the same step.
        layer.update_bias()
        ref.update_bias()
        res["expert_bias"] = float((layer.router.expert_bias - ref.router.expert_bias).abs().max())
        out[f"world{world}/ep{ep}/{name}/node{node}"] = res
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_ep_layer_parity(world: int) -> None:
    results = launch(_parity_worker, world, timeout_s=180, start_method="fork")
    for rank, per_case in enumerate(results):
        assert len(per_case) == len(CASES[world])
        for case, diffs in per_case.items():
            bad = {k: v for k, v in diffs.items() if not v <= TOL}
            assert not bad, f"rank {rank} {case}: {bad}"


# ------------------------------------------------------------------------------------------------
# 20 training steps: the loss curve at EP 2 and 4 equals one process on the global batch.
# ------------------------------------------------------------------------------------------------

STEPS = 20
TRAIN_CASES = {"fast": [(4, "alltoall", None), (2, "hierarchical", 1)],
               "slow": [(4, "allgather", None), (4, "hierarchical", 2), (2, "allgather", None)]}


class _TinyLM(torch.nn.Module):
    """in-proj -> MoE (+ residual) -> out-proj; enough to train router, experts and dense weights."""

    def __init__(self, cfg: MoEConfig, dispatcher=None) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(D, D)
        self.moe = MoELayer(cfg, D, dispatcher=dispatcher)
        self.out = torch.nn.Linear(D, D)

    def forward(self, x: torch.Tensor):
        h = self.inp(x)
        y, aux = self.moe(h)
        return self.out(h + y), aux


def _curve(model: _TinyLM, batches: list[tuple[torch.Tensor, torch.Tensor]], groups=None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for x, target in batches:
        opt.zero_grad()
        y, aux = model(x)
        task = (y - target).square().mean()
        (task + aux.loss).backward()
        if groups is not None:
            sync_gradients(model, groups)
            task = C.all_reduce(task.detach(), groups.world, "avg")
        opt.step()
        model.moe.update_bias()
        losses.append(float(task))
    return losses


def _train_worker(rank: int, world: int, which: str) -> dict[str, list[list[float]]]:
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(D, D, generator=g) / D**0.5  # a learnable target: tanh(x A)
    xs = [torch.randn(world * B, S, D, generator=g) for _ in range(STEPS)]
    batches = [(x, torch.tanh(x @ teacher)) for x in xs]
    cfg = _moe_cfg(0, False)
    torch.manual_seed(21)
    ref = _curve(_TinyLM(cfg), batches)
    out = {}
    shard = slice(rank * B, (rank + 1) * B)
    for ep, name, node in TRAIN_CASES[which]:
        groups = build_parallel_groups(ParallelConfig(ep=ep, node_size=node, dispatcher=name), "cpu",
                                       num_experts=E)
        torch.manual_seed(21)
        model = _TinyLM(cfg, build_dispatcher(cfg, groups))
        attach_groups(model, groups)
        out[f"ep{ep}/{name}/node{node}"] = [_curve(model, [(x[shard], t[shard]) for x, t in batches], groups),
                                            ref]
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("which", ["fast", pytest.param("slow", marks=pytest.mark.slow)])
def test_twenty_steps_same_loss_curve(which: str) -> None:
    results = launch(_train_worker, 4, (which,), timeout_s=300, start_method="fork")
    for rank, per_case in enumerate(results):
        for case, (curve, ref) in per_case.items():
            assert len(curve) == STEPS
            rel = max(abs(a - b) / abs(b) for a, b in zip(curve, ref))
            assert rel <= TOL, f"rank {rank} {case}: max rel diff {rel:.2e}\n{curve}\n{ref}"
    curve, ref = next(iter(results[0].values()))
    assert ref[-1] < 0.8 * ref[0], f"the reference did not learn: {ref}"
