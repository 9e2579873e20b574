"""ModelConfig: the settings of the MoE decoder, one frozen dataclass loaded by ``load_config``.

Stability options and where they come from:
- ``init: tiny`` -- TinyInit (Pangu Ultra, Yin et al. 2025, arXiv:2504.07866): every weight
  N(0, sqrt(1 / (2 d L))), scaled down with width d and depth L.
- ``sandwich_norm`` -- depth-scaled sandwich norm (Pangu Ultra; sandwich-LN from CogView, Ding
  et al. 2021): an extra RMSNorm on each sublayer's output before the residual add, its gain
  initialised to ``1 / sqrt(L)`` so the residual stream grows slowly with depth.
- ``qk_norm`` -- RMSNorm on queries and keys per head (Dehghani et al. 2023; Qwen3, OLMo-2).
- router in float32 and the router z-loss (ST-MoE, Zoph et al. 2022) are MoE settings:
  ``moe.router`` / ``moe.balance`` (anymoe.core.moe.MoEConfig).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from anymoe.core.config import ConfigError, param
from anymoe.core.moe import MoEConfig


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434): keys/values from a low-rank latent."""

    q_lora_rank: int = param(0, ge=0, doc="rank of the query down-projection; 0 = full-rank q_proj")
    kv_lora_rank: int = param(512, ge=1, doc="rank of the shared key/value latent")
    qk_nope_head_dim: int = param(128, ge=1, doc="per-head query/key dims without RoPE")
    qk_rope_head_dim: int = param(64, ge=2, doc="per-head query/key dims with RoPE (shared key part)")
    v_head_dim: int = param(128, ge=1, doc="per-head value dim")
    rope_interleave: bool = param(True, doc="RoPE on interleaved pairs (DeepSeek layout)")

    def validate(self) -> None:
        if self.qk_rope_head_dim % 2:
            raise ConfigError("qk_rope_head_dim", f"must be even for RoPE; got {self.qk_rope_head_dim}")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer whose feed-forward blocks are MoE layers (or dense SwiGLU)."""

    vocab_size: int = param(32000, ge=1, doc="vocabulary size")
    d_model: int = param(512, ge=1, doc="model width D")
    n_layers: int = param(8, ge=1, doc="number of decoder blocks")
    n_heads: int = param(8, ge=1, doc="query heads")
    n_kv_heads: int | None = param(None, ge=1, doc="key/value heads (GQA); null = n_heads")
    head_dim: int | None = param(None, ge=1, doc="per-head dim; null = d_model / n_heads")
    dense_hidden: int | None = param(None, ge=1, doc="SwiGLU hidden size of the dense layers")
    first_dense_layers: int = param(0, ge=0, doc="the first N blocks use a dense MLP instead of MoE")
    moe: MoEConfig | None = param(None, doc="the MoE layer settings; null = a dense model")
    tie_embeddings: bool = param(False, doc="share the input embedding and the output head")
    rope_theta: float = param(10000.0, gt=0, doc="RoPE base")
    norm_eps: float = param(1e-6, gt=0, doc="RMSNorm epsilon")
    max_seq_len: int = param(2048, ge=1, doc="longest sequence the model is used with")
    init: Literal["normal", "tiny"] = param("normal", doc="normal: N(0, init_std); tiny: TinyInit")
    init_std: float = param(0.02, gt=0, doc="std of the normal init")
    sandwich_norm: bool = param(False, doc="depth-scaled sandwich norm after each sublayer")
    dropout: float = param(0.0, ge=0, lt=1, doc="attention and residual dropout (0 for parity runs)")
    qk_norm: bool = param(False, doc="RMSNorm on per-head queries and keys (Qwen3)")
    attention_bias: Literal["none", "qkv", "all"] = param("none", doc="qkv: Qwen2 biases; all: +o_proj")
    attention: Literal["gqa", "mla"] = param("gqa", doc="grouped-query or multi-head latent attention")
    mla: MLAConfig | None = param(None, doc="settings of attention: mla")
    checkpointing: Literal["none", "selective", "full"] = param(
        "none", doc="activation recompute: selective = attention and dense MLP pieces, full = whole block")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and i >= self.first_dense_layers

    def validate(self) -> None:
        if self.n_heads % self.kv_heads:
            raise ConfigError("n_kv_heads", f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                              f"({self.kv_heads}); pick a divisor of n_heads")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError("head_dim", f"d_model ({self.d_model}) is not divisible by n_heads "
                              f"({self.n_heads}); set head_dim explicitly")
        if self.attention == "gqa" and self.dim_per_head % 2:
            raise ConfigError("head_dim", f"must be even for RoPE; got {self.dim_per_head}")
        if self.attention == "mla" and self.mla is None:
            raise ConfigError("mla", "attention: mla needs an mla: section (kv_lora_rank, ...)")
        if self.attention == "mla" and self.qk_norm:
            raise ConfigError("qk_norm", "qk_norm applies to attention: gqa only; set it to false")
        needs_dense = self.moe is None or self.first_dense_layers > 0
        if needs_dense and self.dense_hidden is None:
            what = "a dense model (moe: null)" if self.moe is None else "first_dense_layers > 0"
            raise ConfigError("dense_hidden", f"{what} needs the dense MLP size; set dense_hidden")
        if self.first_dense_layers > self.n_layers:
            raise ConfigError("first_dense_layers", f"is {self.first_dense_layers} but the model has only "
                              f"{self.n_layers} layers; use at most n_layers")


__all__ = ["MLAConfig", "ModelConfig"]
