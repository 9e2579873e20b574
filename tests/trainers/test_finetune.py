"""finetune: each mode trains exactly the parameters it names (diff after a few AdamW steps),
LoRA's merged export equals the unmerged logits, expansion through apply_finetune preserves
the output, bad combinations are refused with the field named."""

import pytest
import torch

from anymoe.core.config import ConfigError, load_config
from anymoe.models import MoETransformer, preset
from anymoe.trainers.finetune import FinetuneConfig, apply_finetune, check_finetune, export_model

V = 256


def _model(**over):
    torch.manual_seed(0)
    over.setdefault("moe", {"shared_experts": 1})
    return MoETransformer(preset("tiny", **over)).double()


def _train(model, steps=3):
    # weight_decay 0: a frozen parameter must stay bit-identical, a trained one must move
    # because of its gradient (decay would move even a parameter with a zero gradient).
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, V, (2, 12), generator=gen)
        out = model(ids, return_aux=True)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()


def _kind(name: str) -> str:
    if ".ffn.router." in name:
        return "router"
    if ".ffn.experts." in name or ".ffn.shared." in name:
        return "experts"
    return "dense"


EXPECTED = {
    "full": {"router", "experts", "dense"},
    "freeze_router": {"experts", "dense"},
    "freeze_experts": {"router", "dense"},
    "non_moe_only": {"dense"},
    "router_only": {"router"},
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_mode_trains_only_what_it_names(mode):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = apply_finetune(model, FinetuneConfig(mode=mode))
    assert 0 < summary["trainable"] <= summary["total"]
    _train(model)
    moved = {_kind(n) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen_kinds = {"router", "experts", "dense"} - EXPECTED[mode]
    for n, p in model.named_parameters():
        if _kind(n) in frozen_kinds:
            assert torch.equal(p, before[n]), f"{mode}: frozen {n} changed"
    assert moved == EXPECTED[mode], (mode, moved)
    assert {_kind(n) for n, p in model.named_parameters() if p.requires_grad} == EXPECTED[mode]


def test_lora_mode_trains_adapters_only_and_merged_export_equals_unmerged():
    model = _model(moe={"shared_experts": 0})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    apply_finetune(model, load_config(FinetuneConfig, {"mode": "lora", "lora": {"rank": 4, "alpha": 8.0}}))
    _train(model)
    for n, p in model.named_parameters():
        base = n.replace(".base.", ".")
        if base in before:
            assert torch.equal(p, before[base]), f"base weight {n} changed under LoRA"
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in adapters) and any(n.endswith(".A1") for n in adapters)
    ids = torch.randint(0, V, (2, 10))
    model.eval()
    merged = export_model(model)
    assert merged is not model and not any(".base." in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), rtol=1e-10, atol=1e-10)
    assert set(merged.state_dict()) == keys  # exports as the plain architecture


def test_expand_through_finetune_preserves_output_then_trains():
    model = _model(moe={"shared_experts": 0})
    ids = torch.randint(0, V, (2, 10))
    model.eval()
    with torch.no_grad():
        ref = model(ids)
    summary = apply_finetune(model, FinetuneConfig(expand_experts_to=12, mode="freeze_router"), seed=3)
    assert summary["experts"] == 12 and model.cfg.moe.num_experts == 12
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, rtol=0, atol=1e-12)
    model.train()
    _train(model, steps=1)


def test_bad_combinations_name_the_field():
    tiny = preset("tiny")
    with pytest.raises(ConfigError, match="finetune.expand_experts_to"):
        check_finetune(FinetuneConfig(expand_experts_to=4), tiny, ep=1)
    with pytest.raises(ConfigError, match="finetune.expand_experts_to.*ep"):
        check_finetune(FinetuneConfig(expand_experts_to=16), tiny, ep=2)
    with pytest.raises(ConfigError, match="finetune.lora.targets"):
        check_finetune(FinetuneConfig(mode="lora"), tiny, ep=2)
    attention_only = load_config(FinetuneConfig, {"mode": "lora", "lora": {"targets": ["attention"]}})
    check_finetune(attention_only, tiny, ep=2)
    with pytest.raises(ConfigError, match="mode"):
        load_config(FinetuneConfig, {"mode": "adapters"}, "finetune")
