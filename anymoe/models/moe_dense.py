"""The MoE layer as "every expert, weighted by its gate": an export-friendly formulation.

    gates_TE = scatter of the K combine weights into an E-wide row (0 where unrouted)
    y_TD     = sum_e gates_TE[:, e] * SwiGLU_e(x_TD)   (+ shared experts)

It computes the same function as the dispatch path (sort by expert, grouped matmul,
un-permute) for dropless routing, with no data-dependent shapes: every op is a dense
einsum, so ONNX exporters (dynamo and TorchScript) and graph compilers take it whole, which
the argsort-based dispatch does not. It does E/K times the expert FLOPs, which is fine for
export and small-batch inference, not for training. Routing (the router module itself,
float32) is shared with the training path; tests check the two paths agree.

Legend: T tokens, D model dim, F expert hidden (stored), E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from anymoe.core.moe import MoELayer


def dense_moe_forward(layer: MoELayer, x_BSD: Tensor, token_ids: Tensor | None = None) -> Tensor:
    """``layer``'s output computed through every expert (inference; no aux, no capacity)."""
    if layer.cfg.capacity_factor is not None:
        raise ValueError("the every-expert formulation is dropless; "
                         "export a model with capacity_factor: null")
    ex = layer.experts
    if ex.num_local != ex.num_experts:
        raise ValueError("the every-expert formulation needs all experts on one process (EP = 1)")
    shape = x_BSD.shape
    x_TD = x_BSD.reshape(-1, shape[-1])
    r = layer.route(x_TD, token_ids, None)
    if r.expert_ids_TK is None:
        raise ValueError("expert-choice routing depends on the whole batch; it has no per-token export")
    gates_TE = torch.zeros(x_TD.shape[0], ex.num_experts, dtype=r.weights_TK.dtype, device=x_TD.device)
    gates_TE = gates_TE.scatter(1, r.expert_ids_TK, r.weights_TK)
    if ex.fused_w13:
        w1, w3 = ex.w13.chunk(2, dim=-1)  # stored [gate | up], each padded to the same width
    else:
        w1, w3 = ex.w1, ex.w3
    h_ETF = F.silu(torch.einsum("td,edf->etf", x_TD, w1)) * torch.einsum("td,edf->etf", x_TD, w3)
    y_ETD = torch.einsum("etf,efd->etd", h_ETF, ex.w2)
    y_TD = torch.einsum("te,etd->td", gates_TE.to(y_ETD.dtype), y_ETD)
    if layer.shared is not None:
        y_TD = y_TD + layer.shared(x_TD)
    return y_TD.reshape(shape)


__all__ = ["dense_moe_forward"]
