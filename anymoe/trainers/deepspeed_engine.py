"""DeepSpeed ZeRO as the optional engine (``engine: deepspeed``): sharding from DeepSpeed, MoE from anymoe.

What DeepSpeed does here: ZeRO stage 1 (optimizer states sharded) or 2 (plus gradients),
the gradient reduction, bf16 with fp32 master weights, gradient accumulation, clipping and
the optimizer step. What anymoe keeps: the model (routers, experts, all-to-all dispatch),
the data order, the loss, the lr schedule and the run layout.

Expert parallelism goes through DeepSpeed's own MoE machinery, fed anymoe's groups:

1. anymoe's EP and expert-data-parallel (EDP) process groups are registered in
   ``deepspeed.utils.groups`` under DeepSpeed's name for them, ``ep_size_<ep>``;
2. every routed-expert parameter is flagged the way DeepSpeed flags its own expert weights
   (``allreduce = False``, ``group_name = "ep_size_<ep>"``), so ``is_moe_param`` is true;
3. the optimizer's groups go through ``split_params_into_different_moe_groups_for_optimizer``:
   expert parameters land in their own ``moe: True`` groups;
4. the engine enables its MoE path when the model holds a ``deepspeed.moe.layer.MoE``
   module; anymoe's layers are not DeepSpeed's, so a parameter-free marker of that class
   sits beside the model (its ``set_deepspeed_parallelism`` does nothing: the groups exist).

ZeRO-1/2 then reduce dense gradients over the world and expert gradients over the EDP group,
dividing both by the world size: the same averaging as anymoe's ``sync_gradients``. The
gradient norm DeepSpeed clips with sums the expert partitions over the world, so it is the
global norm of anymoe's loop too.

ZeRO-3 is refused for MoE models: DeepSpeed 0.19.8 allows stage 3 with MoE only for its own
AutoEP layers ("Native DeepSpeed MoE is not supported with ZeRO Stage 3", engine.py). AutoTP
(``tensor_parallel.autotp_size``) is refused too: its TP ranks must read the same batch, while
anymoe's data parallelism spans the world and its EP groups would have to nest with TP groups.

The accelerator DeepSpeed uses is the backend's: ``DS_ACCELERATOR`` is set to the backend's
name before DeepSpeed loads (DeepSpeed names its accelerators as anymoe names its backends).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from anymoe.core.config import ConfigError, param

# Keys anymoe derives from the run config; a DeepSpeed JSON may not set them differently.
_DERIVED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
_REFUSED = {"optimizer": "optim (anymoe's AdamW)", "scheduler": "optim.schedule (anymoe's lr schedule)",
            "fp16": "train.precision (bf16 or fp32)"}


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = param(2, ge=0, le=3, doc="ZeRO stage: 0 (plain DP), 1 (optimizer states), "
                                               "2 (+ gradients); 3 is refused for MoE models")
    config: str | None = param(None, doc="a DeepSpeed JSON file merged over the generated config "
                                         "(batch sizes, optimizer and precision stay anymoe's)")
    overlap_comm: bool = param(False, doc="overlap the gradient reduction with backward")
    reduce_bucket_size: int = param(50_000_000, ge=1, doc="elements per gradient reduction bucket")
    allgather_bucket_size: int = param(50_000_000, ge=1, doc="elements per parameter all-gather bucket")


def check_deepspeed(ds: DeepSpeedConfig, model_cfg: Any, path: str = "deepspeed") -> None:
    """Refuse what DeepSpeed cannot do with anymoe's MoE, before anything starts."""
    stage = ds.zero_stage
    if ds.config is not None:
        stage = int(_read_json(ds.config, path).get("zero_optimization", {}).get("stage", stage))
    if stage == 3 and getattr(model_cfg, "moe", None) is not None:
        raise ConfigError(f"{path}.zero_stage", "ZeRO-3 is not available for MoE models: DeepSpeed allows "
                          "stage 3 with MoE only for its own AutoEP layers ('Native DeepSpeed MoE is not "
                          "supported with ZeRO Stage 3'); use zero_stage 1 or 2 (expert parameters are then "
                          "sharded over their expert-data-parallel group)")
    if stage == 3:
        raise ConfigError(f"{path}.zero_stage", "ZeRO-3 is not wired into anymoe's trainer (it partitions "
                          "parameters that anymoe's checkpoints read whole); use zero_stage 1 or 2")


