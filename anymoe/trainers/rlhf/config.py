"""The root config of an RLHF run: the training run's sections plus one ``rlhf:`` section.

    model, data, optim, backend, train, logging, checkpoint, eval   as in `anymoe train`
    rlhf:    rollout, moe, policy, critic, dpo, rm, rewards, init_from, ...   (algo_config.py)

``train.steps`` counts RL iterations (rollout + update) for PPO/GRPO and optimizer steps for
RM/DPO; ``train.global_batch`` (or ``micro_batch``) is the number of preference pairs per step
for RM/DPO. The data section says where the pairs or prompts come from
(``format: preference`` or ``format: prompts``).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anymoe.core.config import ConfigError, apply_overrides, load_config, load_yaml, param
from anymoe.core.moe import replace as moe_replace
from anymoe.models.config import ModelConfig
from anymoe.trainers.config import RunConfig, with_model_expanded
from anymoe.trainers.rlhf.algo_config import AlgoSection

ALGORITHMS = ("rm", "dpo", "ppo", "grpo")
DATA_FORMAT = {"rm": "preference", "dpo": "preference", "ppo": "prompts", "grpo": "prompts"}


@dataclass(frozen=True)
class RLHFConfig(RunConfig):
    rlhf: AlgoSection = param(default_factory=AlgoSection, doc="the RLHF algorithm settings")

    def check_for(self, algo: str) -> None:
        """Cross-section checks that depend on the algorithm named on the command line."""
        want = DATA_FORMAT[algo]
        if self.data.format != want:
            raise ConfigError("data.format", f"`anymoe rlhf {algo}` reads {want} data; "
                                             f"got {self.data.format!r}; "
                                             f"set data.format: {want}")
        pol, ro = self.rlhf.policy, self.rlhf.rollout
        if algo in ("ppo", "grpo"):
            group = pol.advantage in ("grpo", "rloo")
            if group and ro.samples_per_prompt < 2:
                raise ConfigError("rlhf.rollout.samples_per_prompt",
                                  f"advantage {pol.advantage!r} compares samples of one prompt; set >= 2")
            if algo == "grpo" and pol.advantage == "gae":
                raise ConfigError("rlhf.policy.advantage", "grpo has no critic; use grpo, rloo or "
                                                           "reinforce_pp "
                                                           "(or run `anymoe rlhf ppo` for GAE)")
        if self.model.moe is None:
            raise ConfigError("model.moe", "anymoe RLHF trains MoE models; add a moe: section")
        if self.train.precision == "bf16_master":
            raise ConfigError("train.precision", "bf16_master (bf16 weights) is anymoe train's; the RLHF "
                                                 "trainers keep fp32 weights: use bf16 (autocast), auto "
                                                 "or fp32")
        if self.parallel.ep > 1:
            raise ConfigError("parallel.ep", "the RLHF trainers are data parallel only (a rollout's decode "
                                             "steps would have to run in lockstep over an EP group); set "
                                             "parallel.ep: 1 and start N processes with --nproc N")
        if self.model.moe.router.kind == "expert_choice" and self.rlhf.moe.routing_replay:
            raise ConfigError("rlhf.moe.routing_replay", "expert-choice routing has no per-token choices to "
                                                         "replay; set routing_replay: false")

    def check_world(self, algo: str, world: int) -> None:
        """What ``world`` data-parallel ranks need of the config (checked before any work)."""
        if algo in ("ppo", "grpo"):
            n = self.rlhf.rollout.prompts_per_step
            if n % world:
                raise ConfigError("rlhf.rollout.prompts_per_step", f"({n}) must divide evenly over the "
                                  f"{world} processes (each takes an equal share of a step's prompts); "
                                  f"use a multiple of {world}")
        else:
            self.train.accumulation(world)  # names train.global_batch when it does not divide


def rl_model_config(model: ModelConfig, algo_cfg: AlgoSection) -> ModelConfig:
    """The model config used in RL: balance aux losses off unless asked for, z-loss kept or dropped.

    A load-balancing loss pulls routing toward uniform load, which fights the reward; RL
    recipes for MoE turn it off and keep only the router z-loss (logit size) -- or nothing.
    """
    if model.moe is None:
        return model
    b = model.moe.balance
    changes: dict[str, Any] = {}
    if not algo_cfg.moe.balance_aux:
        changes.update(aux_loss=0.0, seq_aux_loss=0.0, ep_group_loss=0.0)
    elif b.aux_loss == b.seq_aux_loss == b.ep_group_loss == 0.0:
        warnings.warn("rlhf.moe.balance_aux is on but model.moe.balance has no aux coefficient; "
                      "nothing to keep",
                      stacklevel=2)
    if not algo_cfg.moe.z_loss:
        changes["z_loss"] = 0.0
    if not changes:
        return model
    return dataclasses.replace(model, moe=moe_replace(model.moe, balance=changes))


def rlhf_config_from_data(data: dict[str, Any], algo: str | None = None) -> RLHFConfig:
    cfg = load_config(RLHFConfig, with_model_expanded(data, "an RLHF config"))
    if algo is not None:
        cfg.check_for(algo)
    return cfg


def load_rlhf_config(path: str | Path, algo: str | None = None, overrides: list[str] | tuple[str, ...] = ()
                     ) -> RLHFConfig:
    """Read a YAML file, apply ``--set key=value`` overrides, validate for ``algo``."""
    data = load_yaml(path)
    if overrides:
        data = apply_overrides(data, list(overrides))
    return rlhf_config_from_data(data, algo)


__all__ = ["ALGORITHMS", "RLHFConfig", "load_rlhf_config", "rl_model_config", "rlhf_config_from_data"]
