"""The non-MoE pieces of the decoder: RMSNorm, rotary embeddings, attention, the dense SwiGLU MLP.

Written so that a Hugging Face Llama / Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint computes the
same numbers here: RMSNorm in float32 then cast back, RoPE in the "rotate half" layout (the
Hugging Face layout), grouped-query attention through ``F.scaled_dot_product_attention``.
Multi-head latent attention (DeepSeek-V2/V3) lives in ``mla.py``.

Legend: B batch, S query length, L key length (cache + S), H query heads, G key/value heads,
Dh head dim, D model dim, F hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anymoe.core.attention import causal_attention
from anymoe.core.norm import rms_norm
from anymoe.core.qk_norm_rope import qkv_norm_rope, rope_rotate_half
from anymoe.models.cache import KVCache
from anymoe.models.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019); statistics in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, gain: float = 1.0) -> None:
        super().__init__()
        self.eps = eps
        self.init_gain = gain
        self.weight = nn.Parameter(torch.full((dim,), float(gain)))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)  # a fused kernel where the backend has one


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE (Su et al. 2021) for given positions.

    Computed in float32 like the Hugging Face implementations (so converted checkpoints match),
    or in float64 for a float64 model (the reference tests).
    """

    _CACHED = 8  # tables kept by ``shared_positions`` (train and eval lengths, dtypes)

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        self.dim, self.theta = dim, theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def shared_positions(self, start: int, end: int, dtype: torch.dtype,
                         device: torch.device) -> tuple[Tensor, Tensor]:
        """Tables [1, end - start, Dh] for positions start..end-1, the same in every row.

        Cached: every training step hands the blocks the same two tensors, so a compiled block
        replayed as a CUDA graph reads them in place (they are marked static) instead of copying
        them into the graph before each replay, and the step starts without the ~6 small kernels
        that build them. Values equal ``forward`` on those positions. Not cached under
        inference mode (its tensors cannot enter a later training step's autograd graph), nor
        while a tracer records the forward (an exporter must see the ops, not a constant)."""
        if torch.is_inference_mode_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self(torch.arange(start, end, device=device)[None], dtype)
        key = (start, end, dtype, device)
        hit = self._tables.get(key)
        if hit is not None:
            return hit
        tables = self(torch.arange(start, end, device=device)[None], dtype)
        for t in tables:
            torch._dynamo.mark_static_address(t, guard=False)
        if len(self._tables) >= self._CACHED:
            self._tables.pop(next(iter(self._tables)))
        self._tables[key] = tables
        return tables

    def forward(self, pos_BS: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if dtype == torch.float64:
            inv = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float64,
                                                     device=pos_BS.device) / self.dim))
            freqs = pos_BS[..., None].double() * inv
        else:
            freqs = pos_BS[..., None].float() * self.inv_freq.float().to(pos_BS.device)
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, Dh]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_BHSD: Tensor, cos_BSD: Tensor, sin_BSD: Tensor, head_axis: int = 1) -> Tensor:
    """Rotate pairs (i, i + Dh/2) by the position angle (the Hugging Face "rotate half" layout).

    ``head_axis``: where x keeps its heads; 2 for [B, S, H, Dh] (the projections' own layout)."""
    return rope_rotate_half(x_BHSD, cos_BSD, sin_BSD, head_axis)


