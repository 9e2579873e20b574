"""Process groups for data x expert parallelism, and the gradient reduction that goes with them.

Layout (world = dp x ep, Megatron/torchtitan convention):

- every rank reads its own shard of the batch (data parallel over the whole world);
- the EP group is ``ep`` consecutive ranks; they split the E experts, EP rank r holding
  experts [r E/ep, (r+1) E/ep);
- the expert-data-parallel (EDP) group is the ``dp`` ranks holding the same experts
  (same position in their EP groups): ranks r, r + ep, r + 2 ep, ...

Worked example, world 4, ep 2: EP groups {0,1} {2,3}; EDP groups {0,2} {1,3}; rank 3 holds
experts [E/2, E) and averages their gradients with rank 1.

Gradient reduction (``sync_gradients``) makes a step equal to single-process training on
the global batch when every rank's loss is the mean over its (equal-sized) local batch:
the global loss is then the mean of the rank losses, so

- dense parameters (replicated everywhere): gradient averaged over the world;
- expert parameters: after backward, rank r's expert gradient already sums the
  contributions of every rank of its EP group (the all-to-all backward brings them home);
  summing over the EDP group covers the world, and dividing by the world size averages.

With hierarchical dispatch the EP group is further cut into "nodes" of ``node_size``
consecutive ranks: ``ep_intra`` (my node's part of my EP group) and ``ep_inter`` (the ranks
of my EP group with my position inside their node).

Groups come from ``init_device_mesh(device_type, (dp, ep))`` (device type from the Backend);
the node subgroups, which a 2-D mesh cannot express, from ``new_subgroups_by_enumeration``.
A world of one process builds no process group at all.

Legend: E experts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from anymoe.core.collectives import Group, all_reduce_, single_group
from anymoe.core.config import ConfigError, param

DispatcherName = Literal["auto", "local", "alltoall", "alltoall_oneread", "allgather", "hierarchical"]


@dataclass(frozen=True)
class ParallelConfig:
    ep: int = param(1, ge=1, doc="expert-parallel size: ranks that split the experts of a layer")
    dp: int | Literal["auto"] = param("auto", doc="replicas of every expert (world = dp x ep); "
                                                  "auto: world / ep")
    node_size: int | None = param(None, ge=1, doc="ranks per node for hierarchical dispatch "
                                                  "(null: LOCAL_WORLD_SIZE from torchrun, else the world)")
    dispatcher: DispatcherName = param("auto", doc="token dispatcher: auto | local | alltoall | "
                                                   "alltoall_oneread | allgather | hierarchical "
                                                   "(auto: see anymoe.core.ep_dispatch)")
    overlap_shared: bool = param(False, doc="MoE layers compute their shared experts while the return "
                                            "all-to-all is in flight (same results; alltoall/hierarchical)")

    def validate(self) -> None:
        if isinstance(self.dp, int) and self.dp < 1:
            raise ConfigError("dp", f"must be >= 1 or 'auto'; got {self.dp}")
        if self.dispatcher == "local" and self.ep > 1:
            raise ConfigError("dispatcher", f"'local' keeps every expert on every rank, but ep is {self.ep}; "
                                            "use alltoall, allgather, hierarchical or auto")

    def check_world(self, world_size: int, num_experts: int | None = None, path: str = "parallel") -> None:
        """Raise ConfigError (naming the field and the fix) unless this fits ``world_size`` ranks."""
        ep = self.ep
        if ep > world_size:
            raise ConfigError(f"{path}.ep", f"expert-parallel size {ep} is larger than the world "
                              f"({world_size} processes); use ep <= {world_size} or start more processes")
        if world_size % ep:
            raise ConfigError(f"{path}.ep", f"expert-parallel size {ep} does not divide the world of "
                              f"{world_size} processes; use one of {_divisors(world_size)}")
        if num_experts is not None and num_experts % ep:
            raise ConfigError(f"{path}.ep", f"{num_experts} experts (model.moe.num_experts) are not "
                              f"divisible by the expert-parallel size {ep}; use one of "
                              f"{[d for d in _divisors(num_experts) if d <= world_size]}")
        if self.dp != "auto" and self.dp * ep != world_size:
            raise ConfigError(f"{path}.dp", f"dp x ep = {self.dp} x {ep} = {self.dp * ep} but the world has "
                              f"{world_size} processes; set dp: auto or dp: {world_size // ep}")
        node = self.resolved_node_size(world_size)
        if self.node_size is not None and world_size % node:
            raise ConfigError(f"{path}.node_size", f"{node} does not divide the world of {world_size} "
                              f"processes; use one of {_divisors(world_size)}")
        if (ep % node if ep > node else node % ep) and self.node_size is not None:
            raise ConfigError(f"{path}.node_size", f"an EP group of {ep} ranks must span whole nodes of "
                              f"{node} (or fit in one); pick a node_size that divides {ep} or that {ep} "
                              "divides")

    def resolved_node_size(self, world_size: int) -> int:
        if self.node_size is not None:
            return self.node_size
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        fits = local >= 1 and world_size % local == 0 and not (self.ep % local if self.ep > local
                                                                 else local % self.ep)
        return local if fits else world_size  # an unusable guess means "one node": no hierarchy


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelGroups:
    """Every group this rank belongs to, with sizes and ranks; built once per run."""

    config: ParallelConfig
    world: Group  # all ranks: data parallel for dense parameters, global-batch statistics
    ep: Group  # ranks splitting the experts (consecutive global ranks)
    edp: Group  # ranks holding the same experts (expert data parallel)
    ep_intra: Group  # my node's part of my EP group (hierarchical dispatch)
    ep_inter: Group  # my EP group's ranks at my position in their nodes (hierarchical dispatch)
    node_size: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def rank(self) -> int:
        return self.world.index

    @property
    def world_size(self) -> int:
        return self.world.size

    @property
    def dp(self) -> Group:
        """The data-parallel group of dense parameters: the whole world."""
        return self.world

    @property
    def ep_size(self) -> int:
        return self.ep.size

    @property
    def ep_rank(self) -> int:
        return self.ep.index

    @property
    def edp_size(self) -> int:
        return self.edp.size

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """[first, end) of the global experts this rank holds."""
        per = num_experts // self.ep.size
        return self.ep.index * per, (self.ep.index + 1) * per


def layout(world_size: int, ep: int, node_size: int) -> dict[str, list[list[int]]]:
    """All groups of each kind as lists of global ranks (pure; the worked example is above)."""
    dp = world_size // ep
    ep_groups = [list(range(g * ep, (g + 1) * ep)) for g in range(dp)]
    edp_groups = [list(range(j, world_size, ep)) for j in range(ep)]
    per_node = min(node_size, ep)
    intra, inter = [], []
    for g in ep_groups:
        intra += [g[s:s + per_node] for s in range(0, ep, per_node)]
        inter += [g[j::per_node] for j in range(per_node)]
    return {"ep": ep_groups, "edp": edp_groups, "ep_intra": intra, "ep_inter": inter}


def build_parallel_groups(cfg: ParallelConfig | None = None, device_type: str = "cpu",
                          num_experts: int | None = None, path: str = "parallel") -> ParallelGroups:
    """Groups for the running world (torch.distributed initialised, or a world of one).

    Every rank must call this with the same arguments (creating groups is collective).
    ``device_type``: ``backend.device_type``, for the device mesh.
    """
    cfg = cfg or ParallelConfig()
    initialised = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialised else 1
    rank = dist.get_rank() if initialised else 0
    cfg.check_world(world_size, num_experts, path)
    node = cfg.resolved_node_size(world_size)
    if world_size == 1:
        one = single_group("world")
        return ParallelGroups(cfg, one, single_group("ep"), single_group("edp"), single_group("ep_intra"),
                              single_group("ep_inter"), node)
    ep, dp = cfg.ep, world_size // cfg.ep
    kinds = layout(world_size, ep, node)
    world = Group("world", tuple(range(world_size)), rank, dist.group.WORLD)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (dp, ep), mesh_dim_names=("edp", "ep"))
    ep_group = _from_mesh("ep", kinds["ep"], rank, mesh)
    edp_group = _from_mesh("edp", kinds["edp"], rank, mesh)
    if node >= ep:  # the EP group fits in a node: nothing crosses nodes
        intra, inter = ep_group, single_group("ep_inter", rank)
    else:
        intra = _subgroups("ep_intra", kinds["ep_intra"], rank)
        inter = _subgroups("ep_inter", kinds["ep_inter"], rank)
    return ParallelGroups(cfg, world, ep_group, edp_group, intra, inter, node, {"mesh": mesh})


def _mine(groups: list[list[int]], rank: int) -> list[int]:
    return next(g for g in groups if rank in g)


def _from_mesh(name: str, groups: list[list[int]], rank: int, mesh: Any) -> Group:
    ranks = _mine(groups, rank)
    if len(ranks) == 1:
        return Group(name, (rank,), 0, None)
    pg = mesh.get_group(name)
    assert sorted(dist.get_process_group_ranks(pg)) == ranks, (name, ranks)
    return Group(name, tuple(ranks), ranks.index(rank), pg)


def _subgroups(name: str, groups: list[list[int]], rank: int) -> Group:
    ranks = _mine(groups, rank)
    if all(len(g) == 1 for g in groups):
        return Group(name, (rank,), 0, None)
    pg, _ = dist.new_subgroups_by_enumeration(groups)
    return Group(name, tuple(ranks), ranks.index(rank), pg if len(ranks) > 1 else None)


# ---------------------------------------------------------------------------------------------
# Gradient reduction.
# ---------------------------------------------------------------------------------------------


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the routed-expert parameters (sharded over EP); everything else is dense."""
    from anymoe.core.experts import Experts

    out: set[int] = set()
    for module in model.modules():
        if isinstance(module, Experts):
            out.update(id(p) for p in module.parameters(recurse=False))
    return out


