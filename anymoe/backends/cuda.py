"""CUDA backend: NVIDIA GPUs, NCCL collectives, ``torch._grouped_mm`` for the experts.

Grouped matmul: ``torch._grouped_mm`` (torch >= 2.8; the GEMM strides must be multiples of
16 bytes, so D and F are zero-padded when they are not) with int32 offsets from a cumsum on
the device: no host synchronisation. Which dtypes the op accepts depends on the torch
version and the GPU (bf16 on sm90 first, other dtypes and sm80 later), so each dtype is
probed once; a dtype the op refuses goes through the per-expert loop, which reads the
counts on the host (one sync per call) but is correct everywhere.

Compiled blocks (``train.compile``): "blocks" and "blocks_cudagraphs" (mode "reduce-overhead":
each block's graph replayed as a CUDA graph, no launch gaps;
bench/results/gpu_h100/session2/train_throughput_h100_s2.json: 0.081 s per 1.3B MoE step vs
0.123 s eager). Their experts call ``torch._grouped_mm`` directly
in bf16 (``traceable_grouped_mm``), so a block is one graph.

Peak FLOP/s are datasheet dense (no sparsity) numbers per device name, for MFU.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from anymoe.backends import cuda_optim_kernels
from anymoe.core.backend import Availability, Backend, register_backend, use_deterministic_algorithms
from anymoe.core.grouped_mm import (
    GroupedMM,
    grouped_mm_loop,
    grouped_mm_torch,
    match_operand_dtypes,
    torch_grouped_mm_works,
)

# Dense datasheet TFLOP/s: (bf16/fp16 tensor core, fp32 without tensor cores). Matched by
# substring of torch.cuda.get_device_name(), most specific first.
_PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
]


def peak_flops_for(device_name: str, dtype: torch.dtype) -> float:
    """Datasheet peak FLOP/s of a GPU called ``device_name`` for ``dtype``; 0.0 when unknown."""
    for key, half, fp32 in _PEAK_TFLOPS:
        if key in device_name:
            if dtype in (torch.bfloat16, torch.float16):
                return half * 1e12
            if dtype == torch.float32:
                return fp32 * 1e12
            return 0.0
    return 0.0


def cuda_availability(built_with: str | None, device_count: int, torch_version: str) -> Availability:
    """The one-line verdict from what torch reports (pure, so it is tested without a GPU)."""
    if built_with is None:
        return Availability(
            False,
            f"this torch ({torch_version}) is a build without CUDA; install a CUDA build of torch "
            "(https://pytorch.org/get-started/locally/)",
        )
    if device_count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f"CUDA_VISIBLE_DEVICES={visible!r}; " if visible is not None else ""
        return Availability(
            False,
            f"torch {torch_version} (CUDA {built_with}) sees no GPU ({hint}check nvidia-smi and the driver)",
        )
    return Availability(True, f"{device_count} device(s), CUDA {built_with}")


@register_backend("cuda", auto_priority=0)
class CUDABackend(Backend):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"

    def availability(self) -> Availability:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        status = cuda_availability(torch.version.cuda, count, torch.__version__)
        if status.ok:
            return Availability(True, f"{status.reason}, {torch.cuda.get_device_name(0)}")
        return status

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cuda", local_rank)

    def bind(self, local_rank: int) -> None:
        torch.cuda.set_device(local_rank)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # also seeds every CUDA device's generator
        torch.cuda.manual_seed_all(seed)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def memory_stats(self) -> dict[str, float]:
        return {
            "allocated_bytes": float(torch.cuda.memory_allocated()),
            "reserved_bytes": float(torch.cuda.memory_reserved()),
            "peak_allocated_bytes": float(torch.cuda.max_memory_allocated()),
        }

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def peak_flops(self, dtype: torch.dtype) -> float:
        return peak_flops_for(torch.cuda.get_device_name(torch.cuda.current_device()), dtype)

    profiler_activity = torch.profiler.ProfilerActivity.CUDA

    def set_deterministic(self, on: bool) -> None:
        if on:
            # cuBLAS picks reproducible reductions only with a fixed workspace; must be set
            # before the first cuBLAS call of the process to take effect.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would differ from CPU fp32
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = False  # autotuning may pick different kernels per run
        torch.backends.cudnn.deterministic = on
        # Strict: with warn_only, attention's backward (cuDNN or flash) stays non-deterministic and two
        # bf16 runs of one config drift apart (bench/results/gpu_h100/session7/sdpa_determinism_h100.json).
        use_deterministic_algorithms(on, strict=True)

    def autocast_dtype(self) -> torch.dtype | None:
        # fp16 would need loss scaling, which the trainers do not do: pre-Ampere GPUs run fp32.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None

    def grouped_mm(self, x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
        x_TD, w_EDF = match_operand_dtypes(x_TD, w_EDF)
        if x_TD.shape[0] > 0 and torch_grouped_mm_works(x_TD.device, x_TD.dtype):
            return grouped_mm_torch(x_TD, w_EDF, counts_E)
        return grouped_mm_loop(x_TD, w_EDF, counts_E)

    def compile_modes(self) -> tuple[str, ...]:
        return ("none", "blocks", "blocks_cudagraphs")

    def preferred_compile_modes(self) -> tuple[str, ...]:
        # H100, 1.3B MoE step: 0.123 s eager, 0.081 s with CUDA graphs
        # (bench/results/gpu_h100/session2/train_throughput_h100_s2.json).
        return ("blocks_cudagraphs", "blocks", "none")

    def traceable_grouped_mm(self) -> GroupedMM:
        return self._grouped_mm_traceable

    def _grouped_mm_traceable(self, x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
        """Under torch.compile, bf16: ``torch._grouped_mm`` traced whole (no dtype probe: it runs
        a backward, which a tracer cannot; 16-byte strides go straight to grouped_mm_direct, others
        through the padding path). Eager calls and other dtypes keep ``grouped_mm`` (fp32 under
        compile: the per-expert loop, a graph break; the op's shape rule takes bf16 only)."""
        x_TD, w_EDF = match_operand_dtypes(x_TD, w_EDF)
        if not torch.compiler.is_compiling() or x_TD.dtype != torch.bfloat16 or x_TD.shape[0] == 0:
            return self.grouped_mm(x_TD, w_EDF, counts_E)
        if x_TD.shape[1] % 8 == 0 and w_EDF.shape[2] % 8 == 0:  # bf16: 16-byte row strides
            return cuda_kernels.grouped_mm_direct(x_TD, w_EDF, counts_E)
        return grouped_mm_torch(x_TD, w_EDF, counts_E)

    def device_count(self) -> int:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def adamw_class(self, master_weights: bool = False) -> type[torch.optim.AdamW] | None:
        # One Triton launch over every chunk of every tensor (anymoe/backends/cuda_optim_kernels.py);
        # H100, moe-1b: 6.68 ms vs 8.03 ms for torch's fused AdamW
        # (bench/results/gpu_h100/session4/optimizer_h100_s4_final.json). Its master weights run
        # through torch's AdamW where Triton is missing.
        if master_weights or cuda_optim_kernels.HAVE_TRITON:
            return cuda_optim_kernels.TritonAdamW
        return None


# Triton kernels of the fast MoE dispatch path register themselves for "cuda" on import
# (gpu-perf, anymoe/backends/cuda_kernels.py; a no-op where Triton is missing).
from anymoe.backends import (  # noqa: E402, F401  (+ CE, RMSNorm, qk-norm + RoPE, router GEMM, attention)
    cuda_attention,
    cuda_kernels,
    cuda_loss_kernels,
    cuda_norm_kernels,
    cuda_qk_rope_kernels,
    cuda_router,
)
