"""`anymoe rlhf grpo`: group relative policy optimisation (DeepSeekMath), critic-free.

GRPO is the PPO step of ppo.py with three differences, all configuration:
  - advantages from the group of ``samples_per_prompt`` responses to one prompt
    (``policy.advantage``: grpo, or rloo / reinforce_pp), so no critic is built;
  - the KL to the reference is a loss term (k3 estimator) rather than a reward penalty;
  - the loss aggregation is a choice: token-mean (DAPO), seq-mean (the paper) or dr-grpo.
"""

from __future__ import annotations

from anymoe.trainers.rlhf.ppo import PPOTrainer


class GRPOTrainer(PPOTrainer):
    algo = "grpo"


__all__ = ["GRPOTrainer"]
