"""Fine-tuning pieces: grouped LoRA on experts and attention, merge, and expert expansion."""

import pytest
import torch

from anymoe.core.experts import Experts
from anymoe.core.grouped_mm import grouped_mm_loop
from anymoe.core.sizing import POW2
from anymoe.models import MoETransformer, preset
from anymoe.models.expansion import expand_experts
from anymoe.models.lora import LoRAConfig, LoRAExperts, apply_lora, has_lora, merge_lora


def _model(**over):
    torch.manual_seed(0)
    return MoETransformer(preset("tiny", **over)).double()


def _train_steps(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 12), generator=gen)
        out = model(ids, return_aux=True)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()


def test_grouped_lora_matches_per_expert_float64_loop():
    torch.manual_seed(0)
    E, D, Fh, r = 4, 6, 5, 3
    base = Experts(E, D, Fh, sizing=POW2).double()
    lora = LoRAExperts(base, rank=r, scale=2.0)
    for p in (lora.B1, lora.B3, lora.B2):
        p.data.normal_()  # non-zero B so the adapter path is exercised
    lora.B1.data[..., Fh:] = 0
    lora.B3.data[..., Fh:] = 0
    counts = torch.tensor([2, 0, 3, 1])
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    y = lora(x, counts)
    # Reference: per row, merged canonical weights W + s * A B.
    rows, start = [], 0
    for e, n in enumerate(counts.tolist()):
        w1 = base.w1[e, :, :Fh] + 2.0 * lora.A1[e] @ lora.B1[e, :, :Fh]
        w3 = base.w3[e, :, :Fh] + 2.0 * lora.A3[e] @ lora.B3[e, :, :Fh]
        w2 = base.w2[e, :Fh] + 2.0 * lora.A2[e, :Fh] @ lora.B2[e]
        for i in range(start, start + n):
            h = torch.nn.functional.silu(x[i] @ w1) * (x[i] @ w3)
            rows.append(h @ w2)
        start += n
    ref = torch.stack(rows)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    gx, gA = torch.autograd.grad(y, (x, lora.A1), g)
    rx, rA = torch.autograd.grad(ref, (x, lora.A1), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gA, rA)


def test_lora_trains_only_adapters_and_merged_export_equals_unmerged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    assert n > 0 and has_lora(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or name.split(".")[-1] in ("A1", "B1", "A2", "B2", "A3", "B3")
                             for name in trainable)
    _train_steps(model)
    # base weights unchanged, adapters moved
    for name, p in model.named_parameters():
        base_name = name.replace(".base.", ".")
        if base_name in before and not p.requires_grad:
            assert torch.equal(p, before[base_name]), name
    ids = torch.randint(0, 256, (2, 10))
    model.eval()
    with torch.no_grad():
        unmerged = model(ids)
    assert merge_lora(model) > 0 and not has_lora(model)
    with torch.no_grad():
        merged = model(ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-10, rtol=1e-10)
    assert set(model.state_dict()) == set(before)  # same keys as the base: exports as a plain model
    assert any(not torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_expansion_preserves_output_at_growth_then_new_experts_phase_in():
    model = _model(moe={"router": {"normalize_topk": True}})
    model.eval()
    ids = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        ref = model(ids)
    expand_experts(model, 12, noise_std=1e-2, bias_update_rate=0.2)
    assert model.cfg.moe.num_experts == 12 and all(l.cfg.num_experts == 12 for l in model.moe_layers())
    with torch.no_grad():
        out = model(ids, return_aux=True)
    torch.testing.assert_close(out.logits, ref, atol=1e-12, rtol=0)
    assert all(int(a.tokens_per_expert[8:].sum()) == 0 for a in out.moe_aux)
    # With aux-free balancing on, the under-loaded new experts' bias rises until they are chosen.
    model.train()
    for _ in range(20):
        with torch.no_grad():
            model(ids)
        model.update_router_biases()
    with torch.no_grad():
        late = model(ids, return_aux=True)
    assert all(int(a.tokens_per_expert[8:].sum()) > 0 for a in late.moe_aux)


def test_expansion_refuses_unnormalised_softmax_and_shrinking():
    model = _model(moe={"router": {"normalize_topk": False}})
    with pytest.raises(ValueError, match="normalize_topk"):
        expand_experts(model, 12)
    model = _model()
    with pytest.raises(ValueError, match="must grow"):
        expand_experts(model, 8)


def test_lora_experts_uses_backend_grouped_mm():
    base = Experts(2, 4, 4, grouped_mm=grouped_mm_loop)
    assert LoRAExperts(base, 2, 1.0).base.grouped_mm is grouped_mm_loop
