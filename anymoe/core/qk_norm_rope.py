"""Attention's query/key post-processing as an op family: per-head RMSNorm, then RoPE.

``y = rope(rms_norm(x, weight, eps))`` over each head of ``x_BSHD`` (Qwen3 / OLMo-2 qk-norm, then
the rotary embedding in the Hugging Face "rotate half" layout; ``weight=None``: RoPE alone).
Why a family: on an H100 step of moe-1b (B=8, S=2048, 16 query / 4 key heads, Dh=64) under
torch.compile, Inductor's kernels for these two steps, forward and backward, transpose on the
way and take ~3-4 ms per step (RoPE's backward fused with the q/k/v gradient concatenation
alone: 1.9 ms), where reading and writing q and k once per direction takes well under 1 ms.
A backend registers one read-once kernel per direction (``register_qk_norm_rope_ops``), opaque
to the compiler; the torch formula below is the reference and runs everywhere else.

Legend: B batch, S sequence, H heads (query or key/value), D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.core.norm import rms_norm
from anymoe.core.op_registry import OpRegistry


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_rotate_half(x: Tensor, cos: Tensor, sin: Tensor, head_axis: int) -> Tensor:
    """RoPE (Su et al. 2021) on the pairs (i, i + D/2) of x's last dim, the Hugging Face layout:
    ``x * cos + rotate_half(x) * sin``, rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]).

    cos and sin ([B, S, D]) are broadcast over x's heads, which sit at ``head_axis`` (2 for
    [B, S, H, D], 1 for [B, H, S, D])."""
    cos, sin = cos.unsqueeze(head_axis), sin.unsqueeze(head_axis)
    return x * cos + _rotate_half(x) * sin


def qkv_heads(qkv_BSHD: Tensor, n_q: int, n_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Views of a fused projection's query, key and value heads (the first n_q, the next n_k,
    the rest)."""
    return qkv_BSHD.split([n_q, n_k, qkv_BSHD.shape[2] - n_q - n_k], dim=2)


class QKNormRopeOps:
    """Per-head RMSNorm then RoPE in plain torch (runs everywhere, differentiable by autograd)."""

    name = "torch"

    def qk_norm_rope(self, x_BSHD: Tensor, weight_D: Tensor | None, eps: float, cos_BSD: Tensor,
                     sin_BSD: Tensor) -> Tensor:
        n_BSHD = x_BSHD if weight_D is None else rms_norm(x_BSHD, weight_D, eps)
        return rope_rotate_half(n_BSHD, cos_BSD, sin_BSD, head_axis=2)

    def qkv_norm_rope(self, qkv_BSHD: Tensor, n_q: int, n_k: int, q_weight: Tensor | None,
                      k_weight: Tensor | None, eps: float, cos_BSD: Tensor,
                      sin_BSD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(q, k, v) from the heads of one fused projection: the first n_q heads through
        ``qk_norm_rope`` with q_weight, the next n_k with k_weight, the rest (v) as they are."""
        q, k, v = qkv_heads(qkv_BSHD, n_q, n_k)
        return (self.qk_norm_rope(q, q_weight, eps, cos_BSD, sin_BSD),
                self.qk_norm_rope(k, k_weight, eps, cos_BSD, sin_BSD), v)


TORCH_QK_NORM_ROPE_OPS = QKNormRopeOps()
_REGISTRY: OpRegistry[QKNormRopeOps] = OpRegistry("qk_norm_rope", TORCH_QK_NORM_ROPE_OPS)


def register_qk_norm_rope_ops(device_type: str, ops: QKNormRopeOps) -> None:
    """A backend's faster kernels for tensors of ``device_type`` (one registration each)."""
    _REGISTRY.register(device_type, ops)


def qk_norm_rope_ops_for(x: Tensor, fast: bool = True) -> QKNormRopeOps:
    """The registered kernels for x's device, or the pure-torch ops."""
    return _REGISTRY.for_tensor(x, fast)


def qk_norm_rope(x_BSHD: Tensor, weight_D: Tensor | None, eps: float, cos_BSD: Tensor,
                 sin_BSD: Tensor) -> Tensor:
    """RMSNorm over each head of ``x_BSHD`` with gain ``weight_D`` (skipped when None), then RoPE
    with ``cos_BSD`` / ``sin_BSD`` (see the module docstring); [B, S, H, D] out."""
    return qk_norm_rope_ops_for(x_BSHD).qk_norm_rope(x_BSHD, weight_D, eps, cos_BSD, sin_BSD)


def qkv_norm_rope(qkv_BSHD: Tensor, n_q: int, n_k: int, q_weight: Tensor | None, k_weight: Tensor | None,
                  eps: float, cos_BSD: Tensor, sin_BSD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``qk_norm_rope`` over the query and key heads of one fused q/k/v projection
    [B, S, n_q + 2 n_k, D], and its value heads: (q, k, v), each [B, S, heads, D]. One op, so a
    backend's backward can write the projection's gradient whole: on CUDA it writes the q and
    k gradients into their slices and copies v's, where separate ops left a concatenation."""
    return qk_norm_rope_ops_for(qkv_BSHD).qkv_norm_rope(qkv_BSHD, n_q, n_k, q_weight, k_weight, eps,
                                                        cos_BSD, sin_BSD)


__all__ = ["TORCH_QK_NORM_ROPE_OPS", "QKNormRopeOps", "qk_norm_rope", "qk_norm_rope_ops_for",
           "qkv_heads", "qkv_norm_rope", "register_qk_norm_rope_ops", "rope_rotate_half"]
