"""RMSNorm as an op family: plain torch everywhere, a fused kernel where a backend has one.

``rms_norm(x, weight, eps) = weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype)``, statistics
in float32 (float64 for float64 input), the normalised value rounded to x's dtype before the
weight, as the Hugging Face Llama/Qwen norms do (converted checkpoints match bit for bit on the
torch path). Run eagerly, the torch formula is a chain of ~6 kernels forward and ~10 backward
over fp32 copies of the activations; a backend registers one read-once kernel per direction
(``register_norm_ops``; the CUDA backend registers Triton kernels for eager mode, and keeps the
formula under torch.compile, where Inductor fuses it with the residual add).
"""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.core.op_registry import OpRegistry


class NormOps:
    """RMSNorm in plain torch (runs everywhere, differentiable through autograd)."""

    name = "torch"

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = x if x.dtype == torch.float64 else x.float()  # float32 statistics at least
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def add_rms_norm(self, x: Tensor, d: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """(s, rms_norm(s)) with s = x + d (s = x when d is None)."""
        s = x if d is None else x + d
        return s, self.rms_norm(s, weight, eps)


TORCH_NORM_OPS = NormOps()
_REGISTRY: OpRegistry[NormOps] = OpRegistry("norm", TORCH_NORM_OPS)


def register_norm_ops(device_type: str, ops: NormOps) -> None:
    """A backend's faster kernels for tensors of ``device_type`` (one registration each)."""
    _REGISTRY.register(device_type, ops)


def norm_ops_for(x: Tensor, fast: bool = True) -> NormOps:
    """The registered kernels for x's device, or the pure-torch ops."""
    return _REGISTRY.for_tensor(x, fast)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim of ``x`` with gain ``weight`` (see the module docstring)."""
    return norm_ops_for(x).rms_norm(x, weight, eps)


def add_rms_norm(x: Tensor, d: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add and the norm after it as one op: ``(s, rms_norm(s, weight, eps))`` with
    ``s = x + d`` (``x`` alone when d is None). Where a backend fuses it, the backward is one
    pass too: the norm's input gradient plus s's gradient from the residual stream."""
    return norm_ops_for(x).add_rms_norm(x, d, weight, eps)


__all__ = ["TORCH_NORM_OPS", "NormOps", "add_rms_norm", "norm_ops_for", "register_norm_ops", "rms_norm"]
