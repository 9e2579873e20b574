"""Every trainer hands its model and optimizer to ``Backend.optimize`` once, right after the
optimizer is made, and trains what comes back (the CPU backend's IPEX hook goes through here).

The recording backend is a real CPU backend whose ``optimize`` returns the same model (as an
in-place vendor optimiser does) with a *new* AdamW over the same parameters: only that one
may gain state, and the trainer must hold it."""

import pytest
import torch

from anymoe.backends.cpu import CPUBackend
from anymoe.trainers.optim import OptimConfig, build_optimized, build_optimizer


class RecordingBackend(CPUBackend):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.nn.Module, torch.optim.Optimizer]] = []
        self.returned: list[tuple[torch.nn.Module, torch.optim.Optimizer]] = []

    def optimize(self, model, optimizer=None):
        self.calls.append((model, optimizer))
        fresh = torch.optim.AdamW(optimizer.param_groups, lr=optimizer.defaults["lr"])
        self.returned.append((model, fresh))
        return model, fresh


def _trained(opt: torch.optim.Optimizer) -> bool:
    return any(len(s) > 0 for s in opt.state.values())


def test_build_optimized_returns_the_backends_pair():
    backend = RecordingBackend()
    model = torch.nn.Linear(3, 2)
    got_model, got_opt = build_optimized(model, OptimConfig(), backend)
    assert len(backend.calls) == 1 and backend.calls[0][0] is model
    assert isinstance(backend.calls[0][1], torch.optim.AdamW)
    assert got_model is model and got_opt is backend.returned[0][1]


def test_cpu_backend_without_ipex_returns_both_unchanged():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, OptimConfig(), CPUBackend())
    from anymoe.backends.cpu import load_ipex

    if load_ipex()[0] is not None:
        pytest.skip("IPEX is usable here: optimize really rewrites the pair")
    got = CPUBackend().optimize(model, opt)
    assert got[0] is model and got[1] is opt


def test_pretrain_trains_what_optimize_returned(tmp_path):
    from anymoe.trainers.config import load_run_config
    from anymoe.trainers.pretrain import PretrainTrainer

    cfg = load_run_config("configs/tiny.yaml", [
        "train.steps=2", "train.micro_batch=2", "train.global_batch=2", "data.seq_len=16",
        "logging.progress=false", "eval.every=0", "eval.at_end=false", "checkpoint.every=0",
        "checkpoint.at_end=false"])
    backend = RecordingBackend()
    trainer = PretrainTrainer(cfg, tmp_path / "run", backend)
    trainer.fit()
    assert len(backend.calls) == 1
    model, original = backend.calls[0]
    assert model is trainer.model and trainer.optimizer is backend.returned[0][1]
    assert _trained(trainer.optimizer) and not _trained(original)


@pytest.mark.parametrize("algo", ["rm", "dpo"])
def test_rm_dpo_train_what_optimize_returned(tmp_path, algo):
    from anymoe.trainers.rlhf.cli import trainer_class
    from anymoe.trainers.rlhf.config import load_rlhf_config

    cfg = load_rlhf_config(f"configs/rlhf/{algo}_addition.yaml", algo, [
        "train.steps=1", "train.micro_batch=4", "logging.progress=false", "eval.every=0",
        "eval.at_end=false", "checkpoint.at_end=false"])
    backend = RecordingBackend()
    trainer = trainer_class(algo)(cfg, tmp_path / algo, backend)
    trainer.fit()
    assert len(backend.calls) == 1
    model, original = backend.calls[0]
    assert model is trainer.model and trainer.optimizer is backend.returned[0][1]
    assert _trained(trainer.optimizer) and not _trained(original)
    if algo == "rm":
        assert trainer.rm.module is trainer.model


def test_ppo_actor_and_critic_train_what_optimize_returned(tmp_path):
    from anymoe.trainers.rlhf.cli import trainer_class
    from anymoe.trainers.rlhf.config import load_rlhf_config

    cfg = load_rlhf_config("configs/rlhf/ppo_addition.yaml", "ppo", [
        "train.steps=1", "rlhf.rollout.prompts_per_step=4", "rlhf.policy.micro_batch=4",
        "logging.progress=false", "eval.every=0", "eval.at_end=false", "checkpoint.at_end=false"])
    backend = RecordingBackend()
    trainer = trainer_class("ppo")(cfg, tmp_path / "ppo", backend)
    trainer.fit()
    assert len(backend.calls) == 2  # actor, then critic
    (actor_in, actor_opt0), (critic_in, critic_opt0) = backend.calls
    assert actor_in is trainer.actor.module and critic_in is trainer.critic.module
    assert trainer.engine.optimizer is backend.returned[0][1]
    assert trainer.engine.critic_optimizer is backend.returned[1][1]
    assert _trained(trainer.engine.optimizer) and _trained(trainer.engine.critic_optimizer)
    assert not _trained(actor_opt0) and not _trained(critic_opt0)
