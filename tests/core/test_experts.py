"""Stacked experts against a per-expert loop; pow2 padding is inert through AdamW training."""

import io

import pytest
import torch
import torch.nn.functional as F

from anymoe.core.config import load_config
from anymoe.core.experts import Experts
from anymoe.core.grouped_mm import grouped_mm_loop, grouped_mm_padded
from anymoe.core.moe import MoEConfig, MoELayer
from anymoe.core.sizing import POW2, ExpertSizingPolicy


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def loop_reference(ex: Experts, x_ND, counts):
    c = ex.canonical()
    Fh = ex.hidden
    w1, w3 = (c["w13"][..., :Fh], c["w13"][..., Fh:]) if ex.fused_w13 else (c["w1"], c["w3"])
    rows, start = [], 0
    for e, n in enumerate(counts.tolist()):
        for r in range(start, start + n):
            rows.append((F.silu(x_ND[r] @ w1[e]) * (x_ND[r] @ w3[e])) @ c["w2"][e])
        start += n
    return torch.stack(rows)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("sizing", [None, POW2, ExpertSizingPolicy("multiple_of", 8)])
@pytest.mark.parametrize("gmm", [grouped_mm_loop, grouped_mm_padded])
def test_experts_match_loop_forward_backward(fused, sizing, gmm):
    torch.manual_seed(0)
    ex = Experts(5, 4, 6, grouped_mm=gmm, sizing=sizing, fused_w13=fused).double()
    counts = torch.tensor([3, 0, 4, 1, 0])  # empty experts included
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(8, 4, dtype=torch.float64)
    y = ex(x, counts)
    ref = loop_reference(ex, x, counts)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-14)
    params = [x, *ex.parameters()]
    got = torch.autograd.grad((y * g).sum(), params)
    want = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_gradcheck_experts():
    torch.manual_seed(1)
    ex = Experts(3, 3, 3, sizing=POW2).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([2, 0, 3])
    names = ["w1", "w3", "w2"]
    params = [getattr(ex, n).detach().clone().requires_grad_() for n in names]

    def fn(x, *ps):
        return torch.func.functional_call(ex, dict(zip(names, ps)), (x, counts))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7)


def _cfg(**kw):
    base = {"num_experts": 4, "top_k": 2, "expert_hidden": 6, "shared_experts": 1,
            "balance": {"aux_loss": 0.01, "z_loss": 0.001}}
    base.update(kw)
    return load_config(MoEConfig, base)


@pytest.mark.parametrize("fused", [False, True])
def test_pow2_padding_is_inert_through_adamw(fused):
    """Same seed: identical outputs and (canonical) grads; 50 AdamW steps with weight decay
    keep the pad exactly zero and the loss curves agree."""
    cfg = _cfg(fused_w13=fused)
    torch.manual_seed(2)
    plain = MoELayer(cfg, 8).double()
    torch.manual_seed(2)
    padded = MoELayer(cfg, 8, sizing=POW2).double()
    assert padded.experts.padded_hidden == 8 and plain.experts.padded_hidden == 6
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (plain, padded)]
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(8, 8, dtype=torch.float64, generator=gen) * 0.3
    curves = ([], [])
    for step in range(50):
        x = torch.randn(2, 6, 8, dtype=torch.float64, generator=gen)
        for i, (m, opt) in enumerate(zip((plain, padded), opts)):
            opt.zero_grad()
            y, aux = m(x)
            loss = F.mse_loss(y, x @ target) + aux.loss
            loss.backward()
            curves[i].append(loss.item())
            if step == 0:  # same gradients on the canonical part, exact zeros on the pad
                ex = m.experts
                grads = {n: p.grad for n, p in m.named_parameters()}
                if m is padded:
                    Fh, P = ex.hidden, ex.padded_hidden
                    pad_grads = [grads["experts.w2"][:, Fh:]]
                    if fused:
                        pad_grads += [grads["experts.w13"][..., Fh:P], grads["experts.w13"][..., P + Fh:]]
                    else:
                        pad_grads += [grads["experts.w1"][..., Fh:], grads["experts.w3"][..., Fh:]]
                    assert all(bool((g == 0).all()) for g in pad_grads)
            opt.step()
    assert padded.experts.pad_is_zero()
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-9, atol=1e-12)
    assert sum(curves[0][-10:]) < sum(curves[0][:10])  # it did train
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(padded.state_dict()[k], v, rtol=1e-8, atol=1e-10, msg=k)


def test_state_dict_canonical_roundtrip_and_saved_size():
    torch.manual_seed(4)
    ex = Experts(3, 4, 5, sizing=POW2)
    sd = ex.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {"w1": (3, 4, 5), "w3": (3, 4, 5), "w2": (3, 5, 4)}
    assert all(v.is_contiguous() for v in sd.values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()))
    assert all(v.untyped_storage().nbytes() == v.numel() * 4 for v in loaded.values())  # no pad saved
    other = Experts(3, 4, 5, sizing=ExpertSizingPolicy("multiple_of", 16))
    other.load_state_dict(loaded)
    assert other.w1.shape == (3, 4, 16) and other.pad_is_zero()
    x, counts = torch.randn(6, 4), torch.tensor([1, 2, 3])
    torch.testing.assert_close(other(x, counts), ex(x, counts))


def test_init_same_for_any_sizing_and_expert_slice():
    torch.manual_seed(5)
    full = Experts(6, 4, 5)
    torch.manual_seed(5)
    part = Experts(6, 4, 5, num_local=2, local_offset=2, sizing=POW2)
    for k, v in part.state_dict().items():
        torch.testing.assert_close(v, full.state_dict()[k][2:4])
    torch.manual_seed(5)
    fused = Experts(6, 4, 5, fused_w13=True)
    torch.testing.assert_close(fused.state_dict()["w13"], torch.cat([full.w1, full.w3], dim=-1))


def test_reset_and_zero_pad():
    ex = Experts(2, 4, 3, sizing=POW2)
    with torch.no_grad():
        ex.w1.normal_()  # an outside init that ignores the pad
    assert not ex.pad_is_zero()
    ex.zero_pad_()
    assert ex.pad_is_zero()
    ex.reset_parameters(std=0.1)
    assert ex.pad_is_zero()
