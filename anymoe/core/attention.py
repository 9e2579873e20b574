"""Causal self-attention as an op family: torch's scaled-dot-product attention everywhere; a backend
may register another kernel for its device (``register_attention_ops``).

Why a family: on CUDA, ``train.deterministic: true`` has to leave cuDNN attention out (its backward
is not repeatable) and makes SDPA run flash attention's deterministic backward, 1.60 ms against
cuDNN's 0.90-0.97 ms for moe-1b's attention (fwd + bwd, B 8, S 2048, 16 / 4 heads, H100;
bench/results/gpu_h100/session8/attn_det_h100.json): 7.5 ms of a 76 ms training step. A compiled
FlexAttention kernel is repeatable bit for bit and takes 1.23 ms there, so the CUDA backend runs it
inside compiled blocks when deterministic algorithms are on (its attention module in anymoe/backends/).

Legend: B batch, H query heads, G key/value heads, S query positions, L key positions, D head dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from anymoe.core.op_registry import OpRegistry


class AttentionOps:
    """The formula: ``F.scaled_dot_product_attention``, causal (query i sees keys <= i)."""

    name = "torch"

    def causal(self, q_BHSD: Tensor, k_BGLD: Tensor, v_BGLD: Tensor, scale: float, dropout: float,
               gqa: bool) -> Tensor:
        return F.scaled_dot_product_attention(q_BHSD, k_BGLD, v_BGLD, is_causal=True, dropout_p=dropout,
                                              scale=scale, enable_gqa=gqa)


TORCH_ATTENTION_OPS = AttentionOps()
_REGISTRY: OpRegistry[AttentionOps] = OpRegistry("attention", TORCH_ATTENTION_OPS)


def register_attention_ops(device_type: str, ops: AttentionOps) -> None:
    """A backend's attention for tensors of ``device_type`` (one registration each)."""
    _REGISTRY.register(device_type, ops)


def attention_ops_for(x: Tensor, fast: bool = True) -> AttentionOps:
    return _REGISTRY.for_tensor(x, fast)


def causal_attention(q_BHSD: Tensor, k_BGLD: Tensor, v_BGLD: Tensor, scale: float, dropout: float = 0.0,
                     gqa: bool = False) -> Tensor:
    """[B, H, S, D] attention output; ``gqa``: H / G query heads share each key/value head."""
    return attention_ops_for(q_BHSD).causal(q_BHSD, k_BGLD, v_BGLD, scale, dropout, gqa)


__all__ = ["AttentionOps", "TORCH_ATTENTION_OPS", "attention_ops_for", "causal_attention",
           "register_attention_ops"]
