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


def test_cli_lora_finetune_from_a_run_exports_merged_and_distills(tmp_path):
    """anymoe train: pretrain 2 steps -> LoRA fine-tune from that run (export_hf merged), grow its
    experts 4 -> 8 with the router frozen, distil a smaller student from it: the trainer wiring."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from anymoe.models.io import from_pretrained
    from anymoe.models.lora import LoRAConfig, apply_lora
    from anymoe.trainers.metrics import read_metrics

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    base = {"model": {"preset": "tiny", "vocab_size": 259, "d_model": 32, "max_seq_len": 32,
                      "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32}},
            "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32, "eval_split": 0.02},
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
            "train": {"steps": 2, "micro_batch": 2, "global_batch": 4, "precision": "fp32"},
            "logging": {"progress": False, "plots": False, "tensorboard": False}, "eval": {"batches": 1}}

    def train(name, **sections):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**base, "name": name, **sections}))
        cmd = [sys.executable, "-m", "anymoe", "train", str(cfg), "--out", str(tmp_path / name)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return tmp_path / name

    pre = train("pre")
    lora = {"mode": "lora", "init_from": str(pre), "lora": {"rank": 2, "alpha": 4.0}}
    ft = train("ft", finetune=lora, checkpoint={"export_hf": True})
    pre_state = torch.load(pre / "checkpoints" / "step_00000002" / "model.pt", weights_only=True)
    ft_state = torch.load(ft / "checkpoints" / "step_00000002" / "model.pt", weights_only=True)
    for key, value in ft_state.items():
        if ".base." in key:
            assert torch.equal(value, pre_state[key.replace(".base.", ".")]), key  # frozen base = pretrained
    assert any(k.endswith(".B1") and v.abs().sum() > 0 for k, v in ft_state.items())  # adapters trained
    # The export is the merged plain model and computes what the adapted model computes.
    exported = from_pretrained(ft / "hf").double().eval()
    adapted = MoETransformer(exported.cfg)
    apply_lora(adapted, LoRAConfig(rank=2, alpha=4.0))
    adapted.load_state_dict(ft_state)
    adapted = adapted.double().eval()
    ids = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), adapted(ids), rtol=1e-6, atol=1e-6)
    grown = train("grown", finetune={"init_from": str(pre), "expand_experts_to": 8, "mode": "freeze_router"})
    grown_state = torch.load(grown / "checkpoints" / "step_00000002" / "model.pt", weights_only=True)
    assert grown_state["blocks.0.ffn.experts.w1"].shape[0] == 8
    torch.testing.assert_close(grown_state["blocks.0.ffn.router.weight"][:4],
                               pre_state["blocks.0.ffn.router.weight"], rtol=0, atol=0)  # router frozen
    student = train("student", distill={"teacher": str(pre), "temperature": 2.0, "alpha": 0.5},
                    model={**base["model"], "moe": {"num_experts": 2, "top_k": 1, "expert_hidden": 16}})
    rows = [r for r in read_metrics(student) if "loss" in r]
    assert rows and all(r["distill/kd"] > 0 for r in rows)
