"""``optim.fused`` picks the AdamW implementation: auto = the backend's ``adamw_class`` where it has
one, else torch's fused kernel where the device has it, else foreach; on = torch's fused; off =
torch's foreach. The backend's class must train and checkpoint like torch's (the CUDA backend's
TritonAdamW stands in here; on the CPU it runs torch's fused kernel, with torch's state layout)."""

import pytest
import torch

from anymoe.backends.cpu import CPUBackend
from anymoe.backends.cuda_optim_kernels import TritonAdamW
from anymoe.core.config import load_config
from anymoe.models import MoETransformer, preset
from anymoe.trainers.checkpoint import canonical_optim_state, load_canonical_optim_state
from anymoe.trainers.optim import OptimConfig, build_optimizer, fused_supported


class WithAdamWClass(CPUBackend):
    def adamw_class(self):
        return TritonAdamW


def cfg(**kw):
    return load_config(OptimConfig, kw, "optim")


def test_auto_takes_the_backends_class():
    opt = build_optimizer(torch.nn.Linear(4, 4), cfg(fused="auto", lr=0.01, beta1=0.8, eps=1e-6),
                          WithAdamWClass())
    assert type(opt) is TritonAdamW
    assert opt.defaults["lr"] == 0.01 and opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-6
    assert not opt.defaults["fused"] and not opt.defaults["foreach"]  # torch's non-fused state layout
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("backend", [WithAdamWClass(), CPUBackend()], ids=["with_class", "cpu"])
def test_on_and_off_are_torchs_own(backend):
    on = build_optimizer(torch.nn.Linear(4, 4), cfg(fused="on"), backend)
    off = build_optimizer(torch.nn.Linear(4, 4), cfg(fused="off"), backend)
    assert type(on) is type(off) is torch.optim.AdamW
    assert on.defaults["fused"] is True and off.defaults["foreach"] is True


def test_auto_without_a_class_is_torch_fused_where_supported():
    backend = CPUBackend()
    opt = build_optimizer(torch.nn.Linear(4, 4), cfg(fused="auto"), backend)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults.get("fused") == (True if fused_supported(backend) else None)


def _model():
    torch.manual_seed(0)
    moe = {"num_experts": 4, "top_k": 2, "expert_hidden": 24}
    return MoETransformer(preset("tiny", vocab_size=64, d_model=16, moe=moe), backend=CPUBackend())


def _train(model, opt, seeds):
    for seed in seeds:
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
        out = model(ids, return_aux=True)
        (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("first, second", [("on", "auto"), ("auto", "off")])
def test_checkpoint_moves_between_the_backends_class_and_torch(first, second):
    """Two steps, the canonical checkpoint state (anymoe/trainers/checkpoint.py) into an optimizer of
    the other kind, two more steps: the weights of four uninterrupted steps, within fp32 rounding."""
    backend = WithAdamWClass()
    straight = _model()
    _train(straight, build_optimizer(straight, cfg(fused=first), backend), range(4))
    head = _model()
    head_opt = build_optimizer(head, cfg(fused=first), backend)
    _train(head, head_opt, range(2))
    tail = _model()
    tail.load_state_dict(head.state_dict())
    tail_opt = build_optimizer(tail, cfg(fused=second), backend)
    assert {type(head_opt), type(tail_opt)} == {TritonAdamW, torch.optim.AdamW}
    load_canonical_optim_state(tail, tail_opt, canonical_optim_state(head, head_opt))
    _train(tail, tail_opt, range(2, 4))
    for (name, p), q in zip(tail.named_parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
