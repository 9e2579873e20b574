"""Settings of the RLHF algorithms, one small frozen dataclass per concern.

The YAML maps one-to-one onto these (``anymoe.core.config.load_config``); the root that
adds model, data, optimiser and run settings lives in ``config.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from anymoe.core.config import ConfigError, param
from anymoe.trainers.rlhf.advantages import ADVANTAGES


@dataclass(frozen=True)
class RewardTerm:
    name: str = param(doc="a built-in reward (exact_answer, digit_match, numeric_format, length_penalty) "
                          "or 'module:function'")
    weight: float = param(1.0, doc="weight of this reward in the sum")


@dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = param(16, ge=1, doc="prompts sampled per RL step")
    samples_per_prompt: int = param(4, ge=1, doc="responses per prompt (the GRPO/RLOO group size)")
    max_new_tokens: int = param(8, ge=1, doc="response length limit")
    temperature: float = param(1.0, gt=0, doc="sampling temperature (log-probs stay those of the model)")
    top_k: int = param(0, ge=0, doc="sample among the top-k tokens (0: all)")
    dtype: Literal["fp32", "bf16"] = param("fp32", doc="numeric format of the sampling copy of the "
                                                       "policy (bf16: like an inference engine; "
                                                       "training stays fp32)")


@dataclass(frozen=True)
class MoERLConfig:
    """The MoE-specific switches (see routing.py for why they exist)."""

    routing_replay: bool = param(True, doc="R3: replay the rollout's expert choices in the training forward")
    router_kl_coef: float = param(0.0, ge=0, doc="routing-consistency KL(policy router || reference router)")
    balance_aux: bool = param(False, doc="keep the load-balance aux loss in RL (off: it fights the reward)")
    z_loss: bool = param(True, doc="keep the router z-loss")
    freeze_router: bool = param(False, doc="no gradient into the routers")
    update_bias: bool = param(False, doc="keep updating the aux-free balancing bias during RL")
    tis_cap: float = param(0.0, ge=0, doc="truncated IS weight cap for rollout/train mismatch (0: off)")

    def validate(self) -> None:
        if self.balance_aux:
            warnings.warn("moe.balance_aux is on: the load-balance loss pulls the router toward uniform load "
                          "and away from what the reward asks; RL recipes usually turn it off", stacklevel=2)


@dataclass(frozen=True)
class PolicyConfig:
    """The policy-gradient loss shared by PPO, GRPO, REINFORCE++ and RLOO."""

    advantage: str = param("grpo", doc="advantage estimator: gae, grpo, rloo, reinforce_pp")
    loss_agg: Literal["token-mean", "seq-mean", "dr-grpo"] = param("token-mean", doc="loss aggregation")
    clip_eps: float = param(0.2, gt=0, lt=1, doc="PPO clip range (low side)")
    clip_eps_high: float = param(0.0, ge=0, lt=1, doc="DAPO clip-higher (0: same as clip_eps)")
    epochs: int = param(1, ge=1, doc="passes over each rollout batch")
    micro_batch: int = param(16, ge=1, doc="sequences per forward/backward")
    kl_coef: float = param(0.0, ge=0, doc="weight of KL(policy || reference)")
    kl_in_reward: bool = param(False, doc="true: -kl_coef*KL per token in the reward (PPO); "
                                             "false: a loss term (GRPO)")
    kl_kind: Literal["k1", "k2", "k3"] = param("k3", doc="KL estimator (k1 in the reward, k3 as a loss)")
    entropy_coef: float = param(0.0, ge=0, doc="entropy bonus weight")
    gamma: float = param(1.0, ge=0, le=1, doc="discount")
    lam: float = param(0.95, ge=0, le=1, doc="GAE lambda")
    norm_std: bool = param(True, doc="grpo: divide by the group std (false: Dr. GRPO)")
    whiten_advantages: bool = param(False, doc="normalise advantages over the batch's response tokens "
                                               "(the usual PPO/GAE trick; reinforce_pp always does)")

    def validate(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ConfigError("advantage", f"unknown estimator {self.advantage!r}; choose from "
                                           f"{', '.join(ADVANTAGES)}")


@dataclass(frozen=True)
class CriticConfig:
    lr: float = param(1e-3, gt=0, doc="critic learning rate")
    value_clip: float = param(0.2, ge=0, doc="value clipping range (0: off)")
    coef: float = param(0.5, ge=0, doc="value loss weight")


@dataclass(frozen=True)
class DPOConfig:
    beta: float = param(0.1, gt=0, doc="DPO beta (IPO: tau)")
    loss_type: Literal["sigmoid", "ipo"] = param("sigmoid", doc="sigmoid: DPO; ipo: IPO")
    label_smoothing: float = param(0.0, ge=0, lt=0.5, doc="conservative DPO: assumed label-flip rate")


@dataclass(frozen=True)
class RMConfig:
    margin: bool = param(False, doc="use a 'margin' field of each pair in the Bradley-Terry loss")


@dataclass(frozen=True)
class AlgoSection:
    """Everything algorithm-specific, under one ``rlhf:`` key in the YAML."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    moe: MoERLConfig = field(default_factory=MoERLConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rewards: list[RewardTerm] = field(default_factory=lambda: [RewardTerm("exact_answer", 1.0)])
    reward_model: str = param("", doc="run dir or checkpoint of a trained reward model (PPO/GRPO); "
                                      "empty: the `rewards` callables")
    init_from: str = param("", doc="run dir or checkpoint of the initial policy (e.g. an SFT run); empty: "
                                   "fresh weights from train.seed. The reference is a frozen copy of it")
    warm_start_steps: int = param(0, ge=0, doc="PPO/GRPO: format-only SFT steps before RL (warmstart.py)")
    warm_start_lr: float = param(3e-3, gt=0, doc="learning rate of the warm start")
    eval_prompts: int = param(64, ge=0, doc="PPO/GRPO: held-out prompts scored greedily at each evaluation")


__all__ = ["AlgoSection", "CriticConfig", "DPOConfig", "MoERLConfig", "PolicyConfig", "RMConfig",
           "RewardTerm", "RolloutConfig"]
