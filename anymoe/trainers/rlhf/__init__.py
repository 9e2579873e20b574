"""RLHF for MoE policies: reward model, DPO, PPO, GRPO (and RLOO / REINFORCE++), with routing replay.

Read first: ``losses.py`` (every loss), ``advantages.py`` (estimator registry),
``experience.py`` (the rollout record), ``rollout.py`` (generate -> score -> evaluate ->
advantages), ``policy_trainer.py`` (one RL step), ``routing.py`` (R3 agreement, router KL).
Entry point: ``anymoe rlhf rm|dpo|ppo|grpo CONFIG.yaml`` (``cli.py``).
"""
