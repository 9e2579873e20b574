"""Router logits as an op family: ``x @ W.T`` in float32 whatever the activations' dtype.

Top-k choices need float32 logits (bf16 logits tie and flip selections). The torch formula
upcasts x and W and multiplies in float32 (TF32 where allowed): on bf16 activations that writes,
reads and keeps for the backward a float32 copy of x in every MoE layer. A backend with a
half-precision GEMM that writes float32 registers it (``register_router_gemm_ops``; the CUDA
backend: cuBLAS through ``torch.mm(..., out_dtype=torch.float32)``): products of bf16 values are
exact in float32 and the sum is accumulated in float32, so the forward gives the same logits
reading half the bytes; the backward runs in the activations' dtype with float32 accumulation,
like every other bf16 layer. float32 and float64 inputs always take the formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from anymoe.core.op_registry import OpRegistry


def logits_dtype(x: Tensor) -> torch.dtype:
    """float32 at least; float64 inputs stay float64 (reference tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear_upcast(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` in the logits dtype with autocast off (under bf16 autocast F.linear would run in bf16)."""
    dt = logits_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.to(dt), w.to(dt))


class RouterGemmOps:
    """The formula: upcast, then multiply (runs everywhere, differentiable through autograd)."""

    name = "torch"

    def logits(self, x_TD: Tensor, w_ED: Tensor) -> Tensor:
        return linear_upcast(x_TD, w_ED)


TORCH_ROUTER_GEMM_OPS = RouterGemmOps()
_REGISTRY: OpRegistry[RouterGemmOps] = OpRegistry("router_gemm", TORCH_ROUTER_GEMM_OPS)


def register_router_gemm_ops(device_type: str, ops: RouterGemmOps) -> None:
    """A backend's faster GEMM for tensors of ``device_type`` (one registration each)."""
    _REGISTRY.register(device_type, ops)


def router_gemm_ops_for(x: Tensor, fast: bool = True) -> RouterGemmOps:
    return _REGISTRY.for_tensor(x, fast)


def router_logits(x_TD: Tensor, w_ED: Tensor) -> Tensor:
    """Router logits [.., E] in float32 (float64 for float64 input) from x [.., D] and W [E, D]."""
    return router_gemm_ops_for(x_TD).logits(x_TD, w_ED)


__all__ = ["TORCH_ROUTER_GEMM_OPS", "RouterGemmOps", "linear_upcast", "logits_dtype",
           "register_router_gemm_ops", "router_gemm_ops_for", "router_logits"]
