"""Routing replay (R3): with replay on, the first importance ratio is exactly 1 for every token,
even when the training forward would route differently from the rollout.

The mismatch is built on purpose: the rollout samples with the policy's weights, then the
router weights are perturbed slightly (as another numeric format or a weight sync lag
would) before the training forwards. The agreement metric must report the mismatch; with
replay the training forward uses the recorded experts anyway.
"""

import pytest
import torch

from anymoe.backends.cpu import CPUBackend
from anymoe.core.config import load_config
from anymoe.data.tokenizers import ByteTokenizer
from anymoe.trainers.optim import OptimConfig
from anymoe.trainers.rlhf.algo_config import AlgoSection
from anymoe.trainers.rlhf.policy_trainer import PolicyTrainer
from anymoe.trainers.rlhf.rewards import WeightedReward, resolve_reward
from anymoe.trainers.rlhf.roles import Actor, Reference
from anymoe.trainers.rlhf.rollout import Rollout
from anymoe.trainers.rlhf.routing import layered_agreement, router_parameters


def _rollout_then_perturb(build, replay: bool, tis_cap: float = 0.0):
    model = build(0)
    cfg = load_config(AlgoSection, {
        "rollout": {"samples_per_prompt": 4, "max_new_tokens": 4},
        "policy": {"advantage": "grpo", "micro_batch": 16},
        "moe": {"routing_replay": replay, "tis_cap": tis_cap},
    })
    actor = Actor(model)
    reward = WeightedReward([("digits", resolve_reward("digit_share"), 1.0)])
    rollout = Rollout(actor, ByteTokenizer(), cfg, reward_fn=reward, reference=Reference(model),
                      generator=torch.Generator().manual_seed(0))
    prompts = [p for p in ("12+34=", "56+78=", "90+11=", "23+45=") for _ in range(4)]
    prompt_BP = torch.tensor([ByteTokenizer().encode(p) for p in prompts])
    gen = rollout.generate(prompt_BP)
    with torch.no_grad():  # the training-side weights drift from the rollout's
        g = torch.Generator().manual_seed(1)
        for _name, p in router_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std())
    exp, stats = rollout.record(prompt_BP, gen, prompts, [{"answer": "0"}] * len(prompts))
    optim = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant")
    trainer = PolicyTrainer(rollout, optim, CPUBackend(), 10)
    return actor, exp, stats, trainer


@pytest.mark.parametrize("replay", [True, False])
def test_agreement_reports_the_mismatch(tiny_model_factory, replay):
    actor, exp, stats, _ = _rollout_then_perturb(tiny_model_factory, replay)
    # The perturbed router would route some tokens differently: the metric says so either way.
    assert stats.agreement["exact"] < 1.0
    with torch.no_grad():
        _, _, natural = actor.logprobs(exp.sequences_BL, exp.prompt_len)
        _, _, replayed = actor.logprobs(exp.sequences_BL, exp.prompt_len, exp.routing_NTK)
    assert layered_agreement(exp.routing_NTK, natural.expert_ids_NTK)["exact"] < 1.0
    # With replay the forward uses exactly the recorded experts.
    for rec, used in zip(exp.routing_NTK, replayed.expert_ids_NTK):
        assert torch.equal(rec, used)


def test_replay_makes_first_ratio_exactly_one_for_every_token(tiny_model_factory):
    actor, exp, stats, trainer = _rollout_then_perturb(tiny_model_factory, replay=True)
    assert stats.agreement["exact"] < 1.0  # a case where the training forward would route differently
    with torch.no_grad():
        logp, _, _ = actor.logprobs(exp.sequences_BL, exp.prompt_len, exp.routing_NTK)
    ratio = torch.exp(logp - exp.old_logp_BR)
    assert torch.equal(ratio[exp.mask_BR.bool()], torch.ones_like(ratio[exp.mask_BR.bool()]))
    first = exp.micro_batches(trainer.cfg.policy.micro_batch)[0]
    out = trainer.policy_step(first)
    assert out["ratio_max_dev"] == 0.0 and out["clip_frac"] == 0.0


def test_without_replay_training_routing_differs_from_the_rollout(tiny_model_factory):
    _, exp_off, stats_off, _ = _rollout_then_perturb(tiny_model_factory, replay=False)
    _, exp_on, _, _ = _rollout_then_perturb(tiny_model_factory, replay=True)
    # Same samples (same seeds); old log-probs differ where the routing differs.
    assert torch.equal(exp_on.sequences_BL, exp_off.sequences_BL)
    assert not torch.equal(exp_on.old_logp_BR, exp_off.old_logp_BR)
    assert stats_off.agreement["exact"] < 1.0


def test_truncated_is_weights_are_capped_rollout_ratios(tiny_model_factory):
    _, exp, _, trainer = _rollout_then_perturb(tiny_model_factory, replay=True, tis_cap=1.5)
    from anymoe.trainers.rlhf.losses import truncated_is_weight

    w = truncated_is_weight(exp.old_logp_BR, exp.rollout_logp_BR, 1.5)
    assert w.max() <= 1.5 and (w[exp.mask_BR.bool()] != 1).any()  # the drift shows up in the weights
    trainer.policy_step(exp.micro_batches(16)[0])  # and the step runs with them


def test_non_finite_step_leaves_the_weights_alone(tiny_model_factory):
    actor, exp, _, trainer = _rollout_then_perturb(tiny_model_factory, replay=True)
    exp.advantages_BR[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in actor.module.named_parameters()}
    stats = trainer.policy_step(exp.micro_batches(16)[0])
    assert stats["nonfinite"] == 1.0
    assert all(torch.equal(before[n], p) for n, p in actor.module.named_parameters())


def test_bf16_sampler_other_numerics_replay_and_tis(tiny_model_factory):
    """A bf16 copy samples (like an inference engine); the fp32 training forward replays its routing."""
    model = tiny_model_factory(0)
    cfg = load_config(AlgoSection, {
        "rollout": {"samples_per_prompt": 4, "max_new_tokens": 4, "dtype": "bf16"},
        "policy": {"micro_batch": 16}, "moe": {"tis_cap": 2.0}})
    reward = WeightedReward([("digits", resolve_reward("digit_share"), 1.0)])
    rollout = Rollout(Actor(model), ByteTokenizer(), cfg, reward_fn=reward,
                      generator=torch.Generator().manual_seed(0))
    prompts = [p for p in ("12+34=", "56+78=", "90+11=", "23+45=") for _ in range(4)]
    exps, stats = rollout.make_experience([{"answer": "0"}] * 16, prompts)
    assert next(rollout.sampler().parameters()).dtype == torch.bfloat16
    assert stats.rollout_train_logp_gap > 1e-4  # bf16 sampling vs fp32 training log-probs differ
    optim = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant")
    out = PolicyTrainer(rollout, optim, CPUBackend(), 10).policy_step(exps[0].micro_batches(16)[0])
    assert out["ratio_max_dev"] == 0.0  # ratio against the fp32 old log-probs: exactly 1
    # The next rollout syncs the trained weights into the bf16 copy.
    w = next(model.parameters())
    assert torch.equal(next(rollout.sampler().parameters()), w.detach().to(torch.bfloat16))