def _read_json(path: str, field: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{field}.config", f"{path!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{field}.config", f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{field}.config", f"{path} must hold a JSON object")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(ds: DeepSpeedConfig, micro_batch: int, accum: int, world_size: int, grad_clip: float,
              bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (the JSON file's keys merged over it, checked)."""
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro_batch * accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm,
                              "reduce_bucket_size": ds.reduce_bucket_size,
                              "allgather_bucket_size": ds.allgather_bucket_size,
                              "contiguous_gradients": True, "reduce_scatter": True},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.config is None:
        return out
    user = _read_json(ds.config, "deepspeed")
    for key in _DERIVED:
        if key in user and user[key] != out[key]:
            raise ConfigError("deepspeed.config", f"{ds.config} sets {key} = {user[key]}, but the run gives "
                              f"{out[key]} (train.micro_batch / global_batch and the world size); remove "
                              f"{key} from the JSON and set the batch in the train section")
    for key, where in _REFUSED.items():
        if key in user and (key != "fp16" or user[key].get("enabled", False)):
            raise ConfigError("deepspeed.config", f"{ds.config} sets {key!r}; anymoe owns it: set {where}")
    if int(user.get("tensor_parallel", {}).get("autotp_size", 1)) > 1:
        raise ConfigError("deepspeed.config", f"{ds.config} sets tensor_parallel.autotp_size; DeepSpeed's "
                          "AutoTP is not wired into anymoe (its TP ranks must read the same batch, anymoe's "
                          "data parallelism spans the whole world, and its EP groups would have to nest with "
                          "the TP groups); remove tensor_parallel and use parallel.ep / data parallelism")
    if "bf16" in user and bool(user["bf16"].get("enabled", False)) != bf16:
        raise ConfigError("deepspeed.config", f"{ds.config} sets bf16.enabled = {user['bf16'].get('enabled')}"
                          f" but train.precision gives {'bf16' if bf16 else 'fp32'}; set train.precision")
    return _merge(out, user)


# ---------------------------------------------------------------------------------------------
# Expert-parallel groups and parameters, the DeepSpeed way.
# ---------------------------------------------------------------------------------------------


def group_name(ep: int) -> str:
    """DeepSpeed's name for the EP / EDP groups of expert-parallel size ``ep``."""
    return f"ep_size_{ep}"


def _real_pg(group, world_size: int):
    """A process group for ``group`` (an anymoe Group); a group of one gets a one-rank group
    (DeepSpeed asks every group for its size and ranks, and None would mean the world)."""
    if group.pg is not None:
        return group.pg
    ones = _singletons(world_size)
    return ones[dist.get_rank()]


_SINGLETONS: dict[tuple[int, int], dict[int, Any]] = {}


def _singletons(world_size: int) -> dict[int, Any]:
    key = (id(dist.group.WORLD), world_size)  # a new default group (another run) needs new ones
    if key not in _SINGLETONS:
        made = {}
        for r in range(world_size):  # creating a group is collective: every rank creates all of them
            made[r] = dist.new_group([r])
        _SINGLETONS[key] = made
    return _SINGLETONS[key]


def register_expert_groups(groups) -> str:
    """Put anymoe's EP and EDP groups into DeepSpeed's group registry; returns their name."""
    from deepspeed.utils import groups as ds_groups

    name = group_name(groups.ep.size)
    world = dist.get_world_size()
    ds_groups._EXPERT_PARALLEL_GROUP[name] = _real_pg(groups.ep, world)
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(groups.ep.ranks)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = _real_pg(groups.edp, world)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(groups.edp.ranks)
    return name


def mark_expert_parameters(model: nn.Module, name: str) -> int:
    """Flag routed-expert parameters as DeepSpeed MoE parameters; returns how many."""
    from anymoe.core.parallel import expert_parameters

    ids = expert_parameters(model)
    n = 0
    for p in model.parameters():
        if id(p) in ids:
            p.allreduce = False
            p.group_name = name
            n += 1
    return n


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """anymoe's decay / no-decay groups, then DeepSpeed's split of expert parameters into moe groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from anymoe.trainers.optim import _no_decay

    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(pname, p) else decay).append(p)
    found = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
             {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer([g for g in found if g["params"]])


def _marker_class():
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        """Tells the engine "this model has MoE layers" (no parameters, never called)."""

        def __init__(self, num_experts: int, ep_size: int, name: str) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: anymoe's layers hold the experts
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, name
            self.num_local_experts = num_experts // ep_size
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups are anymoe's, registered already

        def forward(self, *args, **kwargs):  # pragma: no cover
            raise RuntimeError("the expert-parallel marker is not a layer")

    return ExpertParallelMarker


class EngineModel(nn.Module):
    """What the engine wraps: the anymoe model plus the MoE marker; forward is the model's."""

    def __init__(self, model: nn.Module, marker: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.marker = marker

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def set_accelerator(backend) -> None:
    """DeepSpeed picks its accelerator once, at first use: make it the backend's."""
    os.environ.setdefault("DS_ACCELERATOR", backend.name)


def ensure_process_group(backend) -> None:
    """DeepSpeed needs torch.distributed even for one process: a one-rank group then."""
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it; torchrun sets it for several processes
    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend.dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)


def build_engine(model: nn.Module, groups, ds: DeepSpeedConfig, optim_cfg, backend, micro_batch: int,
                 accum: int, bf16: bool):
    """(engine, wrapped model): DeepSpeed's engine around ``model`` with anymoe's EP groups."""
    set_accelerator(backend)
    try:
        import deepspeed
    except ImportError as err:
        raise ConfigError("engine", f"deepspeed cannot be imported ({err}); pip install deepspeed, or set "
                          "engine: native") from None
    ensure_process_group(backend)

    deepspeed.init_distributed(dist_backend=backend.dist_backend)
    if groups is None or groups.world.pg is None and dist.get_world_size() > 1:
        raise RuntimeError("build_engine needs the run's ParallelGroups")
    marker = None
    moe = getattr(model.cfg, "moe", None)
    if moe is not None:
        name = register_expert_groups(groups)
        mark_expert_parameters(model, name)
        if any(getattr(p, "allreduce", True) is False and p.requires_grad for p in model.parameters()):
            # Only with trainable experts: DeepSpeed's MoE path insists on at least one moe group
            # (fine-tuning with frozen experts leaves none; the rest is plain data parallel).
            marker = _marker_class()(moe.num_experts, groups.ep.size, name)
    wrapped = EngineModel(model, marker)
    params = optimizer_groups(model, optim_cfg.weight_decay)
    optimizer = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                                  eps=optim_cfg.eps)
    config = ds_config(ds, micro_batch, accum, dist.get_world_size(), optim_cfg.grad_clip, bf16)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=copy.deepcopy(config))
    return engine, config


__all__ = ["DeepSpeedConfig", "EngineModel", "build_engine", "check_deepspeed", "ds_config", "group_name",
           "mark_expert_parameters", "optimizer_groups", "register_expert_groups"]
