"""Router logits on CUDA: a bf16/fp16 GEMM that writes float32 (see anymoe/core/router_gemm.py).

``torch.mm(a, b, out_dtype=torch.float32)`` (cuBLAS, torch >= 2.8) multiplies half-precision
inputs with float32 accumulation and returns the float32 sums without the round to half. The
forward therefore equals the formula's float32 GEMM on upcast copies, reading half the bytes
and keeping no float32 copy of x for the backward. The backward rounds the logits' gradient
to the activations' dtype and runs two half-precision GEMMs (float32 accumulation), as every
other bf16 layer's backward does. Importing this module registers the ops for "cuda".

Legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.backends.versions import major_minor
from anymoe.core.router_gemm import TORCH_ROUTER_GEMM_OPS, RouterGemmOps, register_router_gemm_ops

_HALF = (torch.bfloat16, torch.float16)


def mm_fp32_out(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with float32 output from half-precision inputs."""
    return torch.mm(a, b, out_dtype=torch.float32)


class _HalfInFloatOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: Tensor, w_ED: Tensor) -> Tensor:
        ctx.save_for_backward(x_TD, w_ED)
        return mm_fp32_out(x_TD, w_ED.t())

    @staticmethod
    def backward(ctx, g_TE: Tensor):
        x_TD, w_ED = ctx.saved_tensors
        g = g_TE.to(x_TD.dtype)
        dx = torch.mm(g, w_ED) if ctx.needs_input_grad[0] else None
        dw = torch.mm(g.t(), x_TD) if ctx.needs_input_grad[1] else None
        return dx, dw


def _supported() -> bool:
    return major_minor(torch.__version__) >= (2, 8)


class CudaRouterGemmOps(RouterGemmOps):
    """Half-precision inputs of one dtype: the float32-output GEMM; anything else: the formula."""

    name = "cuda_half_fp32_out"

    def __init__(self, supported: bool) -> None:
        self.supported = supported

    def logits(self, x_TD: Tensor, w_ED: Tensor) -> Tensor:
        if not (self.supported and x_TD.dtype in _HALF and w_ED.dtype == x_TD.dtype and x_TD.is_cuda
                and not torch.is_autocast_enabled(x_TD.device.type)):
            return TORCH_ROUTER_GEMM_OPS.logits(x_TD, w_ED)
        lead = x_TD.shape[:-1]
        out = _HalfInFloatOut.apply(x_TD.reshape(-1, x_TD.shape[-1]), w_ED)
        return out.view(*lead, w_ED.shape[0])


CUDA_ROUTER_GEMM_OPS = CudaRouterGemmOps(_supported())
register_router_gemm_ops("cuda", CUDA_ROUTER_GEMM_OPS)
