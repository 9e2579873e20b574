"""Process-group layout, validation errors, group construction on 4 real processes, gradient sync."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anymoe.core import collectives as C
from anymoe.core.config import ConfigError, load_config
from anymoe.core.experts import Experts
from anymoe.core.launch import launch
from anymoe.core.parallel import (
    ParallelConfig,
    build_parallel_groups,
    full_state_dict,
    layout,
    local_state_dict,
    sync_gradients,
)


def test_layout_worked_example() -> None:
    # world 4, ep 2: EP {0,1} {2,3}; EDP {0,2} {1,3}.
    got = layout(4, 2, node_size=4)
    assert got["ep"] == [[0, 1], [2, 3]]
    assert got["edp"] == [[0, 2], [1, 3]]
    # world 8, ep 4, nodes of 2: each EP group spans 2 nodes.
    got = layout(8, 4, node_size=2)
    assert got["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert got["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert got["ep_intra"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert got["ep_inter"] == [[0, 2], [1, 3], [4, 6], [5, 7]]


@pytest.mark.parametrize("cfg, world, experts, field, words", [
    (dict(ep=8), 4, 16, "parallel.ep", "larger than the world"),
    (dict(ep=3), 4, 6, "parallel.ep", "does not divide the world"),
    (dict(ep=4), 4, 6, "parallel.ep", "not divisible"),
    (dict(ep=2, dp=3), 4, 8, "parallel.dp", "dp: 2"),
    (dict(ep=2, node_size=3), 6, 8, "parallel.node_size", "span whole nodes"),
    (dict(ep=1, node_size=4), 6, 8, "parallel.node_size", "does not divide the world"),
])
def test_validation_names_the_field(cfg, world, experts, field, words) -> None:
    with pytest.raises(ConfigError, match=words) as err:
        load_config(ParallelConfig, cfg).check_world(world, experts)
    assert err.value.field == field


def test_config_rejects_local_dispatcher_with_ep() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ParallelConfig, {"ep": 2, "dispatcher": "local"}, "parallel")
    assert err.value.field == "parallel.dispatcher"
    with pytest.raises(ConfigError) as err:
        load_config(ParallelConfig, {"dp": "many"}, "parallel")
    assert err.value.field == "parallel.dp"


def test_world_of_one_needs_no_process_group() -> None:
    groups = build_parallel_groups(ParallelConfig(), num_experts=8)
    assert groups.world_size == 1 and groups.ep_size == 1 and groups.edp_size == 1
    assert groups.world.pg is None and groups.expert_range(8) == (0, 8)
    model = nn.Linear(3, 3)
    model(torch.randn(2, 3)).sum().backward()
    before = model.weight.grad.clone()
    sync_gradients(model, groups)
    assert torch.equal(model.weight.grad, before)
    with pytest.raises(ConfigError, match="larger than the world"):
        build_parallel_groups(ParallelConfig(ep=2), num_experts=8)


class _Tiny(nn.Module):
    def __init__(self, num_experts: int, num_local: int, offset: int) -> None:
        super().__init__()
        self.dense = nn.Linear(3, 2)
        self.experts = Experts(num_experts, 3, 4, num_local=num_local, local_offset=offset)


def _groups_worker(rank: int, world: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, cfg in {"ep2": ParallelConfig(ep=2), "ep4_nodes2": ParallelConfig(ep=4, node_size=2),
                      "ep1": ParallelConfig(ep=1), "ep2_nodes1": ParallelConfig(ep=2, node_size=1)}.items():
        g = build_parallel_groups(cfg, "cpu", num_experts=8)
        out[name] = {k: getattr(g, k).ranks for k in ("world", "ep", "edp", "ep_intra", "ep_inter")}
        # Each group really communicates over its ranks: the sum of the members' global ranks.
        out[name + "_sums"] = {k: int(C.all_reduce(torch.tensor(rank), getattr(g, k)))
                               for k in ("world", "ep", "edp", "ep_intra", "ep_inter")}
        out[name + "_range"] = g.expert_range(8)
    # Gradient sync: grads set to known values, reduced, compared in the parent.
    g = build_parallel_groups(ParallelConfig(ep=2), "cpu", num_experts=8)
    lo, hi = g.expert_range(8)
    model = _Tiny(8, hi - lo, lo)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(10 * i + rank + 1))
    sync_gradients(model, g)
    out["grads"] = {n: p.grad[(0,) * p.dim()].item() for n, p in model.named_parameters()}
    # Full (all-experts) state dict from EP shards, and back.
    torch.manual_seed(3)
    model = _Tiny(8, hi - lo, lo)
    out["full"] = full_state_dict(model, g)
    fresh = _Tiny(8, hi - lo, lo)
    fresh.load_state_dict(local_state_dict(out["full"], fresh, g))
    out["roundtrip"] = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                             model.state_dict().values()))
    return out


@pytest.mark.multiproc
def test_groups_on_four_processes() -> None:
    res = launch(_groups_worker, 4, timeout_s=120, start_method="fork")
    want = {
        "ep2": {"ep": [[0, 1], [0, 1], [2, 3], [2, 3]], "edp": [[0, 2], [1, 3], [0, 2], [1, 3]]},
        "ep4_nodes2": {"ep": [[0, 1, 2, 3]] * 4, "edp": [[0], [1], [2], [3]],
                       "ep_intra": [[0, 1], [0, 1], [2, 3], [2, 3]],
                       "ep_inter": [[0, 2], [1, 3], [0, 2], [1, 3]]},
        "ep1": {"ep": [[0], [1], [2], [3]], "edp": [[0, 1, 2, 3]] * 4},
        "ep2_nodes1": {"ep": [[0, 1], [0, 1], [2, 3], [2, 3]], "ep_intra": [[0], [1], [2], [3]],
                       "ep_inter": [[0, 1], [0, 1], [2, 3], [2, 3]]},
    }
    for name, kinds in want.items():
        for kind, per_rank in kinds.items():
            for rank in range(4):
                assert list(res[rank][name][kind]) == per_rank[rank], (name, kind, rank)
                assert res[rank][name + "_sums"][kind] == sum(per_rank[rank]), (name, kind, rank)
        assert all(list(res[r][name]["world"]) == [0, 1, 2, 3] for r in range(4))
    assert [res[r]["ep2_range"] for r in range(4)] == [(0, 4), (4, 8), (0, 4), (4, 8)]
    assert [res[r]["ep4_nodes2_range"] for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # Dense grads: mean of (10 i + rank + 1) over the world; expert grads: sum over the EDP pair / 4.
    names = list(res[0]["grads"])
    for rank in range(4):
        for i, name in enumerate(names):
            got = res[rank]["grads"][name]
            if name.startswith("experts."):
                pair = [rank % 2, rank % 2 + 2]
                want_v = sum(10 * i + r + 1 for r in pair) / 4
            else:
                want_v = sum(10 * i + r + 1 for r in range(4)) / 4
            assert got == pytest.approx(want_v), (rank, name)
    # Gathered expert weights equal those of one process holding all 8 experts.
    torch.manual_seed(3)
    single = _Tiny(8, 8, 0).state_dict()
    for rank in range(4):
        assert res[rank]["roundtrip"]
        assert set(res[rank]["full"]) == set(single)
        for key, value in single.items():
            assert torch.equal(res[rank]["full"][key], value), (rank, key)
