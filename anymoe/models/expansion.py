"""Progressive expert expansion: grow a trained MoE's expert count without changing its function.

Each new expert is a copy of an existing ("parent") expert plus small noise, and its router
row a copy of the parent's row. The function is preserved at the moment of growth because
the new experts are never *selected* yet: they get an auxiliary-loss-free selection bias
(DeepSeek-V3 eq. 16; it moves the choice, never the combine weight) below every existing
score, and aux-free balancing is switched on. Under-loaded experts then have their bias
raised by ``bias_update_rate`` each step, so the new experts phase in by themselves.

The combine weights of the experts already chosen must not change either, which holds when
they do not depend on the other experts' logits: sigmoid scores, renormalised top-k, or
softmax over the K chosen logits (Mixtral). Unnormalised softmax over all experts would
shrink every weight (a larger denominator), so it is refused.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from anymoe.core.moe import MoELayer


def check_expandable(layer: MoELayer, new_experts: int) -> None:
    cfg = layer.cfg
    E = cfg.num_experts
    if new_experts <= E:
        raise ValueError(f"num_experts must grow: the model has {E}, asked for {new_experts}")
    if cfg.router.kind not in ("topk", "noisy_topk"):
        raise ValueError("expert expansion needs token-choice top-k routing; "
                         f"moe.router.kind is {cfg.router.kind!r}")
    r = cfg.router
    weights_local = r.score == "sigmoid" or r.normalize_topk or not r.softmax_before_topk
    if not weights_local:
        raise ValueError("expert expansion preserves the function only when combine weights ignore the "
                         "other experts: set moe.router.normalize_topk: true, score: sigmoid, or "
                         "softmax_before_topk: false")
    if layer.dispatcher.num_local_experts != E:
        raise ValueError("expand experts on a gathered (EP = 1) model, then reshard")


@torch.no_grad()
def expand_layer(layer: MoELayer, new_experts: int, noise_std: float = 1e-3, margin: float = 1.0,
                 generator: torch.Generator | None = None, bias_update_rate: float | None = None) -> MoELayer:
    """A new MoELayer with ``new_experts`` experts computing the same function as ``layer`` now.

    ``bias_update_rate`` (default: the layer's) sets how fast the new experts phase in.
    """
    check_expandable(layer, new_experts)
    E, cfg = layer.cfg.num_experts, layer.cfg
    parents = torch.arange(new_experts - E) % E  # round-robin parents: expert i seeds E + i, E + E + i, ...
    balance = _aux_free(cfg.balance, bias_update_rate)
    new_cfg = dataclasses.replace(cfg, num_experts=new_experts, balance=balance)
    old = layer.experts
    new = MoELayer(new_cfg, layer.d_model, grouped_mm=old.grouped_mm, sizing=old.sizing)
    dev = old.w2.device

    def grow(w: Tensor, scale: float) -> Tensor:
        child = w[parents.to(w.device)]
        noise = torch.randn(child.shape, generator=generator).to(dev, w.dtype) * scale
        return torch.cat([w, child + noise])

    canon = old.canonical()
    new.experts.to(dev, old.w2.dtype)
    grown = {name: grow(value, noise_std * float(value.std())) for name, value in canon.items()}
    for name, value in grown.items():
        getattr(new.experts, name).copy_(new.experts.to_stored(name, value))
    if getattr(layer.router, "learned", True):
        new.router.to(dev)
        new.router.weight.copy_(grow(layer.router.weight, noise_std * float(layer.router.weight.std())))
        if hasattr(layer.router, "noise_weight"):
            new.router.noise_weight.copy_(torch.cat([layer.router.noise_weight,
                                                     layer.router.noise_weight[parents.to(dev)]]))
    # Selection scores are in [0, 1] (softmax or sigmoid) plus the old bias: put the new experts
    # ``margin`` below the lowest possible old selection score so none is chosen at growth.
    old_bias = layer.router.expert_bias
    low = float(old_bias.min()) - 1.0 - margin
    new.router.expert_bias.copy_(torch.cat([old_bias, old_bias.new_full((new_experts - E,), low)]))
    if layer.shared is not None:
        new.shared.load_state_dict(layer.shared.state_dict())
        new.shared.to(dev)
    new.set_process_groups(layer.dp_group, layer.ep_group, layer.bias_group)
    new.train(layer.training)
    return new.to(dev)


def _aux_free(balance, rate: float | None):
    rate = balance.bias_update_rate if rate is None else rate
    return dataclasses.replace(balance, aux_free=True, bias_update_rate=rate)


def expand_experts(model: nn.Module, new_experts: int, noise_std: float = 1e-3, margin: float = 1.0,
                   seed: int = 0, bias_update_rate: float | None = None) -> nn.Module:
    """Grow every MoE layer of an ``MoETransformer`` to ``new_experts`` experts, in place."""
    gen = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        if block.is_moe:
            block.ffn = expand_layer(block.ffn, new_experts, noise_std, margin, gen, bias_update_rate)
    moe = model.cfg.moe
    model.cfg = dataclasses.replace(model.cfg, moe=dataclasses.replace(
        moe, num_experts=new_experts, balance=_aux_free(moe.balance, bias_update_rate)))
    return model
