"""Language-model cross-entropy without the fp32 copy of the logits (issue 9, end-to-end speed).

The reference ``F.cross_entropy(logits.float(), labels, reduction="sum")`` on bf16 logits
[N, V] makes an fp32 copy, saves an fp32 log-softmax, and writes an fp32 gradient that is then
cast back: three fp32 [N, V] tensors (2 GB each at N=16k, V=32k) and as many passes over them.
``cross_entropy_sum`` computes the same value and gradient with the math in fp32 but nothing
of size [N, V] in fp32:

1. forward: per row, ``lse = logsumexp(logits)`` and ``loss = lse - logits[label]``; saves the
   logits (already alive: the caller holds them) and ``lse_N`` (one float per row).
2. backward: per row, ``dlogits = g * (exp(logits - lse) - onehot(label))``, written straight
   into a gradient in the logits' dtype, rounded once.

This is the "recompute" form of a fused cross-entropy. The other form (Liger-kernel's)
writes the gradient during the forward and scales it by the upstream gradient in the
backward. With a separate gradient buffer that moves ~5.2 GB at N=16k, V=32k bf16 (logits
read twice, gradient written, then read and written again) where this moves ~3.2 GB (logits
read in the forward; read again and the gradient written in the backward), for the same
peak (logits + one gradient). Liger gets a lower peak only by overwriting the logits with
their gradient, which breaks any other user of the logits (a distillation loss, a softcap's
saved output). And no saved tensor is updated in place, so ``retain_graph`` and
``torch.compile`` see a plain functional graph. The cost: the logits stay saved until the
backward, so updating them in place after the loss is an autograd error.

Ignored rows (label == ignore_index) add 0 to the loss and get a zero gradient. The pure-torch
ops below run everywhere (CPU, NPU) and walk the rows in chunks of ``chunk_bytes`` of fp32, so
their temporaries stay small; a backend may register faster kernels for its device type
(``register_loss_ops``; the CUDA backend registers Triton kernels). All are checked against
``F.cross_entropy`` on float64 logits.

Legend: N rows (tokens), V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anymoe.core.op_registry import OpRegistry


class LossOps:
    """The two passes of the fused cross-entropy in plain torch (runs on every device).

    ``ce_fwd(logits [N, V], labels [N], ignore_index) -> (loss_N, lse_N)``: per-row loss
    (0 where ignored) and log-sum-exp, in the accumulation dtype (fp32; fp64 for fp64 logits).
    ``ce_bwd(logits, labels, lse_N, g_N, ignore_index) -> dlogits [N, V]`` in the logits'
    dtype: ``g_N[n] * (softmax(logits[n]) - onehot(labels[n]))``, 0 on ignored rows. ``g_N`` may
    be an expanded scalar (stride 0). A backend subclasses this and registers it.
    """

    name = "torch"

    def __init__(self, chunk_bytes: int = 64 << 20, name: str | None = None) -> None:
        # 64 MiB of fp32 per chunk (524 rows at V=32000): small next to the logits, large
        # enough that the ~10 launches per chunk are noise on an accelerator. A CPU prefers
        # cache-sized chunks (1 MiB: 288 ms vs 446 ms fwd+bwd at 2048 x 32000 fp32, one thread,
        # bench/results/cross_entropy_cpu.json): a backend may register its own instance and ``name``.
        self.chunk_bytes = chunk_bytes
        if name is not None:
            self.name = name

    def row_chunks(self, N: int, V: int) -> list[slice]:
        """Row ranges of at most ``chunk_bytes`` of fp32 each (at least one row)."""
        step = max(1, self.chunk_bytes // max(1, 4 * V))
        return [slice(start, min(N, start + step)) for start in range(0, N, step)]

    def ce_fwd(self, logits_NV: Tensor, labels_N: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
        N, V = logits_NV.shape
        acc = _acc(logits_NV)
        losses, lses = [], []
        for rows in self.row_chunks(N, V):
            x = logits_NV[rows].to(acc)  # the chunk's fp32 copy; for fp32 logits a view (read only)
            labels = labels_N[rows].long()  # gather/scatter take int64 indices on older torch
            valid = labels != ignore_index
            lse = torch.logsumexp(x, dim=-1)
            target = _gather_labels(x, torch.where(valid, labels, 0), V, ignore_index)
            losses.append(torch.where(valid, lse - target, 0.0))
            lses.append(lse)
        if not losses:
            empty = logits_NV.new_empty(0, dtype=acc)
            return empty, empty
        return torch.cat(losses), torch.cat(lses)

    def ce_bwd(self, logits_NV: Tensor, labels_N: Tensor, lse_N: Tensor, g_N: Tensor,
               ignore_index: int) -> Tensor:
        N, V = logits_NV.shape
        acc = _acc(logits_NV)
        grad_NV = torch.empty(N, V, dtype=logits_NV.dtype, device=logits_NV.device)
        for rows in self.row_chunks(N, V):
            labels = labels_N[rows].long()
            valid = labels != ignore_index
            # softmax = exp(x - lse), formed in the chunk's fp32 buffer (type promotion does
            # the cast inside the subtraction: no separate fp32 copy of the chunk).
            p = torch.sub(logits_NV[rows], lse_N[rows].to(acc).unsqueeze(1)).exp_()
            # Row weight g, 0 on ignored rows: (p - onehot) * w as p * w, then -w at the label.
            w = torch.where(valid, g_N[rows].to(acc), 0.0).unsqueeze(1)
            p.mul_(w).scatter_add_(1, torch.where(valid, labels, 0).unsqueeze(1), -w)
            grad_NV[rows].copy_(p)  # the one rounding to the logits' dtype
        return grad_NV


def _gather_labels(x_nV: Tensor, labels_n: Tensor, V: int, ignore_index: int) -> Tensor:
    """``x[i, labels[i]]``; an out-of-range label fails here with the reason, where the
    device reports index errors synchronously (the CPU does; no extra check, no host sync)."""
    try:
        return x_nV.gather(1, labels_n.unsqueeze(1)).squeeze(1)
    except (RuntimeError, IndexError) as err:
        raise ValueError(
            f"cross_entropy_sum: every label must be in [0, {V}) or equal ignore_index={ignore_index}; "
            f"{err}"
        ) from err


def _acc(t: Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half types and float32, float64 for float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


TORCH_OPS = LossOps()
# The autograd function carries the ops by name (a string constant traces cleanly under torch.compile).
_REGISTRY: OpRegistry[LossOps] = OpRegistry("loss", TORCH_OPS)


def register_loss_ops(device_type: str, ops: LossOps) -> None:
    """A backend's faster kernels for tensors of ``device_type`` (one registration each)."""
    _REGISTRY.register(device_type, ops)


