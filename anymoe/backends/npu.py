"""Ascend NPU backend: torch_npu, HCCL collectives, ``npu_grouped_matmul``, pow2 expert sizing.

torch_npu is imported here and nowhere else, once, inside a guard: anymoe/__init__.py has
already set TORCH_DEVICE_BACKEND_AUTOLOAD=0, so an installed-but-broken torch_npu cannot
break ``import torch``; its failure becomes one line naming the fix. Three cases are told
apart (each message is what a user needs to do next):

- the package is missing -> install ``anymoe[npu]`` with the torch_npu matching torch;
- it is installed but the CANN runtime is not (``ImportError: libhccl.so: cannot open
  shared object file``, observed with torch-npu 2.13.0 on a machine without Ascend) ->
  source CANN's set_env.sh, or uninstall torch-npu on a machine without NPUs;
- it imports but no device is visible -> npu-smi / ASCEND_RT_VISIBLE_DEVICES.

Grouped matmul through ``torch_npu.npu_grouped_matmul`` (torch_npu >= 2.1 signature: lists
of tensors, ``group_list`` as an int64 device tensor of cumulative row counts with
``group_list_type=0``, ``split_item=3`` = single x and single y tensor, ``group_type=0``
= groups along the rows M; ``group_type=2`` groups along K, which is the weight gradient
x^T dy). The op has no autograd formula in Python, so :class:`NPUGroupedMM` supplies it.
The pure parts (group list, error classification, version check) are plain functions
tested on the CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from anymoe.backends.versions import installed_version, major_minor
from anymoe.core.backend import (
    Availability,
    Backend,
    BackendUnavailable,
    register_backend,
    use_deterministic_algorithms,
)
from anymoe.core.grouped_mm import check_grouped_mm_args, grouped_mm_loop, match_operand_dtypes
from anymoe.core.sizing import POW2, ExpertSizingPolicy

NPU_MODULE = "torch_npu"
NPU_DIST = "torch-npu"
CANN_ENV = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"
MAX_GROUPS = 128  # npu_grouped_matmul's documented limit on the number of groups (list length)
_SHARED_LIB = re.compile(r"(lib[\w.+-]+\.so[\w.]*)")


def version_mismatch(npu_version: str, torch_version: str) -> str | None:
    """torch_npu X.Y.* is built for torch X.Y.* only; the reason when they differ, else None."""
    if major_minor(npu_version) == major_minor(torch_version):
        return None
    need = ".".join(map(str, major_minor(npu_version)))
    return (
        f"torch_npu {npu_version} is built for torch {need}.*, but torch {torch_version} is installed; "
        f"pip install 'torch-npu=={'.'.join(map(str, major_minor(torch_version)))}.*' (or torch=={need}.*)"
    )


def classify_import_error(err: BaseException, npu_version: str | None) -> str:
    """One line saying why ``import torch_npu`` failed and what fixes it."""
    text = str(err)
    installed = f"torch_npu {npu_version}" if npu_version else "torch_npu"
    if isinstance(err, ModuleNotFoundError) and NPU_MODULE in text:
        return package_missing_reason()
    lib = _SHARED_LIB.search(text)
    if lib and ("cannot open shared object" in text or "No such file" in text):
        return (
            f"{installed} is installed but the Ascend CANN runtime is missing ({lib.group(1)} cannot be "
            f"loaded): install CANN and `{CANN_ENV}`, or `pip uninstall torch-npu` on a machine without NPUs"
        )
    return f"{installed} is installed but failed to import ({type(err).__name__}: {text.splitlines()[0]})"


def package_missing_reason() -> str:
    return (
        f"the torch_npu package is not installed: pip install 'anymoe[npu]' (torch-npu matching torch "
        f"{'.'.join(map(str, major_minor(torch.__version__)))}) on a machine with the Ascend CANN runtime"
    )


def no_device_reason(npu_version: str) -> str:
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    hint = f"ASCEND_RT_VISIBLE_DEVICES={visible!r}; " if visible is not None else ""
    return (
        f"torch_npu {npu_version} and CANN load, but no Ascend device is visible ({hint}check `npu-smi info`)"
    )


@cache
def load_torch_npu() -> tuple[ModuleType | None, Availability]:
    """Import torch_npu once, never raising: (module or None, availability)."""
    version = installed_version(NPU_DIST)
    if version is None or importlib.util.find_spec(NPU_MODULE) is None:
        return None, Availability(False, package_missing_reason())
    mismatch = version_mismatch(version, torch.__version__)
    if mismatch:  # importing a mismatched build can abort the process, so do not try
        return None, Availability(False, mismatch)
    try:
        module = importlib.import_module(NPU_MODULE)
    except Exception as err:  # ImportError for a missing CANN library, anything else for a broken build
        return None, Availability(False, classify_import_error(err, version))
    try:
        present = module.npu.is_available() and module.npu.device_count() > 0
    except Exception as err:  # driver present but unusable
        return module, Availability(False, f"{no_device_reason(version)}: {type(err).__name__}: {err}")
    if not present:
        return module, Availability(False, no_device_reason(version))
    return module, Availability(True, f"{module.npu.device_count()} device(s), torch_npu {version}")


def group_list_from_counts(counts_E: Tensor) -> Tensor:
    """Cumulative row counts as int64 on the counts' device (``group_list_type=0``; no host sync).

    counts [2, 0, 3] -> group_list [2, 2, 5]: rows 0-1 expert 0, none expert 1, rows 2-4 expert 2.
    Cumulative (not per-group counts, type 1) because type 1 refuses a list of length 1.
    """
    return torch.cumsum(counts_E, 0).to(torch.int64)


Kernel = Callable[..., list[Tensor]]


def _kernel() -> Kernel:
    return load_torch_npu()[0].npu_grouped_matmul


def _gmm(kernel: Kernel, a: Tensor, b: Tensor, group_list: Tensor, group_type: int) -> Tensor:
    """One ``npu_grouped_matmul`` call: single a, single b, single output (split_item=3)."""
    return kernel([a], [b], group_list=group_list, split_item=3, group_type=group_type, group_list_type=0)[0]


class NPUGroupedMM(torch.autograd.Function):
    """y = x_e @ w_e per row group; dx = dy_e @ w_e^T (rows grouped); dw_e = x_e^T @ dy_e (K grouped).

    ``kernel`` is ``torch_npu.npu_grouped_matmul``; tests pass a CPU implementation of its
    documented contract to check these gradient formulas where no NPU exists.
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, w_EDF: Tensor, group_list: Tensor, kernel: Kernel):
        ctx.save_for_backward(x_TD, w_EDF, group_list)
        ctx.kernel = kernel
        return _gmm(kernel, x_TD, w_EDF, group_list, group_type=0)

    @staticmethod
    def backward(ctx, dy_TF: Tensor):
        x_TD, w_EDF, group_list = ctx.saved_tensors
        dy_TF = dy_TF.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            w_EFD = w_EDF.transpose(1, 2).contiguous()
            dx = _gmm(ctx.kernel, dy_TF, w_EFD, group_list, group_type=0)
        if ctx.needs_input_grad[1]:
            x_DT = x_TD.t().contiguous()
            dw = _gmm(ctx.kernel, x_DT, dy_TF, group_list, group_type=2)  # [E, D, F]
        return dx, dw, None, None