def _reduce_flat(grads: list[torch.Tensor], group: Group, scale: float) -> None:
    """Sum ``grads`` over ``group`` in one flat buffer per dtype, then multiply by ``scale``."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        all_reduce_(flat, group, "sum")
        flat.mul_(scale)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def sync_gradients(model: nn.Module | Iterable[nn.Parameter], groups: ParallelGroups,
                   expert_ids: set[int] | None = None) -> None:
    """Average dense gradients over the world and expert gradients over EDP / world (see top).

    Assumes every rank's loss is the mean over an equal-sized local batch. Parameters without
    a gradient are skipped (the same on every rank, since the model is the same everywhere).
    A world of one is a no-op.
    """
    if groups.world.size == 1:
        return
    params = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
    expert_ids = expert_parameters(model) if expert_ids is None and isinstance(model, nn.Module) else \
        (expert_ids or set())
    dense = [p.grad for p in params if p.grad is not None and id(p) not in expert_ids]
    experts = [p.grad for p in params if p.grad is not None and id(p) in expert_ids]
    if dense:
        _reduce_flat(dense, groups.world, 1.0 / groups.world.size)
    if experts:
        _reduce_flat(experts, groups.edp, 1.0 / groups.world.size)


def _expert_keys(model: nn.Module) -> dict[str, Any]:
    """state-dict key -> Experts module, for every routed-expert weight (sharded over EP)."""
    from anymoe.core.experts import Experts

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            for pname in ("w1", "w3", "w13", "w2"):
                if hasattr(module, pname):
                    out[f"{name}.{pname}" if name else pname] = module
    return out


@torch.no_grad()
def full_state_dict(model: nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert weight gathered over the EP group: the state
    dict a single process holding all experts would have (canonical, so any EP size and any
    backend can load it). Collective: every rank of the EP group calls it."""
    state = model.state_dict()
    if groups.ep.size == 1:
        return state
    from anymoe.core.collectives import all_gather

    for key in _expert_keys(model):
        state[key] = all_gather(state[key].contiguous(), groups.ep)
    return state


