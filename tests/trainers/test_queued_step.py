"""The trainer's queued optimizer step (anymoe/trainers/pretrain.py): where the optimizer takes a
device coefficient (TritonAdamW; on the CPU under ``train.precision: bf16_master``), the clip
coefficient and the skip decision are computed on the device and the step is queued before the
host read. Checked against the synchronous flow (the same trainer with the capability switched
off) bit for bit: losses, grad norms, skipped steps and checkpoint contents, with clipping on some
steps and off on others, and a poisoned step (ANYMOE_FAULT_NAN_STEPS) that must leave the
optimizer's state_dict and the weights bitwise as they were. The same on a GPU (marked gpu), where the
step runs TritonAdamW's kernel and the read waits on an event before the queued step."""

import copy
import math

import pytest
import torch
from bitwise import same

from anymoe.core.backend import get_backend, probe_backends
from anymoe.trainers.config import config_from_data
from anymoe.trainers.optim import device_grad_coef, takes_device_coef
from anymoe.trainers.pretrain import PretrainTrainer

CFG = {
    "name": "queued",
    "model": {"preset": "tiny", "vocab_size": 259, "d_model": 32, "max_seq_len": 32,
              "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 48}},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32, "eval_split": 0.02},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
    "train": {"steps": 6, "micro_batch": 2, "global_batch": 4, "precision": "bf16_master", "host_threads": 1},
    "logging": {"progress": False, "plots": False, "tensorboard": False},
    "checkpoint": {"every": 0, "at_end": False},
    "eval": {"every": 0},
}
STEPS = 6
BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _trainer(tmp_path, name, clip, queued, backend="cpu"):
    status = probe_backends().get(backend)
    if not status.ok:
        pytest.skip(f"backend {backend!r} not usable here: {status.reason}")
    data = {**CFG, "optim": {**CFG["optim"], "grad_clip": clip}}
    trainer = PretrainTrainer(config_from_data(data), tmp_path / name, get_backend(backend))
    trainer.build()
    assert takes_device_coef(trainer.optimizer)  # TritonAdamW: its kernel, or its torch path on the CPU
    if not queued:  # the synchronous flow: what any optimizer without the capability gets
        trainer.optimizer.takes_device_coef = lambda: False
    return trainer


def _curve(trainer):
    outs = [trainer.train_step(step) for step in range(STEPS)]
    return [(o.loss, o.skipped, o.reason, o.metrics["grad_norm"]) for o in outs]


# grad norms of this run: 1.18, 1.39, NaN (poisoned), 1.60, 1.59, 1.69: 1.5 clips the last three only
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [1.5, 0.0])
def test_queued_and_synchronous_steps_are_bitwise_equal(tmp_path, monkeypatch, clip, backend):
    monkeypatch.setenv("ANYMOE_FAULT_NAN_STEPS", "2")  # one bad step in the middle
    queued = _trainer(tmp_path, "q", clip, True, backend)
    synchronous = _trainer(tmp_path, "s", clip, False, backend)
    stepped = []
    real_step = queued.optimizer.step

    def recording_step(*args, **kwargs):
        stepped.append(kwargs.get("grad_coef"))
        return real_step(*args, **kwargs)

    queued.optimizer.step = recording_step
    a, b = _curve(queued), _curve(synchronous)
    assert same(a, b, nan_equal=True)
    assert [skipped for _, skipped, _, _ in a] == [False, False, True, False, False, False]
    norms = [norm for _, skipped, _, norm in a if not skipped]
    if backend == "cpu":  # the norms above (another device's kernels sum in another order)
        assert (clip > 0) == (min(norms) < clip < max(norms))  # clipped on some steps, not on others
    assert len(stepped) == STEPS and all(torch.is_tensor(c) and c.dtype == torch.float64 for c in stepped)
    assert math.isnan(stepped[2]) and not any(math.isnan(c) for i, c in enumerate(stepped) if i != 2)
    assert same(queued.checkpoint_files(), synchronous.checkpoint_files(), nan_equal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_poisoned_step_leaves_the_optimizer_and_weights_bitwise(tmp_path, monkeypatch, backend):
    monkeypatch.setenv("ANYMOE_FAULT_NAN_STEPS", "1")
    trainer = _trainer(tmp_path, "p", 1.0, True, backend)
    trainer.train_step(0)
    state = copy.deepcopy(trainer.optimizer.state_dict())
    weights = copy.deepcopy(trainer.model.state_dict())
    out = trainer.train_step(1)
    assert out.skipped and out.reason == "non-finite loss"
    after = trainer.optimizer.state_dict()
    assert same(after["state"], state["state"], nan_equal=True)  # step counts included: 1, not 2
    for group in after["param_groups"] + state["param_groups"]:
        group.pop("lr")  # set by the schedule at the start of every step, skipped or not
    assert same(after, state, nan_equal=True)
    assert same(trainer.model.state_dict(), weights, nan_equal=True)
    assert all(float(st["step"]) == 1.0 for st in trainer.optimizer.state.values())
    assert not trainer.train_step(2).skipped
    assert all(float(st["step"]) == 2.0 for st in trainer.optimizer.state.values())


def test_device_coef_is_the_host_formula_bit_for_bit():
    """device_grad_coef against the host's clip / (math.sqrt(a + b) + 1e-6) if clip > 0 and the norm
    exceeds clip else 1, on float64 squares of every scale: the fp32 value the optimizer multiplies
    by always, the float64 value wherever torch's sqrt is math.sqrt (torch's CPU sqrt, MKL's vector
    math, is 1 ulp off on a few inputs: device_grad_coef's docstring); NaN where the norm or the
    loss is not finite."""
    g = torch.Generator().manual_seed(0)
    squares = torch.exp(torch.randn(400, 2, generator=g, dtype=torch.float64) * 8)
    off = 0
    for clip in (0.0, 1.0, 0.3, 7.5):
        for a, b in squares.tolist():
            norm = math.sqrt(a + b)
            want = clip / (norm + 1e-6) if clip > 0 and norm > clip else 1.0
            got = device_grad_coef(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                                   torch.tensor(5.0, dtype=torch.float64), clip)
            assert got.dtype == torch.float64 and got.float().item() == torch.tensor(want).float().item()
            if torch.tensor(a + b, dtype=torch.float64).sqrt().item() == norm:
                assert got.item() == want, (clip, a, b)
            else:
                off += 1
    assert off < 0.2 * squares.shape[0] * 4
    one, nan, inf = (torch.tensor(x, dtype=torch.float64) for x in (1.0, math.nan, math.inf))
    for dense, expert, loss in ((nan, one, one), (inf, one, one), (one, inf, one), (one, one, nan),
                                (one, one, inf)):
        assert math.isnan(device_grad_coef(dense, expert, loss, 1.0).item())


def test_optimizers_without_the_capability_keep_the_synchronous_flow():
    params = [torch.nn.Parameter(torch.ones(3))]
    assert not takes_device_coef(torch.optim.AdamW(params, fused=True))
    assert not takes_device_coef(torch.optim.AdamW(params, foreach=True))
