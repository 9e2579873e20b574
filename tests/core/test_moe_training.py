"""A short CPU training run of a small stacked-MoE model learns a synthetic task.

Task: every token id maps to a fixed random target id. Embedding and output head are
frozen random matrices, so only the MoE layers (routers and experts) can lower the loss.
"""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anymoe.core.config import load_config
from anymoe.core.moe import MoEConfig, MoELayer, moe_stats

V, D, STEPS = 32, 16, 40


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyMoEModel(nn.Module):
    def __init__(self, cfg: MoEConfig, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.norms = nn.ModuleList(nn.RMSNorm(D) for _ in range(layers))
        self.moes = nn.ModuleList(MoELayer(cfg, D) for _ in range(layers))
        self.head = nn.Linear(D, V, bias=False)
        self.embed.requires_grad_(False)
        self.head.requires_grad_(False)

    def forward(self, tok):
        h = self.embed(tok)
        aux_total, stats = 0.0, []
        for norm, moe in zip(self.norms, self.moes):
            y, aux = moe(norm(h), token_ids=tok)
            h = h + y
            aux_total = aux_total + aux.loss
            stats.append(aux)
        return self.head(h), aux_total, stats


CONFIGS = {
    "topk_softmax": {"router": {"kind": "topk"}, "balance": {"aux_loss": 0.01, "z_loss": 0.001}},
    "sigmoid_aux_free": {"router": {"score": "sigmoid", "normalize_topk": True},
                         "balance": {"aux_free": True, "bias_update_rate": 0.001}},
    "expert_choice": {"router": {"kind": "expert_choice", "capacity": 1.0}},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_lowers_loss(name):
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = load_config(MoEConfig, {"num_experts": 8, "top_k": 2, "expert_hidden": 32, **CONFIGS[name]})
    model = TinyMoEModel(cfg)
    target = torch.randperm(V)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        tok = torch.randint(0, V, (8, 16), generator=gen)
        logits, aux_loss, stats = model(tok)
        loss = F.cross_entropy(logits.reshape(-1, V), target[tok].reshape(-1))
        opt.zero_grad()
        (loss + aux_loss).backward()
        opt.step()
        for moe in model.moes:
            moe.update_bias()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 0.8 * math.log(V)
    assert last < 0.5 * first, (first, last)
    s = moe_stats(stats[0])
    assert s["dropped_frac"] == 0.0 and s["utilisation"] > 0.5
    if name == "sigmoid_aux_free":
        assert model.moes[0].router.expert_bias.abs().sum() > 0
    print(f"{name}: loss {first:.3f} -> {last:.3f} in {time.perf_counter() - t0:.1f} s")
