"""Causal attention on CUDA: FlexAttention inside compiled blocks when deterministic algorithms are on.

In strict deterministic mode SDPA leaves cuDNN out and runs flash attention with its deterministic
backward, which serialises the accumulation of dQ: 1.60 ms for moe-1b's attention against 0.90 ms
non-deterministic (H100, bench/results/gpu_h100/session8/attn_det_h100.json). FlexAttention's
Triton kernels compute dQ in one loop and dK / dV in another, with no atomics, so two runs give
the same bits; 1.23 ms there. Inductor generates them, so the flex path needs ``torch.compile``
(``train.compile: blocks`` / ``blocks_cudagraphs``); eager runs keep SDPA. With deterministic
algorithms off, cuDNN (picked by SDPA) is faster and stays. Importing this module registers the
ops for "cuda".
"""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.core.attention import TORCH_ATTENTION_OPS, AttentionOps, register_attention_ops

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: SDPA only
    create_block_mask = flex_attention = None


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_causal(q_BHSD: Tensor, k_BGLD: Tensor, v_BGLD: Tensor, scale: float, gqa: bool) -> Tensor:
    """Causal attention through FlexAttention (query i sees keys <= i; S == L)."""
    S, L = q_BHSD.shape[-2], k_BGLD.shape[-2]
    mask = create_block_mask(_causal, B=None, H=None, Q_LEN=S, KV_LEN=L, device=q_BHSD.device)
    return flex_attention(q_BHSD, k_BGLD, v_BGLD, block_mask=mask, scale=scale, enable_gqa=gqa)


def use_flex(q_BHSD: Tensor, k_BGLD: Tensor, dropout: float) -> bool:
    """Flex where it is both repeatable and compiled: deterministic algorithms on, inside
    ``torch.compile``, no dropout, self-attention (S == L: no cached prefix)."""
    return (flex_attention is not None and dropout == 0.0 and torch.are_deterministic_algorithms_enabled()
            and torch.compiler.is_compiling() and q_BHSD.shape[-2] == k_BGLD.shape[-2])


class CudaAttentionOps(AttentionOps):
    name = "cuda_flex_when_deterministic"

    def causal(self, q_BHSD: Tensor, k_BGLD: Tensor, v_BGLD: Tensor, scale: float, dropout: float,
               gqa: bool) -> Tensor:
        if use_flex(q_BHSD, k_BGLD, dropout):
            return flex_causal(q_BHSD, k_BGLD, v_BGLD, scale, gqa)
        return TORCH_ATTENTION_OPS.causal(q_BHSD, k_BGLD, v_BGLD, scale, dropout, gqa)


CUDA_ATTENTION_OPS = CudaAttentionOps()
register_attention_ops("cuda", CUDA_ATTENTION_OPS)
