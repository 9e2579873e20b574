"""RMSNorm on Ascend NPUs through torch_npu's fused operators (the formula: anymoe/core/norm.py).

``torch_npu.npu_rms_norm(x, gamma, epsilon) -> (y, rstd)`` (CANN's RmsNorm operator; rstd is
the rows' 1/rms in fp32, keeping a size-1 last dim) and
``torch_npu.npu_rms_norm_backward(dy, x, gamma, rstd) -> (dx, dgamma)`` (RmsNormGrad), wired
by an autograd.Function, as MindSpeed-style Ascend trainers use them. The operators take fp16,
bf16 or fp32 with gamma in x's dtype and 2-8 dimensions; anything else runs the torch formula,
and so does a ``torch.compile`` trace (the graph keeps the formula for the NPU compiler).
``add_rms_norm`` is torch's add followed by this norm.

Numerics: the operator computes x * rstd * gamma in fp32 and rounds once; the torch formula
rounds x * rstd to x's dtype before the gain (the Hugging Face order), so in bf16 / fp16 the
two differ by about one rounding of the output; fp32 agrees to fp32 accuracy.

The operators are passed in (``kernels``): the CPU tests run the autograd wiring and the
dispatch rules with implementations of the documented contract; on an NPU they are
torch_npu's. Importing this module registers the ops for device type "npu" (no NPU tensor
exists without torch_npu, which is imported only at the first call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from anymoe.core.norm import TORCH_NORM_OPS, NormOps, register_norm_ops

NormKernels = tuple[Callable[..., tuple[Tensor, Tensor]], Callable[..., tuple[Tensor, Tensor]]]
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def torch_npu_kernels() -> NormKernels:
    from anymoe.backends.npu import load_torch_npu  # the one guarded import of torch_npu

    module = load_torch_npu()[0]
    return module.npu_rms_norm, module.npu_rms_norm_backward


class _NPURMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, kernels):
        fwd, bwd = kernels
        y, rstd = fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.bwd = bwd
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = ctx.bwd(dy.contiguous(), x, weight, rstd)
        return dx, dw.reshape(weight.shape).to(weight.dtype), None, None  # dgamma may come in fp32


class NPUNormOps(NormOps):
    """RMSNorm by torch_npu's RmsNorm / RmsNormGrad operators where they apply."""

    name = "npu"
    kernel_device_type = "npu"  # the CPU tests set "cpu"

    def __init__(self, kernels: Callable[[], NormKernels] = torch_npu_kernels) -> None:
        self._kernels = kernels

    def kernel_takes(self, x: Tensor, weight: Tensor) -> bool:
        return (x.device.type == self.kernel_device_type and x.dtype in _DTYPES and weight.dtype == x.dtype
                and 2 <= x.dim() <= 8 and weight.dim() == 1 and x.shape[-1] == weight.shape[0])

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        if torch.compiler.is_compiling() or not self.kernel_takes(x, weight):
            return TORCH_NORM_OPS.rms_norm(x, weight, eps)
        return _NPURMSNorm.apply(x.contiguous(), weight, float(eps), self._kernels())


NPU_NORM_OPS = NPUNormOps()
register_norm_ops("npu", NPU_NORM_OPS)