def loss_ops_for(x: Tensor, fast: bool = True) -> LossOps:
    """The registered kernels for x's device, or the pure-torch ops."""
    return _REGISTRY.for_tensor(x, fast)


class _CrossEntropySum(torch.autograd.Function):
    """Not twice differentiable: the backward is a fused kernel, not a graph of torch ops."""

    @staticmethod
    def forward(ctx, logits_NV, labels_N, ignore_index, ops_name):
        loss_N, lse_N = _REGISTRY.named(ops_name).ce_fwd(logits_NV, labels_N, ignore_index)
        ctx.save_for_backward(logits_NV, labels_N, lse_N)
        ctx.ignore_index = ignore_index
        ctx.ops_name = ops_name
        return loss_N.sum()

    @staticmethod
    def backward(ctx, g):
        logits_NV, labels_N, lse_N = ctx.saved_tensors
        g_N = g.to(lse_N.dtype).expand(labels_N.shape[0])  # reduction "sum": every row gets g
        grad = _REGISTRY.named(ctx.ops_name).ce_bwd(logits_NV, labels_N, lse_N, g_N, ctx.ignore_index)
        return grad, None, None, None


def cross_entropy_sum(logits_NV: Tensor, labels_N: Tensor, ignore_index: int = -100,
                      ops: LossOps | None = None) -> Tensor:
    """``F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")``
    without the fp32 copy: a 0-dim fp32 loss (fp64 for fp64 logits), differentiable in the
    logits, whose gradient comes back in the logits' dtype.

    ``logits_NV`` is [N, V] (any strides); ``labels_N`` is [N] integer. Rows whose label is
    ``ignore_index`` add 0 and get a zero gradient, so an all-ignored batch gives 0, not nan.
    A label outside [0, V) is an error on the pure-torch path where the device reports it
    (the CPU); the CUDA kernels make that row's loss nan instead of reading the host.
    """
    if logits_NV.dim() != 2 or labels_N.shape != logits_NV.shape[:1]:
        raise ValueError(
            f"cross_entropy_sum: logits must be [N, V] and labels [N]; got {tuple(logits_NV.shape)} "
            f"and {tuple(labels_N.shape)} (flatten with .view(-1, V) and .view(-1))"
        )
    if labels_N.dtype.is_floating_point or labels_N.dtype == torch.bool:
        raise ValueError(f"cross_entropy_sum: labels must be class indices (int64, int32), "
                         f"got {labels_N.dtype}")
    ops = ops or loss_ops_for(logits_NV)
    if not _REGISTRY.is_registered(ops):
        raise ValueError(f"loss ops {ops.name!r} are not registered (register_loss_ops)")
    return _CrossEntropySum.apply(logits_NV, labels_N, ignore_index, ops.name)
