"""AdamW in one Triton launch per bucket of tensors: ``TritonAdamW``, the CUDA backend's AdamW.

torch's fused AdamW walks the tensors in fixed-size pieces of a multi-tensor list; here one
grid covers every chunk of BLOCK elements of every tensor in a bucket (a "chunk table" says
which tensor and offset each program owns) and each program finds its tensors' addresses in
int64 pointer tables. A full chunk loads and stores unmasked with 16-byte-aligned bases
(``tl.multiple_of``), so the loads are vectorised; only a tensor's last chunk is masked.
On an H100 over moe-1b's 111 bf16 parameters (1.306B elements): 6.68 ms against 8.03 ms for
``torch.optim.AdamW(fused=True)`` (bench/optimizer.py, bench/results/gpu_h100/session4/); without
the hints and the unmasked branch a prototype took 22 ms, and one launch per tensor cost 3.4 ms
of host time.

Math in fp32 whatever the storage dtypes (bf16, fp16, fp32; one rounding per stored value, like
torch's fused kernel), in torch AdamW's order: p *= 1 - lr*wd, m = lerp(m, g, 1 - beta1),
v = beta2*v + (1 - beta2)*g^2, p -= lr/(1 - beta1^t) * m / (sqrt(v)/sqrt(1 - beta2^t) + eps);
1 - beta comes from the host in double (torch's CUDA kernel forms it in float32, 1.3e-5 off
for beta = 0.999).

``TritonAdamW`` keeps torch.optim.AdamW's state exactly (``step`` a float32 scalar on the CPU as
in torch's non-fused AdamW, ``exp_avg`` and ``exp_avg_sq`` like the parameter), so checkpoints
move between the two. What the kernel does not take goes through torch's own code: whole
groups with an option it lacks (amsgrad, maximize, capturable, differentiable, tensor
hyper-parameters) run exactly as torch.optim.AdamW would; single tensors it cannot address
(not on the GPU, a tensor subclass such as FSDP2's DTensor, non-contiguous, not 16-byte
aligned, another dtype) run through torch's fused kernel where it takes them (torch's default
implementation otherwise), unless the group says ``fused=False`` or names ``foreach``.

Legend: C chunks, T tensors of a bucket.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.optim.adamw import adamw as torch_adamw
from torch.optim.optimizer import _use_grad_for_differentiable

try:  # Triton ships with CUDA builds of torch; CPU builds and other devices lack it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

BLOCK = 2048  # elements per program: the prototype's best on the H100 (4 warps)
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_EXACT_SCALE = (torch.float32, torch.float64)  # gradients torch scales by a float exactly as by a tensor
_ALIGN = 16  # bytes: the tl.multiple_of promise on every base pointer
_PLAIN = (Tensor, torch.nn.Parameter)  # exact types: tensor subclasses (DTensor) go to torch


if HAVE_TRITON:
    _TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

    @triton.jit
    def _adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, q_ptr, idx, mask, decay, step_size, one_minus_b1, beta2,
                      one_minus_b2, eps, bc2_sqrt, grad_coef, HAS_Q: tl.constexpr):
        p = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask).to(tl.float32) * grad_coef  # clipping, in this pass
        m = tl.load(m_ptr + idx, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + idx, mask=mask).to(tl.float32)
        p = p * decay  # decoupled weight decay, before the Adam step (torch AdamW's order)
        # 1 - beta comes from the host in double: in float32, 1 - fp32(0.999) is 1.3e-5 off.
        # Triton's sqrt and / (a few float32 ulps) only touch the update term, a small fraction
        # of p; the IEEE sqrt_rn / div_rn cost 10 % of the kernel's time on the H100 (6.7 -> 7.4 ms).
        m = m + one_minus_b1 * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
        v = beta2 * v + one_minus_b2 * g * g
        p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(p_ptr + idx, p.to(p_ptr.dtype.element_ty), mask=mask)
        if HAS_Q:  # master weights: p is the fp32 master, q the model's low-precision copy
            tl.store(q_ptr + idx, p.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + idx, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + idx, v.to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _adamw_kernel(P, G, M, V, Q, TENSOR, START, NUMEL, decay, step_size, one_minus_b1, beta2,
                      one_minus_b2, eps, bc2_sqrt, grad_coef,
                      P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                      Q_DTYPE: tl.constexpr, HAS_Q: tl.constexpr, COEF_ON_DEVICE: tl.constexpr,
                      BLOCK: tl.constexpr):
        if COEF_ON_DEVICE:  # grad_coef points to a float64 scalar; non-finite: a bad step, write nothing
            grad_coef = tl.load(grad_coef).to(tl.float32)  # rounded as a host float argument is
            if not (tl.abs(grad_coef) < float("inf")):  # NaN or +-inf
                return
        c = tl.program_id(0)
        t = tl.load(TENSOR + c)
        start = tl.multiple_of(tl.load(START + c), BLOCK)
        n = tl.load(NUMEL + t)
        # P/G/M/V hold data_ptr()s; the host sends only 16-byte-aligned ones here.
        p_ptr = tl.multiple_of(tl.load(P + t).to(tl.pointer_type(P_DTYPE)), 16)
        g_ptr = tl.multiple_of(tl.load(G + t).to(tl.pointer_type(G_DTYPE)), 16)
        m_ptr = tl.multiple_of(tl.load(M + t).to(tl.pointer_type(S_DTYPE)), 16)
        v_ptr = tl.multiple_of(tl.load(V + t).to(tl.pointer_type(S_DTYPE)), 16)
        q_ptr = p_ptr
        if HAS_Q:
            q_ptr = tl.multiple_of(tl.load(Q + t).to(tl.pointer_type(Q_DTYPE)), 16)
        idx = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:  # a full chunk: no mask, so the loads vectorise
            _adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, q_ptr, idx, None, decay, step_size, one_minus_b1,
                          beta2, one_minus_b2, eps, bc2_sqrt, grad_coef, HAS_Q)
        else:  # the tensor's tail
            _adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, q_ptr, idx, idx < n, decay, step_size, one_minus_b1,
                          beta2, one_minus_b2, eps, bc2_sqrt, grad_coef, HAS_Q)


def chunk_table(numels: tuple[int, ...], block: int) -> tuple[Tensor, Tensor]:
    """(tensor index int32 [C], start int64 [C]) of every ``block``-element chunk, tensor by tensor.

    numels (1, 0, 2049, 4096), block 2048 -> chunks 1, 0, 2, 2:
    tensor [0, 2, 2, 3, 3], start [0, 0, 2048, 0, 2048].
    """
    numel_T = torch.tensor(numels, dtype=torch.int64)
    chunks_T = (numel_T + block - 1) // block
    tensor_C = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), chunks_T)
    first_C = torch.repeat_interleave(torch.cumsum(chunks_T, 0) - chunks_T, chunks_T)
    start_C = (torch.arange(tensor_C.numel(), dtype=torch.int64) - first_C) * block
    return tensor_C, start_C


@functools.lru_cache(maxsize=16)
def _device_tables(numels: tuple[int, ...], block: int, device: torch.device) -> tuple[Tensor, ...]:
    """The chunk table and the numels on ``device``: built once per set of shapes."""
    tensor_C, start_C = chunk_table(numels, block)
    numel_T = torch.tensor(numels, dtype=torch.int64)
    return tensor_C.to(device), start_C.to(device), numel_T.to(device)


def launch_adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float,
                 grad_coef: float | Tensor = 1.0, copies: list[Tensor] | None = None,
                 block: int = BLOCK) -> None:
    """One AdamW step (``step`` counted from 1, already incremented) over contiguous, 16-byte-aligned
    tensors of one device and one (param, grad, state) dtype triple, in one launch; each gradient
    is read as ``grad * grad_coef`` (in fp32: gradient clipping without a pass of its own).
    ``grad_coef`` may be a float64 scalar tensor on the device, read by the kernel (no host read):
    rounded to fp32 as a float argument is; a non-finite one skips the step (nothing is written).
    ``copies`` (master weights): one tensor per param, of one dtype, written with the updated
    param rounded to it in the same pass (the model's bf16 weights of fp32 masters)."""
    device = params[0].device
    tensor_C, start_C, numel_T = _device_tables(tuple(p.numel() for p in params), block, device)
    if tensor_C.numel() == 0:
        return
    # Addresses change every step (new grads after zero_grad(set_to_none=True), new states
    # after load_state_dict): one small table per call, copied from pinned memory.
    lists = (params, grads, exp_avgs, exp_avg_sqs) + ((copies,) if copies is not None else ())
    addresses = [t.data_ptr() for ts in lists for t in ts]
    host = torch.tensor(addresses, dtype=torch.int64, pin_memory=device.type == "cuda")
    ptr_4T = host.to(device, non_blocking=True).view(len(lists), len(params))
    q_dtype = copies[0].dtype if copies is not None else params[0].dtype
    coef_on_device = isinstance(grad_coef, Tensor)
    if coef_on_device:
        assert grad_coef.dtype == torch.float64 and grad_coef.numel() == 1, grad_coef
        grad_coef = grad_coef.to(device)  # a no-op where it already is
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    # Triton launches on the current GPU: make it the tensors' one
    other_gpu = device.type == "cuda" and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if other_gpu else contextlib.nullcontext():
        _adamw_kernel[(tensor_C.numel(),)](
            ptr_4T[0], ptr_4T[1], ptr_4T[2], ptr_4T[3], ptr_4T[-1], tensor_C, start_C, numel_T,
            1.0 - lr * weight_decay, lr / bc1, 1.0 - beta1, beta2, 1.0 - beta2, eps, bc2_sqrt, grad_coef,
            P_DTYPE=_TL_DTYPE[params[0].dtype], G_DTYPE=_TL_DTYPE[grads[0].dtype],
            S_DTYPE=_TL_DTYPE[exp_avgs[0].dtype], Q_DTYPE=_TL_DTYPE[q_dtype], HAS_Q=copies is not None,
            COEF_ON_DEVICE=coef_on_device, BLOCK=block, num_warps=4)


def group_uses_kernel(group: dict) -> bool:
    """Whether a param group's options are all ones the kernel implements."""
    options = ("amsgrad", "maximize", "capturable", "differentiable")
    numbers = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
    return (not any(group[k] for k in options) and group["decoupled_weight_decay"]
            and all(isinstance(x, (int, float)) for x in numbers))


def kernel_takes(p: Tensor, g: Tensor, m: Tensor, v: Tensor, device_type: str) -> bool:
    """Whether the kernel can address this parameter's four tensors (see the module docstring)."""
    return (p.device.type == device_type and p.dtype in KERNEL_DTYPES and g.dtype in KERNEL_DTYPES
            and m.dtype in KERNEL_DTYPES and v.dtype == m.dtype
            and type(p) in _PLAIN and type(g) in _PLAIN and type(m) in _PLAIN and type(v) in _PLAIN
            and p.get_device() == g.get_device() == m.get_device() == v.get_device()
            and p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()
            and (p.data_ptr() | g.data_ptr() | m.data_ptr() | v.data_ptr()) % _ALIGN == 0)


def bucket_key(p: Tensor, g: Tensor, m: Tensor, step: float) -> tuple:
    """Tensors that share one launch: one device, one dtype triple, one step count."""
    return (p.device, p.dtype, g.dtype, m.dtype, step)


# torch 2.11 renamed the check for any accelerator and keeps the old name as a deprecated alias.
_capture_health_check = getattr(torch.optim.Optimizer, "_accelerator_graph_capture_health_check", None) \
    or torch.optim.Optimizer._cuda_graph_capture_health_check


def _torch_fused_takes(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return (p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point()
            and all(t.dtype == p.dtype and t.device == p.device and t.is_contiguous() for t in (g, m, v)))


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW with one Triton launch per bucket; the same math, state and state_dict.

    Only ``step`` differs from the parent. Built like torch.optim.AdamW; leave ``fused`` and
    ``foreach`` unset (they choose torch's implementation for what the kernel does not take).

    ``master_weights=True`` (low-precision parameters, e.g. a bf16 model): each parameter's
    state also holds ``master``, an fp32 copy, and the moments are fp32 (or ``moment_dtype``,
    e.g. bf16: loaded to fp32, stored rounded once, as any low-precision state); the update reads the
    low-precision gradient, steps the master and writes the parameter as the master rounded to
    its dtype, in the same pass (the kernel), so the model never sees an fp32 weight and nothing
    is lost to bf16 rounding between steps. ``master`` is ordinary optimizer state: it is in
    ``state_dict()`` and comes back in fp32 from ``load_state_dict`` (torch would cast it, and
    the moments, to the parameter's dtype); a state without one (loaded from a run without master
    weights) starts its master from the parameter.

    ``step(grad_coef=<float64 device scalar>)`` (the trainer's clipping coefficient, computed on the
    device so the step is queued before the host has read anything): a non-finite value skips the
    step on the device. Its host half (the step counts, on the CPU, that the next launch's bias
    correction reads; state made for the step) stays until ``undo_step()`` takes it back.
    """

    kernel_device_type = "cuda"  # the Triton-interpreter tests set "cpu"
    block = BLOCK
    takes_grad_coef = True  # step(grad_coef=c): the update reads grad * c (anymoe.trainers.optim)

    def __init__(self, params, *args, master_weights: bool = False, moment_dtype: torch.dtype = torch.float32,
                 **kwargs) -> None:
        super().__init__(params, *args, **kwargs)
        self.master_weights = master_weights
        if moment_dtype != torch.float32 and not master_weights:
            raise ValueError("moment_dtype other than float32 needs master_weights=True")
        self.moment_dtype = moment_dtype
        self._host_half: _HostHalf | None = None  # of the last step with a device coef, for undo_step()
        if master_weights:
            plain = [g for g in self.param_groups if group_uses_kernel(g) and g["fused"] is None
                     and g["foreach"] is None]
            if len(plain) != len(self.param_groups):
                raise ValueError("master_weights takes plain AdamW groups only (no amsgrad, maximize, "
                                 "capturable, differentiable, fused or foreach, float hyper-parameters)")

    def _master_state(self, p: Tensor) -> dict:
        """p's state with an fp32 master and moments in ``moment_dtype`` (made on first use, or converted)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, dtype=self.moment_dtype,
                                              memory_format=torch.contiguous_format)
        if "master" not in state:
            state["master"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        for key in ("exp_avg", "exp_avg_sq"):
            if state[key].dtype != self.moment_dtype:
                state[key] = state[key].to(self.moment_dtype)
        return state

    @torch.no_grad()
    def init_master_weights(self) -> None:
        """Every parameter's master from its value now: called before the model is cast down, the
        masters start exact (else a master starts from the rounded parameter at its first step)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._master_state(p)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._host_half = None  # nothing left to undo: the loaded state replaces it
        if not self.master_weights:
            return
        # torch cast every floating state tensor to its parameter's dtype; restore the masters in fp32
        # and the moments in moment_dtype.
        ordered = [p for g in self.param_groups for p in g["params"]]
        for idx, saved in state_dict["state"].items():
            p = ordered[int(idx)]
            for key, dtype in (("master", torch.float32), ("exp_avg", self.moment_dtype),
                               ("exp_avg_sq", self.moment_dtype)):
                if key in saved and torch.is_tensor(saved[key]):
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype, copy=True)

    def takes_device_coef(self) -> bool:
        """Whether ``step(grad_coef=<device tensor>)`` queues the whole step without reading the
        tensor: every group goes to the kernel, and what the kernel does not take to torch's fused
        kernel (which skips on ``found_inf``) on a device torch has one for, with fp32/fp64
        gradients (masters step on fp32 ones). Decided per step, a tensor can still end up where
        the coef must be read to the host (``_torch_coef``: a misaligned bf16 parameter, a
        non-contiguous gradient): the step then syncs there, with the same numbers."""
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused_devices = _get_fused_kernels_supported_devices()
        for group in self.param_groups:
            kernel = self.master_weights or group_uses_kernel(group)
            # the kernel's groups send what it does not take to torch fused unless the group says no
            if kernel:
                torch_fused = group["fused"] is not False and group["foreach"] is None
            else:
                torch_fused = bool(group["fused"])
            if not torch_fused:
                return False
            for p in group["params"]:
                on_kernel = kernel and HAVE_TRITON and p.device.type == self.kernel_device_type
                if not on_kernel and (p.device.type not in fused_devices
                                      or not (self.master_weights or p.dtype in _EXACT_SCALE)):
                    return False
        return True

    def undo_step(self) -> None:
        """Take back the host half of the last ``step(grad_coef=<device tensor>)``, once the caller
        knows the coef was not finite and the device skipped the step: the step counts (the next
        step's bias correction reads them) and any state made for it, so ``state_dict()`` is bitwise
        what it was before that step (counts are whole numbers: n + 1 - 1 == n in float32 below 2**24)."""
        host_half, self._host_half = self._host_half, None
        if host_half is None:
            raise RuntimeError("undo_step() follows a step(grad_coef=<device tensor>), once")
        if host_half.counts:
            torch._foreach_sub_(host_half.counts, 1.0)
        for p, saved in host_half.states:
            if saved is None:
                self.state.pop(p, None)
            else:
                self.state[p] = saved

    @_use_grad_for_differentiable
    def step(self, closure=None, *, grad_coef: float | Tensor = 1.0):
        """One AdamW step; ``closure`` re-evaluates the model and returns the loss (as torch).

        ``grad_coef``: every gradient is used as ``grad * grad_coef`` (gradient clipping). The
        kernel multiplies as it reads; tensors it does not take are scaled in place first, so
        their ``.grad`` holds the scaled gradient afterwards, as after torch's clipping.
        A float64 scalar tensor on the device is read there (class docstring; ``takes_device_coef``).
        """
        _capture_health_check(self)  # torch's refusal of a CUDA-graph capture without capturable=True
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._host_half = None
        if isinstance(grad_coef, Tensor):  # before any state is made or changed
            self._host_half = _HostHalf([(p, dict(self.state[p]) if p in self.state else None)
                                         for group in self.param_groups for p in group["params"]
                                         if p.grad is not None])
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            if self.master_weights:
                for p in group["params"]:
                    if p.grad is not None:
                        self._master_state(p)
            # torch's own lazy state init (and its refusal of sparse gradients)
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                           steps)
            if self.master_weights:
                masters = [self.state[p]["master"] for p in params]
                self._kernel_step(group, masters, grads, exp_avgs, exp_avg_sqs, steps, grad_coef,
                                  copies=params)
            elif group_uses_kernel(group) and not torch.compiler.is_compiling():
                self._kernel_step(group, params, grads, exp_avgs, exp_avg_sqs, steps, grad_coef)
            else:  # exactly what torch.optim.AdamW.step does for this group
                coef, found_inf = _torch_coef(grad_coef, grads, fused=bool(group["fused"]))
                if coef is None:  # read on the host: not finite, a step to skip
                    continue
                _scale(grads, coef)
                self._torch_step(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                                 has_complex, foreach=group["foreach"], fused=group["fused"],
                                 found_inf=found_inf)
        return loss

    def _count(self, steps: list[Tensor]) -> None:
        """Add this step to host step counts (as torch: count the step, then use it)."""
        torch._foreach_add_(steps, 1.0)
        if self._host_half is not None:
            self._host_half.counts += steps

    def _kernel_step(self, group, params, grads, exp_avgs, exp_avg_sqs, steps, grad_coef: float | Tensor,
                     copies: list[Tensor] | None = None) -> None:
        """``copies`` (master weights): params are the fp32 masters, copies the model's parameters."""
        mine, rest = [], []
        for i, four in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            takes = (HAVE_TRITON and kernel_takes(*four, self.kernel_device_type)
                     and not torch.compiler.is_compiling())
            if copies is not None:
                q = copies[i]
                takes = takes and type(q) in _PLAIN and q.is_contiguous() and q.data_ptr() % _ALIGN == 0 \
                    and q.dtype in KERNEL_DTYPES
            (mine if takes else rest).append(i)
        if rest:
            lists = (params, grads, exp_avgs, exp_avg_sqs, steps)
            sub = [[lst[i] for i in rest] for lst in lists]
            if copies is not None:  # torch's AdamW wants the gradient (and moments) in the master's dtype
                sub[1] = [g.to(p.dtype) for g, p in zip(sub[1], sub[0])]
            stored = None  # low-precision moments: the step on fp32 copies, stored rounded, as the kernel
            if copies is not None and self.moment_dtype != torch.float32:
                stored = sub[2] + sub[3]
                sub[2], sub[3] = [m.float() for m in sub[2]], [v.float() for v in sub[3]]
            fused = _torch_fused(group, *sub[:4])
            coef, found_inf = _torch_coef(grad_coef, sub[1], fused)
            if coef is not None:  # None: read on the host, not finite, a step to skip
                _scale(sub[1], coef)
                self._torch_rest(group, *sub, fused=fused, found_inf=found_inf)
                if copies is not None:
                    _copy_masters([copies[i] for i in rest], sub[0], found_inf)
                if stored is not None:
                    torch._foreach_copy_(stored, sub[2] + sub[3])
        if not mine:
            return
        for i in mine:
            if not steps[i].is_cpu:  # loaded from a fused or capturable torch AdamW: read back once
                steps[i] = self.state[params[i]]["step"] = steps[i].detach().to("cpu")
        self._count([steps[i] for i in mine])
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i in mine:
            copy_dtype = () if copies is None else (copies[i].dtype,)
            buckets[copy_dtype + bucket_key(params[i], grads[i], exp_avgs[i], steps[i].item())].append(i)
        beta1, beta2 = group["betas"]
        for key, idx in buckets.items():
            launch_adamw([params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                         [exp_avg_sqs[i] for i in idx], lr=group["lr"], beta1=beta1, beta2=beta2,
                         eps=group["eps"], weight_decay=group["weight_decay"], step=key[-1],
                         grad_coef=grad_coef, copies=None if copies is None else [copies[i] for i in idx],
                         block=self.block)

    def _torch_rest(self, group, params, grads, exp_avgs, exp_avg_sqs, steps, *, fused: bool,
                    found_inf: Tensor | None) -> None:
        """Tensors the kernel cannot address: torch's fused kernel where ``_torch_fused`` says (on
        copies of the steps: it wants them on the device, and ours stay on the CPU), else torch's
        default implementation."""
        has_complex = any(torch.is_complex(p) for p in params)
        if not fused:
            self._torch_step(group, params, grads, exp_avgs, exp_avg_sqs, [], steps, has_complex,
                             foreach=group["foreach"], fused=False)
            return
        device_steps = [s.to(p.device, torch.float32, copy=True) for s, p in zip(steps, params)]
        self._torch_step(group, params, grads, exp_avgs, exp_avg_sqs, [], device_steps, has_complex,
                         foreach=False, fused=True, found_inf=found_inf)
        self._count(steps)

    def _torch_step(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, has_complex,
                    *, foreach, fused, found_inf: Tensor | None = None) -> None:
        """torch.optim.AdamW's own update of these tensors (what its step does for a group);
        ``found_inf`` (1.0: skip; torch's fused kernel only) that of a device coef, else a GradScaler's."""
        beta1, beta2 = group["betas"]
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        torch_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, foreach=foreach,
                    capturable=group["capturable"], differentiable=group["differentiable"], fused=fused,
                    grad_scale=getattr(self, "grad_scale", None), found_inf=found_inf,
                    has_complex=has_complex, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"])


def torch_path_adamw(master_weights: bool) -> type[torch.optim.AdamW] | None:
    """``Backend.adamw_class`` of a backend with no AdamW kernel of its own: torch's AdamW (None),
    and for master weights TritonAdamW, whose step runs torch's AdamW on the fp32 masters there
    and then copies them into the parameters (its kernel takes CUDA tensors only)."""
    return TritonAdamW if master_weights else None


@dataclass
class _HostHalf:
    """What a step with a device coef changed on the host, for ``undo_step``: each stepped parameter's
    state before it (a shallow copy; None: it had none) and the step counts it added 1 to."""

    states: list[tuple[Tensor, dict | None]]
    counts: list[Tensor] = field(default_factory=list)


def _torch_fused(group: dict, params, grads, exp_avgs, exp_avg_sqs) -> bool:
    """Whether torch's fused kernel takes these tensors the kernel does not: where it takes them
    all, unless the group says ``fused=False`` or names ``foreach``."""
    return (group["fused"] is not False and group["foreach"] is None
            and all(_torch_fused_takes(*four) for four in zip(params, grads, exp_avgs, exp_avg_sqs)))


def _torch_coef(coef: float | Tensor, grads: list[Tensor], fused: bool) -> tuple[float | Tensor | None,
                                                                                   Tensor | None]:
    """(coef, found_inf) for torch's AdamW over these gradients. A device coef stays on the device
    where torch's fused kernel runs on fp32/fp64 gradients: they are scaled by it (by 1 if it is not
    finite, so a skipped step leaves them too), and found_inf (1.0 where it is not finite) makes the
    kernel skip. Elsewhere it is read to the host (a sync) and used as a float, as the synchronous
    caller would: torch's other AdamW code takes no found_inf, and scales bf16/fp16 gradients by a
    float differently on each device (on the CPU, by the float rounded to bf16).
    (None, None): read and not finite, so these tensors skip the step."""
    if not isinstance(coef, Tensor):
        return coef, None
    if fused and all(g.dtype in _EXACT_SCALE for g in grads):
        finite = torch.isfinite(coef)
        return torch.where(finite, coef, 1.0), (~finite).to(torch.float32)  # 0-dim, like device steps
    value = coef.item()
    return (value, None) if math.isfinite(value) else (None, None)


def _scale(grads: list[Tensor], coef: float | Tensor) -> None:
    """grads *= coef. A float64 tensor coef is rounded to each (fp32/fp64) gradient's dtype first:
    what torch does with a float, so both give the same bits."""
    if isinstance(coef, Tensor):
        for device, dtype in {(g.device, g.dtype) for g in grads}:
            torch._foreach_mul_([g for g in grads if g.device == device and g.dtype == dtype],
                                coef.to(device, dtype))
    elif coef != 1.0 and grads:
        torch._foreach_mul_(grads, coef)


def _copy_masters(copies: list[Tensor], masters: list[Tensor], found_inf: Tensor | None) -> None:
    """The parameters as their masters rounded to their dtype; where ``found_inf`` is 1 (a skipped
    step) as they are (q -> fp32 -> q is exact)."""
    if found_inf is None:
        torch._foreach_copy_(copies, masters)
        return
    skip = found_inf.to(torch.bool)
    for q, master in zip(copies, masters):
        q.copy_(torch.where(skip, q, master))


__all__ = ["BLOCK", "HAVE_TRITON", "KERNEL_DTYPES", "TritonAdamW", "bucket_key", "chunk_table",
           "group_uses_kernel", "kernel_takes", "launch_adamw", "torch_path_adamw"]
