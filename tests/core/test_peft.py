"""PEFT switches: which MoE parameters train, and that frozen ones stay put through AdamW."""

import pytest
import torch
from torch import nn

from anymoe.core import peft
from anymoe.core.config import load_config
from anymoe.core.moe import MoEConfig, MoELayer


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model():
    cfg = load_config(MoEConfig, {"num_experts": 4, "top_k": 2, "expert_hidden": 6, "shared_experts": 1,
                                  "balance": {"aux_loss": 0.01}})
    return nn.Sequential(nn.Linear(8, 8), MoELayer(cfg, 8), MoELayer(cfg, 8))


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_router():
    m = _model()
    n = peft.freeze_router(m)
    assert n == 2 * 4 * 8
    assert not any("router" in name for name in _trainable(m))
    assert any("experts" in name for name in _trainable(m))
    peft.freeze_router(m, frozen=False)
    assert "1.router.weight" in _trainable(m)


def test_freeze_experts_with_and_without_shared():
    m = _model()
    peft.freeze_experts(m, include_shared=False)
    names = _trainable(m)
    assert not any(".experts." in n for n in names) and "1.shared.w1" in names
    peft.freeze_experts(m)
    assert not any(".shared." in n for n in _trainable(m))


def test_train_router_only_keeps_everything_else_fixed():
    torch.manual_seed(0)
    m = _model()
    n = peft.train_router_only(m)
    assert _trainable(m) == {"1.router.weight", "2.router.weight"} and n == 2 * 4 * 8
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(peft.trainable_parameters(m), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        x = torch.randn(2, 5, 8)
        h = m[0](x)
        h, a1 = m[1](h)
        y, a2 = m[2](h)
        (y.square().mean() + a1.loss + a2.loss).backward()
        opt.step()
        opt.zero_grad()
    after = m.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == (k.endswith("router.weight")), k
