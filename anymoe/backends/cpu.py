"""CPU backend: gloo collectives, the grouped matmul measured fastest here, optional IPEX.

Grouped matmul: bench/cpu_grouped_mm.py times the per-expert loop, a padded bmm and
``torch._grouped_mm`` (forward + backward, skewed routing). On torch 2.13 the torch op wins
5 of 6 shapes in bench/results/cpu_grouped_mm.json (10x with 64 small experts; the loop is
~20% ahead only for a few large experts), so it is used for every dtype it supports (probed
once per dtype); the loop serves the rest (float64, zero rows, a torch without the op).

Mixed precision and compilation follow bench/cpu_accel.py (bench/results/cpu_accel.json, one
training step, tiny 8x128 and a 2-layer small 4x256, on an AVX2 CPU without AVX-512-BF16/AMX):
bf16 autocast is 4.3x (tiny) and 15x (small) slower than fp32, so ``autocast_dtype`` is None;
regional torch.compile runs the tiny step 1.3x faster but needs ~75 s to compile (it pays back
after ~3,800 steps) and does not speed up the small one, so the CPU path stays eager by default
(``train.compile: blocks`` is allowed; its experts run the loop as one opaque graph node,
anymoe/backends/grouped_mm_op.py). CPUs with bf16 matrix units (AMX) may differ: rerun the bench there.

IPEX (intel_extension_for_pytorch) is imported only when its version matches torch's
major.minor (its wheels refuse any other torch, and its last release, 2.8, needs torch 2.8);
``optimize(model, optimizer)`` then hands both to ``ipex.optimize``.
"""

from __future__ import annotations

import importlib
import importlib.util
import resource
import sys
from functools import cache

import torch
from torch import Tensor

from anymoe.backends.grouped_mm_op import grouped_mm_opaque
from anymoe.backends.versions import installed_version, major_minor
from anymoe.core.backend import Availability, Backend, register_backend
from anymoe.core.grouped_mm import (
    GroupedMM,
    grouped_mm_loop,
    grouped_mm_torch,
    match_operand_dtypes,
    torch_grouped_mm_works,
)
from anymoe.core.losses import LossOps, register_loss_ops

IPEX_MODULE = "intel_extension_for_pytorch"
IPEX_DIST = "intel-extension-for-pytorch"


def ipex_status(ipex_version: str | None, torch_version: str) -> Availability:
    """Whether an installed IPEX can be used beside this torch (pure: versions in, verdict out)."""
    if ipex_version is None:
        return Availability(False, f"not installed (optional: pip install '{IPEX_DIST}' matching torch)")
    if major_minor(ipex_version) != major_minor(torch_version):
        return Availability(
            False,
            f"{IPEX_DIST} {ipex_version} needs torch {'.'.join(map(str, major_minor(ipex_version)))}.*, "
            f"this is torch {torch_version}; not used (pip uninstall {IPEX_DIST}, or install the "
            "matching torch)",
        )
    return Availability(True, f"{IPEX_DIST} {ipex_version}")


@cache
def load_ipex() -> tuple[object | None, Availability]:
    """Import IPEX if it is installed and matches torch; never raises."""
    status = ipex_status(installed_version(IPEX_DIST), torch.__version__)
    if not status.ok or importlib.util.find_spec(IPEX_MODULE) is None:
        return None, status
    try:
        return importlib.import_module(IPEX_MODULE), status
    except Exception as err:  # a broken extension must not break the CPU backend
        return None, Availability(False, f"{IPEX_DIST} is installed but failed to import: {err}")


@register_backend("cpu", auto_priority=100)
class CPUBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    def availability(self) -> Availability:
        return Availability(True, f"{torch.get_num_threads()} threads")

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def grouped_mm(self, x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
        x_TD, w_EDF = match_operand_dtypes(x_TD, w_EDF)
        if x_TD.shape[0] > 0 and torch_grouped_mm_works(x_TD.device, x_TD.dtype):
            return grouped_mm_torch(x_TD, w_EDF, counts_E)
        return grouped_mm_loop(x_TD, w_EDF, counts_E)

    def traceable_grouped_mm(self) -> GroupedMM:
        return self._grouped_mm_traceable

    def _grouped_mm_traceable(self, x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
        """Under torch.compile the loop as one custom op (the host read of the counts would
        break the graph); eager calls keep ``grouped_mm``."""
        if torch.compiler.is_compiling():
            return grouped_mm_opaque(x_TD, w_EDF, counts_E)
        return self.grouped_mm(x_TD, w_EDF, counts_E)

    def memory_stats(self) -> dict[str, float]:
        # ru_maxrss is KiB on Linux, bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        return {"peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)}

    def adamw_class(self, master_weights: bool = False) -> type[torch.optim.AdamW] | None:
        from anymoe.backends.cuda_optim_kernels import torch_path_adamw

        return torch_path_adamw(master_weights)

    def autocast_dtype(self) -> torch.dtype | None:
        return None  # measured: bf16 autocast is slower here (module docstring, cpu_accel.json)

    def optimize(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """``ipex.optimize`` when IPEX is usable here, else both returned unchanged.

        In place: trainers hand the model to other holders (rollout actor, distiller) before this,
        and a copy would leave them on the unoptimised one."""
        ipex, _ = load_ipex()
        if ipex is None:
            return model, optimizer
        if optimizer is None:
            return ipex.optimize(model, inplace=True), None
        return ipex.optimize(model, optimizer=optimizer, inplace=True)

    def extensions(self) -> dict[str, str]:
        _, status = load_ipex()
        return {"ipex": ("used: " if status.ok else "unused: ") + status.reason}


# The fused cross-entropy's torch passes in cache-sized chunks: with 1 MiB of fp32 per chunk,
# fwd+bwd at 2048 x 32000 fp32 took 288 ms (median) against 446 ms with the 64 MiB default and
# 401 ms for F.cross_entropy, one thread on the 2-core host (bench/results/cross_entropy_cpu.json).
register_loss_ops("cpu", LossOps(chunk_bytes=1 << 20, name="torch-cpu"))
