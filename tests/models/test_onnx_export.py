"""ONNX export: the every-expert formulation equals the training path; the exported graph
passes onnx.checker and ONNX Runtime's logits equal PyTorch's (<= 1e-4) at two sequence lengths."""

import pytest
import torch

from anymoe.core.config import load_config
from anymoe.core.sizing import POW2
from anymoe.models import ModelConfig, MoETransformer, save_pretrained

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from anymoe.models.onnx_export import export_onnx, verify_onnx  # noqa: E402

TOL = 1e-4
BASE = {"vocab_size": 40, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64}
MOES = {
    "softmax_shared_gate": {
        "qk_norm": True,
        "moe": {
            "num_experts": 4,
            "top_k": 2,
            "expert_hidden": 16,
            "shared_experts": 1,
            "shared_gate": True,
            "router": {"normalize_topk": True},
        },
    },
    "sigmoid_group_auxfree_mla": {
        "attention": "mla",
        "n_kv_heads": None,
        "first_dense_layers": 1,
        "dense_hidden": 32,
        "mla": {
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 4,
            "v_head_dim": 8,
        },
        "moe": {
            "num_experts": 8,
            "top_k": 2,
            "expert_hidden": 16,
            "shared_experts": 1,
            "router": {
                "kind": "group_limited",
                "score": "sigmoid",
                "n_groups": 4,
                "topk_groups": 2,
                "group_score": "top2_sum",
                "normalize_topk": True,
                "scaling": 2.5,
            },
            "balance": {"aux_free": True},
        },
    },
    "fused_w13_softmax_after_topk": {
        "moe": {
            "num_experts": 6,
            "top_k": 3,
            "expert_hidden": 12,
            "fused_w13": True,
            "router": {"softmax_before_topk": False},
        }
    },
}


def _model(name, backend=None, dtype=torch.float32):
    torch.manual_seed(0)
    m = MoETransformer(load_config(ModelConfig, {**BASE, **MOES[name]}, "model"), backend=backend)
    with torch.no_grad():
        for layer in m.moe_layers():
            if layer.cfg.balance.aux_free:
                layer.router.expert_bias.normal_(0, 0.05)
    return m.to(dtype).eval()


class _Pow2:
    def grouped_mm(self, x, w, c):
        from anymoe.core.grouped_mm import grouped_mm_loop

        return grouped_mm_loop(x, w, c)

    def sizing_policy(self):
        return POW2


@pytest.mark.parametrize("name", list(MOES))
@pytest.mark.parametrize("padded", [False, True])
def test_export_formulation_equals_training_path(name, padded):
    model = _model(name, backend=_Pow2() if padded else None, dtype=torch.float64)
    ids = torch.randint(0, 40, (2, 9))
    w = torch.randn(2, 9, 40, dtype=torch.float64)
    grads = []
    for export in (False, True):  # every expert, and K/V repeated explicitly (GQA presets)
        model.set_export_formulation(export)
        model.zero_grad()
        out = model(ids)
        (out * w).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    model.set_export_formulation(False)
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-10)
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-9, atol=1e-11, msg=n)


def test_onnx_legacy_exporter_matches_pytorch(tmp_path):
    model = _model("softmax_shared_gate")
    path = export_onnx(model, tmp_path / "m.onnx", exporter="legacy")
    diffs = verify_onnx(model, path, shapes=[(1, 5), (3, 17)])
    assert max(diffs) <= TOL, diffs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sigmoid_group_auxfree_mla", "fused_w13_softmax_after_topk"])
def test_onnx_dynamo_exporter_matches_pytorch(name, tmp_path):
    # ~40 s on a loaded 2-core machine (torch.export + ONNX optimisation passes).
    model = _model(name)
    path = export_onnx(model, tmp_path / "m.onnx", exporter="dynamo")
    diffs = verify_onnx(model, path, shapes=[(1, 5), (3, 17)])
    assert max(diffs) <= TOL, diffs


def test_cli_export_onnx(tmp_path, capsys):
    from anymoe.cli import main

    save_pretrained(_model("softmax_shared_gate"), tmp_path / "ck")
    rc = main(["export", "onnx", str(tmp_path / "ck"), str(tmp_path / "out.onnx"), "--exporter", "legacy",
               "--backend", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "onnx.checker ok; ONNX Runtime vs PyTorch (cpu)" in capsys.readouterr().out
    assert (tmp_path / "out.onnx").is_file()


@pytest.mark.gpu
def test_verify_onnx_reference_on_the_accelerator(tmp_path):
    """`anymoe export --backend cuda|npu`: the reference logits come from the device path."""
    from anymoe.core.backend import get_backend

    backend = get_backend("auto")
    if backend.name == "cpu":
        pytest.skip("no accelerator backend is usable here (run with -m gpu on a GPU machine)")
    path = export_onnx(_model("softmax_shared_gate"), tmp_path / "m.onnx", exporter="legacy")
    diffs = verify_onnx(_model("softmax_shared_gate", backend=backend), path, device=backend.device())
    assert max(diffs) < 1e-4, diffs
