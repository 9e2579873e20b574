"""Dense -> MoE upcycling whose initial function is exactly the dense model's.

Sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055): attention, norms and
embeddings are copied; each dense SwiGLU MLP becomes E experts built from it; the router is
new. How the combine weights keep the function:

granularity 1 (every expert a copy of the MLP). All E experts compute MLP(x), so any choice
    of K experts with combine weights that sum to 1 gives sum_k w_k MLP(x) = MLP(x). The
    router is drawn fresh (random) and renormalises its top-K weights (``normalize_topk``,
    scaling 1), which makes the weights sum to 1 for every token.

granularity g > 1 (fine-grained experts, as in Qwen1.5-MoE / DeepSeekMoE). The hidden units
    of the MLP split into g slices of F = H / g; SwiGLU is per hidden unit and the down
    projection is linear, so MLP(x) = sum_j slice_j(x) exactly. Expert e holds slice
    e mod g with its down projection scaled by g. If a token's K chosen experts cover every
    slice K/g times with equal weights 1/K, the output is (g / K) (K / g) sum_j slice_j(x) =
    MLP(x). Equal weights need equal scores, so the fresh router starts at zero weight (all
    logits 0, softmax uniform), and the selection is pinned to experts 0..K-1 (which cover
    every slice K/g times, K a multiple of g) by the auxiliary-loss-free selection bias
    (DeepSeek-V3): -rate/2 on the others, below the smallest step the bias can take. The
    first optimizer step moves the router off zero, after which routing is token-dependent
    and the bias balances the load as usual; so fine-grained upcycling turns aux-free
    balancing on. (A random router would weight the slices unequally per token, and no
    exact recombination exists then.)

Sources: an anymoe dense model (``moe: null``), or any directory ``from_pretrained`` reads
that holds one (Hugging Face Llama / Qwen2, an anymoe dense checkpoint).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from anymoe.core.config import ConfigError, load_config, to_dict
from anymoe.models.config import ModelConfig
from anymoe.models.transformer import MoETransformer


def upcycled_config(
    dense: ModelConfig,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    first_dense_layers: int = 0,
    moe: dict[str, Any] | None = None,
) -> ModelConfig:
    """The MoE ModelConfig of an upcycled ``dense`` model; ConfigError for a non-preserving choice."""
    if dense.moe is not None:
        raise ConfigError("model.moe", "the source model is already an MoE model; upcycle a dense model")
    H = dense.dense_hidden
    if granularity < 1 or H % granularity:
        raise ConfigError("granularity", f"must divide the dense hidden size {H}; got {granularity}")
    if num_experts % granularity:
        raise ConfigError(
            "num_experts", f"must be a multiple of granularity {granularity}; got {num_experts}"
        )
    if top_k % granularity:
        raise ConfigError(
            "top_k",
            f"must be a multiple of granularity {granularity} so the chosen experts "
            f"cover every slice equally often; got {top_k}",
        )
    data: dict[str, Any] = copy.deepcopy(moe or {})
    router = {"kind": "topk", "score": "softmax", "normalize_topk": True, **data.pop("router", {})}
    balance = dict(data.pop("balance", {}))
    if granularity > 1:
        if balance.get("aux_free") is False:
            raise ConfigError(
                "moe.balance.aux_free",
                "fine-grained upcycling pins the first routing with the aux-free bias; leave aux_free on",
            )
        balance["aux_free"] = True
    if granularity > 1 and router["kind"] != "topk":
        raise ConfigError(
            "moe.router.kind", "fine-grained upcycling pins the first routing for plain topk only"
        )
    if (
        router["kind"] not in ("topk", "group_limited")
        or not router["normalize_topk"]
        or float(router.get("scaling", 1.0)) != 1.0
    ):
        raise ConfigError(
            "moe.router",
            "upcycling keeps the dense function only with a top-k router whose "
            "weights sum to 1: kind topk, normalize_topk true, scaling 1",
        )
    section = {
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_hidden": H // granularity,
        "router": router,
        "balance": balance,
        **data,
    }
    base = to_dict(dense)
    base.update({"moe": section, "first_dense_layers": first_dense_layers})
    return load_config(ModelConfig, base, "model")


@torch.no_grad()
def upcycle(
    dense: MoETransformer | str | os.PathLike,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    first_dense_layers: int = 0,
    moe: dict[str, Any] | None = None,
    seed: int = 0,
    backend: Any = None,
) -> MoETransformer:
    """An MoE model whose initial output equals ``dense``'s (see the module docstring)."""
    if not isinstance(dense, MoETransformer):
        from anymoe.models.io import from_pretrained

        dense = from_pretrained(dense)
    cfg = upcycled_config(dense.cfg, num_experts, top_k, granularity, first_dense_layers, moe)
    torch.manual_seed(seed)  # the fresh router (and the experts, overwritten below) come from the seed
    model = MoETransformer(cfg, backend=backend)
    src = {k: v.detach().cpu() for k, v in dense.state_dict().items()}
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in src.items() if k in own and ".ffn." not in k}, strict=False)
    g, F = granularity, cfg.moe.expert_hidden
    for i, block in enumerate(model.blocks):
        gate = src[f"blocks.{i}.ffn.gate_proj.weight"]  # [H, D]
        up = src[f"blocks.{i}.ffn.up_proj.weight"]  # [H, D]
        down = src[f"blocks.{i}.ffn.down_proj.weight"]  # [D, H]
        if not block.is_moe:
            block.ffn.load_state_dict(
                {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}
            )
            continue
        layer = block.ffn
        E = cfg.moe.num_experts
        slices = [e % g for e in range(E)]
        w1 = torch.stack([gate[j * F : (j + 1) * F].t() for j in slices])  # [E, D, F]
        w3 = torch.stack([up[j * F : (j + 1) * F].t() for j in slices])
        w2 = torch.stack([down[:, j * F : (j + 1) * F].t() * g for j in slices])  # [E, F, D], scaled by g
        canon = {"w2": w2}
        if cfg.moe.fused_w13:
            canon["w13"] = torch.cat([w1, w3], dim=-1)
        else:
            canon.update(w1=w1, w3=w3)
        ex = layer.experts
        lo, hi = ex.local_offset, ex.local_offset + ex.num_local
        for name, value in canon.items():
            getattr(ex, name).copy_(ex.to_stored(name, value[lo:hi]).to(getattr(ex, name).dtype))
        if g > 1:
            layer.router.weight.zero_()
            bias = torch.zeros(E)
            bias[top_k:] = -cfg.moe.balance.bias_update_rate / 2
            layer.router.expert_bias.copy_(bias)
    return model


__all__ = ["upcycle", "upcycled_config"]