def apply_rope_interleaved(x_BHSD: Tensor, cos_BSD: Tensor, sin_BSD: Tensor) -> Tensor:
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's layout).

    The output is laid out de-interleaved (evens then odds); queries and keys get the same
    layout, so their dot products, hence the attention, are those of the interleaved rotation.
    """
    half = cos_BSD.shape[-1] // 2
    cos, sin = cos_BSD[..., :half].unsqueeze(1), sin_BSD[..., :half].unsqueeze(1)
    x1, x2 = x_BHSD[..., 0::2], x_BHSD[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def repeat_kv(x_BGLD: Tensor, n_rep: int) -> Tensor:
    """[B, G, L, Dh] -> [B, G*n_rep, L, Dh]: each key/value head serves n_rep query heads (GQA)."""
    if n_rep == 1:
        return x_BGLD
    B, G, L, Dh = x_BGLD.shape
    return x_BGLD[:, :, None].expand(B, G, n_rep, L, Dh).reshape(B, G * n_rep, L, Dh)


def build_attention_mask(key_valid_BL: Tensor | None, S: int, L: int, device: torch.device) -> Tensor | None:
    """Boolean mask [B or 1, 1, S, L] (True = may attend): causal, minus padded keys.

    Query i sits at key position L - S + i. A padded query (left padding) would see no valid
    key, and softmax over nothing is NaN; it is allowed its causal prefix instead: its output
    is garbage that nothing reads (padded positions are never used as context or predicted).
    Returns None when the plain causal flag of SDPA suffices (no padding, no cache).
    """
    if key_valid_BL is None and S == L:
        return None
    q_pos = torch.arange(L - S, L, device=device)
    causal_SL = q_pos[:, None] >= torch.arange(L, device=device)[None, :]
    if key_valid_BL is None:
        return causal_SL[None, None]
    valid = key_valid_BL.bool()
    query_valid_BS = valid[:, L - S:]
    allowed = causal_SL[None] & (valid[:, None, :] | ~query_valid_BS[:, :, None])
    return allowed[:, None]


def attend(q_BHSD: Tensor, k_BGLD: Tensor, v_BGLD: Tensor, mask: Tensor | None, scale: float,
           dropout: float, rep: int = 1, repeat_kv_heads: bool = False) -> Tensor:
    """Scaled dot-product attention (causal when no explicit mask is given); ``rep`` = H / G query
    heads per key/value head (a Python int, so tracers see no shape test).

    Grouped-query attention uses SDPA's ``enable_gqa``: no copy of the keys and values per query
    head, eagerly and under torch.compile alike (the attention kernel reads the G heads).
    ``repeat_kv_heads``: the explicit ``repeat_kv`` instead, for exporters (ONNX) that lack
    ``enable_gqa``; the exporter asks for it (``MoETransformer.set_export_formulation``). It is
    not guessed from tracer state: on torch 2.11 that guess also fired under torch.compile and
    put a materialised repeat (and its gradient sum) into every compiled training step.
    """
    gqa = rep > 1 and not repeat_kv_heads
    if rep > 1 and repeat_kv_heads:
        k_BGLD, v_BGLD = repeat_kv(k_BGLD, rep), repeat_kv(v_BGLD, rep)
    if mask is None:  # the backend's causal kernel (anymoe.core.attention)
        return causal_attention(q_BHSD, k_BGLD, v_BGLD, scale, dropout, gqa)
    return F.scaled_dot_product_attention(q_BHSD, k_BGLD, v_BGLD, attn_mask=mask, dropout_p=dropout,
                                          scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023) with RoPE; options: qk-norm (Qwen3), qkv bias (Qwen2)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        qkv_bias = cfg.attention_bias in ("qkv", "all")
        D, H, G, Dh = cfg.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * Dh, bias=qkv_bias)
        self.k_proj = nn.Linear(D, G * Dh, bias=qkv_bias)
        self.v_proj = nn.Linear(D, G * Dh, bias=qkv_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=cfg.attention_bias == "all")
        # Qwen3 / OLMo-2 qk-norm: RMSNorm over each head's query and key before RoPE, which bounds
        # the attention logits (Dehghani et al. 2023, "Scaling ViT to 22B": logit growth instability).
        self.q_norm = RMSNorm(Dh, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(Dh, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.scale = Dh ** -0.5
        self.repeat_kv_heads = False  # True: explicit K/V repeat for exporters (see ``attend``)

    def project_qkv(self, x_BSD: Tensor) -> Tensor:
        """[B, S, (H + 2G) * Dh]: q, k and v side by side, from one GEMM over the concatenated
        weights when all three are plain Linears (LoRA-wrapped ones run separately and are
        concatenated). One wide GEMM runs faster than three narrow ones (k and v are G * Dh
        wide), and its backward sums the three input gradients inside one GEMM instead of two
        extra adds. The parameters stay three (checkpoints, HF names)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if not all(type(p) is nn.Linear for p in projs):
            return torch.cat([p(x_BSD) for p in projs], dim=-1)
        w = torch.cat([p.weight for p in projs])
        b = None if self.q_proj.bias is None else torch.cat([p.bias for p in projs])
        return F.linear(x_BSD, w, b)

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                cache: KVCache | None = None) -> Tensor:
        B, S, _ = x_BSD.shape
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.project_qkv(x_BSD).view(B, S, H + 2 * G, Dh)
        # qk-norm and RoPE of the query and key heads in one op (a read-once kernel per
        # direction where the backend has one, whose backward writes the projection's gradient
        # whole), in the projections' [B, S, H, Dh] layout; attention takes transposed views.
        q_w, k_w = (None if n is None else n.weight for n in (self.q_norm, self.k_norm))
        eps = 0.0 if self.q_norm is None else self.q_norm.eps
        q, k, v = qkv_norm_rope(qkv, H, G, q_w, k_w, eps, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attend(q, k, v, mask, self.scale, self.dropout if self.training else 0.0,
                     self.n_heads // self.n_kv_heads, self.repeat_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class DenseMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def init_std(cfg: ModelConfig) -> tuple[float, float]:
    """(std of input-side weights, std of residual-output weights) for ``cfg.init``.

    normal: N(0, init_std) and init_std / sqrt(2 * n_layers) for the projections that write
        into the residual stream (GPT-2, Radford et al. 2019; Megatron-LM's scaled init).
    tiny:   "TinyInit" of Pangu Ultra (Yin et al. 2025, arXiv:2504.07866): std = sqrt(1 / (2 d L)),
        scaled down with both width d and depth L, used for every weight matrix; with the
        depth-scaled sandwich norm it keeps early-training loss spikes away.
    """
    if cfg.init == "tiny":
        std = math.sqrt(1.0 / (2.0 * cfg.d_model * cfg.n_layers))
        return std, std
    return cfg.init_std, cfg.init_std / math.sqrt(2.0 * cfg.n_layers)


__all__ = ["Attention", "DenseMLP", "RMSNorm", "RotaryEmbedding", "apply_rope", "apply_rope_interleaved",
           "attend", "build_attention_mask", "init_std", "repeat_kv"]