@register_backend("npu", auto_priority=10)
class NPUBackend(Backend):
    name = "npu"
    device_type = "npu"
    dist_backend = "hccl"

    def availability(self) -> Availability:
        return load_torch_npu()[1]

    def default_sizing(self) -> ExpertSizingPolicy:
        return POW2  # Ascend cube units want 2^n expert dims (Pangu Ultra sizes experts so)

    def _npu(self) -> ModuleType:
        module, status = load_torch_npu()
        if module is None:
            raise BackendUnavailable(f"backend 'npu' is not usable here: {status.reason}")
        return module

    def device(self, local_rank: int = 0) -> torch.device:
        self._npu()
        return torch.device("npu", local_rank)

    def bind(self, local_rank: int) -> None:
        self._npu().npu.set_device(local_rank)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        self._npu().npu.manual_seed_all(seed)

    def synchronize(self) -> None:
        self._npu().npu.synchronize()

    def profiler(self, *, wait: int, warmup: int, active: int, out_dir: Path,
                 on_ready: Callable[[Any], None], record_shapes: bool = False,
                 profile_memory: bool = False, with_stack: bool = False) -> Any:
        """torch_npu's profiler (torch's kineto does not see NPU kernels). Its results can only be
        written by its own handler, into ``out_dir`` in the layout MindStudio Insight and
        ``torch_npu.profiler.profiler.analyse`` read, so ``on_ready`` (the torch summary) is not called."""
        prof = self._npu().profiler
        return prof.profile(
            activities=[prof.ProfilerActivity.CPU, prof.ProfilerActivity.NPU],
            schedule=prof.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=prof.tensorboard_trace_handler(str(out_dir)), record_shapes=record_shapes,
            profile_memory=profile_memory, with_stack=with_stack)

    def memory_stats(self) -> dict[str, float]:
        npu = self._npu().npu
        return {
            "allocated_bytes": float(npu.memory_allocated()),
            "reserved_bytes": float(npu.memory_reserved()),
            "peak_allocated_bytes": float(npu.max_memory_allocated()),
        }

    def reset_peak_memory(self) -> None:
        self._npu().npu.reset_peak_memory_stats()

    def set_deterministic(self, on: bool) -> None:
        # HCCL reduces in a fixed order only when asked; read when the communicator is built.
        os.environ["HCCL_DETERMINISTIC"] = "true" if on else "false"
        use_deterministic_algorithms(on)

    def adamw_class(self, master_weights: bool = False) -> type[torch.optim.AdamW] | None:
        from anymoe.backends.cuda_optim_kernels import torch_path_adamw

        return torch_path_adamw(master_weights)

    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16

    def grouped_mm(self, x_TD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
        check_grouped_mm_args(x_TD, w_EDF, counts_E)
        x_TD, w_EDF = match_operand_dtypes(x_TD, w_EDF)
        if x_TD.shape[0] == 0 or w_EDF.shape[0] > MAX_GROUPS or x_TD.dtype == torch.float64:
            return grouped_mm_loop(x_TD, w_EDF, counts_E)  # shapes/dtypes the kernel does not take
        group_list = group_list_from_counts(counts_E)
        return NPUGroupedMM.apply(x_TD.contiguous(), w_EDF.contiguous(), group_list, _kernel())

    def compile_modes(self) -> tuple[str, ...]:
        """Eager only. torch.compile on Ascend goes through torch_npu's own Inductor backend
        (torch_npu >= 2.6, ``torch_npu._inductor``: Triton-Ascend codegen, beta, reported to fail
        on dynamic-shape graphs) or TorchAir's graph mode (its capture-and-replay mode is for
        inference). Neither has run with anymoe on an NPU, and ``NPUGroupedMM`` carries the
        kernel as a Python object the tracer would have to take; "blocks" comes here once the
        compile tests pass on Ascend hardware."""
        return ("none",)

    def device_count(self) -> int:
        module, _ = load_torch_npu()
        return int(module.npu.device_count()) if module is not None else 0


# torch_npu's RmsNorm / RmsNormGrad operators register for "npu" on import (anymoe/backends/npu_norm.py).
from anymoe.backends import npu_norm  # noqa: E402, F401
