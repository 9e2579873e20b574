"""The trainer's gradient norm (dense and expert parts, multi-tensor) against a float64 sum of
squares of the same gradients, and its clipping (one multi-tensor multiply) against scaling
each gradient by clip / (norm + 1e-6)."""

import math

import pytest
import torch

from anymoe.core.backend import get_backend
from anymoe.trainers.config import config_from_data
from anymoe.trainers.pretrain import PretrainTrainer

CFG = {
    "name": "clip",
    "model": {"preset": "tiny", "vocab_size": 259, "d_model": 32, "max_seq_len": 32,
              "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 48}},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32, "eval_split": 0.02},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
    "train": {"steps": 2, "micro_batch": 2, "global_batch": 4, "precision": "fp32", "host_threads": 1},
    "logging": {"progress": False, "plots": False, "tensorboard": False},
    "checkpoint": {"every": 0, "at_end": False},
    "eval": {"every": 0},
}


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_grad_norm_and_clipping_match_float64_reference(tmp_path, clip):
    data = {**CFG, "optim": {**CFG["optim"], "grad_clip": clip}}
    trainer = PretrainTrainer(config_from_data(data), tmp_path, get_backend("cpu"))
    trainer.build()
    seen: dict = {}
    norm_squares = trainer._grad_norm_squares

    def recording():
        seen["before"] = {n: p.grad.detach().double().clone() for n, p in trainer.model.named_parameters()
                          if p.grad is not None}
        seen["squares"] = [t.item() for t in norm_squares()]
        return norm_squares()

    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen["after"] = {n: p.grad.detach().double().clone() for n, p in trainer.model.named_parameters()
                         if p.grad is not None}
        return step(*args, **kwargs)

    trainer._grad_norm_squares = recording
    trainer.optimizer.step = recording_step
    out = trainer.train_step(0)
    before = seen["before"]
    dense = sum(g.square().sum().item() for n, g in before.items() if not trainer._expert_param(n))
    expert = sum(g.square().sum().item() for n, g in before.items() if trainer._expert_param(n))
    assert expert > 0 and dense > 0
    assert seen["squares"] == pytest.approx([dense, expert], rel=1e-12)
    norm = math.sqrt(dense + expert)
    assert out.metrics["grad_norm"] == pytest.approx(norm, rel=1e-12)
    coef = clip / (norm + 1e-6) if norm > clip else 1.0
    assert (coef < 1.0) == (clip < 1.0)  # both branches are exercised
    for n, g in before.items():
        torch.testing.assert_close(seen["after"][n], g * coef, rtol=1e-6, atol=0.0, msg=n)


@pytest.mark.parametrize("optimizer", ["torch", "triton"])
@pytest.mark.parametrize("coef", [0.37, 1.0])
def test_clipped_step_is_a_step_on_scaled_gradients(optimizer, coef):
    """clipped_step(opt, params, c) == opt.step() on c * grad: by scaling in place first (torch's
    AdamW), or inside the update (TritonAdamW takes grad_coef; on the CPU its torch path runs)."""
    from anymoe.backends.cuda_optim_kernels import TritonAdamW
    from anymoe.trainers.optim import clipped_step

    make = {"torch": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1, fused=True),
            "triton": lambda ps: TritonAdamW(ps, lr=0.1, weight_decay=0.1)}[optimizer]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(n, generator=g) for n in (5, 300)]
    grads = [torch.randn(n, generator=g) for n in (5, 300)]

    def run(clip_inside: bool):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make(params) if clip_inside else torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, fused=True)
        for p, gr in zip(params, grads):
            p.grad = gr.clone() if clip_inside else gr * coef
        clipped_step(opt, params, coef) if clip_inside else opt.step()
        return params

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)
