"""Schedules against their textbook formulas; AdamW parameter groups and the fused choice."""

import math

import pytest
import torch

from anymoe.core.backend import get_backend
from anymoe.core.config import ConfigError, load_config
from anymoe.trainers.optim import LRSchedule, OptimConfig, build_optimizer, fused_supported


def cfg(**kw):
    return load_config(OptimConfig, kw, "optim")


def test_cosine_matches_formula():
    c = cfg(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    s = LRSchedule(c, 110)
    assert [s.lr_at(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert s.lr_at(9) == pytest.approx(1.0)
    for step in (10, 35, 60, 85, 109):
        t = (step - 10) / 100
        assert s.lr_at(step) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * t)))
    assert s.lr_at(110) == pytest.approx(0.1)
    assert s.lr_at(500) == pytest.approx(0.1)  # past the end: stays at min_lr


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_warmup_stable_decay(shape):
    c = cfg(lr=0.5, min_lr=0.05, warmup_steps=5, schedule="wsd", decay_fraction=0.2, decay_shape=shape)
    s = LRSchedule(c, 100)
    lrs = [s.lr_at(i) for i in range(101)]
    assert lrs[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert all(lr == 0.5 for lr in lrs[5:80])  # stable stage
    decay = lrs[80:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # decays monotonically
    assert decay[-1] == pytest.approx(0.05)
    p = 10 / 20
    frac = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "sqrt": 1 - math.sqrt(p)}[shape]
    assert lrs[90] == pytest.approx(0.05 + 0.45 * frac)


def test_constant_and_apply_sets_groups():
    c = cfg(lr=0.5, min_lr=0.0, warmup_steps=0, schedule="constant")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, c, get_backend("cpu"))
    assert LRSchedule(c, 10).apply(opt, 7) == 0.5
    assert all(g["lr"] == 0.5 for g in opt.param_groups)


def test_no_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, cfg(weight_decay=0.1), get_backend("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def test_fused_is_asked_of_the_backend():
    backend = get_backend("cpu")
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg(fused="auto"), backend)
    assert opt.defaults.get("fused") == (True if fused_supported(backend) else None)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg(fused="off"), backend)
    assert not opt.defaults.get("fused")


def test_min_lr_above_lr_is_rejected():
    with pytest.raises(ConfigError, match="optim.min_lr"):
        cfg(lr=1e-3, min_lr=1e-2)
