"""The model on an accelerator (run by the lead on the GPU box): same logits as the CPU, the
moe-1b preset trains a step under autocast, KV-cache generation equals recomputation there."""

import time

import pytest
import torch

from anymoe.models import MoETransformer, preset
from anymoe.models.generate import generate

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def backend():
    from anymoe.core.backend import get_backend

    b = get_backend("auto")
    if b.name == "cpu":
        pytest.skip("no accelerator backend is usable here (run with -m gpu on a GPU machine)")
    return b


def test_device_logits_match_cpu(backend):
    torch.manual_seed(0)
    cpu = MoETransformer(preset("tiny", moe={"shared_experts": 1})).eval()
    torch.manual_seed(0)
    dev = (
        MoETransformer(preset("tiny", moe={"shared_experts": 1}), backend=backend).to(backend.device()).eval()
    )
    for (n, a), b in zip(cpu.state_dict().items(), dev.state_dict().values()):
        assert torch.equal(a, b.cpu()), f"{n}: weights differ before the move"  # bit-identical init
    ids = torch.randint(0, 256, (4, 33))
    with torch.no_grad():
        diff = (dev(ids.to(backend.device())).cpu() - cpu(ids)).abs().max().item()
    assert diff <= 1e-3, diff


def test_moe_1b_step_under_autocast(backend):
    torch.manual_seed(0)
    cfg = preset("moe-1b", n_layers=2)
    model = MoETransformer(cfg, backend=backend).to(backend.device())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (4, 1024), device=backend.device())
    dtype = backend.autocast_dtype() or torch.float32
    for step in range(3):
        t0 = time.perf_counter()
        with torch.autocast(backend.device_type, dtype=dtype):
            out = model(ids[:, :-1], return_aux=True)
            loss = (
                torch.nn.functional.cross_entropy(
                    out.logits.float().reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1)
                )
                + out.aux_loss
            )
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_router_biases()
        backend.synchronize()
        print(f"step {step}: loss {loss.item():.3f} {time.perf_counter() - t0:.3f} s")
        assert torch.isfinite(loss)


def test_cached_generation_on_device(backend):
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny"), backend=backend).to(backend.device()).eval()
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 4], [11]]
    a = generate(model, prompts, 16, use_cache=True)
    b = generate(model, prompts, 16, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)