def local_state_dict(full: dict[str, torch.Tensor], model: nn.Module,
                     groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """This rank's slice of a full (all-experts) state dict, ready for ``model.load_state_dict``."""
    out = dict(full)
    for key, module in _expert_keys(model).items():
        if key in out:
            lo = module.local_offset
            if out[key].shape[0] != module.num_experts:
                raise ValueError(f"{key}: the checkpoint has {out[key].shape[0]} experts, the model "
                                 f"{module.num_experts}")
            out[key] = out[key][lo:lo + module.num_local]
    return out


def attach_groups(model: nn.Module, groups: ParallelGroups) -> None:
    """Tell every MoE layer its groups: global-batch statistics over the world, EP-group loss
    over the EP group, aux-free loads over every replica of the router (the world)."""
    for module in model.modules():
        setter = getattr(module, "set_process_groups", None)
        if callable(setter):
            setter(dp=groups.world.pg, ep=groups.ep.pg, bias=groups.world.pg)
        if hasattr(module, "overlap_shared"):
            module.overlap_shared = groups.config.overlap_shared


__all__ = ["ParallelConfig", "ParallelGroups", "attach_groups", "build_parallel_groups", "expert_parameters",
           "full_state_dict", "layout", "local_state_dict", "sync_gradients"]
