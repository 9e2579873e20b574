"""Multi-head latent attention (MLA), DeepSeek-V2 (arXiv:2405.04434) / DeepSeek-V3.

Keys and values come from one low-rank latent c_kv = norm(W_dkv x) per token (the thing a
serving stack caches), expanded per head by ``kv_b_proj``; a small RoPE'd key part is
shared by all heads. Queries optionally go through their own low-rank bottleneck.

    q          = q_b(norm(q_a(x)))          or q_proj(x)           -> [B, H, S, nope + rope]
    c_kv, k_pe = kv_a(x) split                                      (latent, shared RoPE key)
    k_nope, v  = kv_b(norm(c_kv)) split per head
    k          = [k_nope, rope(k_pe) broadcast over heads];  q = [q_nope, rope(q_pe)]
    out        = o_proj(softmax(q k^T / sqrt(nope + rope)) v)

The cache here stores the expanded keys and values (simple and exact); caching the latent
instead is a memory optimisation for serving, not needed for the same logits.
Legend: B batch, S length, H heads, D model dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anymoe.models.cache import KVCache
from anymoe.models.config import ModelConfig
from anymoe.models.layers import RMSNorm, apply_rope, apply_rope_interleaved, attend

# DeepSeek's reference code builds the latent norms with the RMSNorm default eps, not the
# model's rms_norm_eps; kept so converted checkpoints give the same numbers.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        m = cfg.mla
        assert m is not None
        self.layer_idx = layer_idx
        D, H = cfg.d_model, cfg.n_heads
        self.n_heads = H
        self.nope, self.rope_dim, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.kv_rank = m.kv_lora_rank
        self.interleave = m.rope_interleave
        qk_dim = self.nope + self.rope_dim
        bias = cfg.attention_bias != "none"
        if m.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(D, m.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, H * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, m.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)
        self.scale = qk_dim ** -0.5
        self.dropout = cfg.dropout

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rope_interleaved(x, cos, sin) if self.interleave else apply_rope(x, cos, sin)

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                cache: KVCache | None = None) -> Tensor:
        B, S, _ = x_BSD.shape
        H = self.n_heads
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q = q.view(B, S, H, self.nope + self.rope_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_pe = k_pe.view(B, 1, S, self.rope_dim)
        q_pe, k_pe = self._rope(q_pe, *rope), self._rope(k_pe, *rope)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, H, S, self.rope_dim)], dim=-1)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attend(q, k, v, mask, self.scale, self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * self.v_dim))


__all__ = ["LATENT_NORM_EPS", "MLAttention"]
