"""Collectives over named process groups: one torch.distributed implementation for every backend.

Expert parallelism moves tokens between ranks and needs gradients to flow back the same way,
so the ops the MoE uses are autograd-aware:

- ``all_to_all(x, group, output_splits, input_splits)``: uneven splits along dim 0; its
  backward is the reverse all-to-all (splits swapped).
- ``all_gather(x, group, sizes=...)``: concatenation of every rank's rows (uneven allowed);
  backward is the reduce-scatter (sum) of the gradient, because every rank's loss used every
  rank's rows.
- ``reduce_scatter(x, group, sizes=...)``: sum over ranks, each rank keeps its slice;
  backward is the all-gather of the gradient.
- ``all_reduce(x, group, op, differentiable=True)``: a sum whose every rank's result feeds that
  rank's loss; backward is the all-reduce (sum) of the gradient.

``broadcast``, ``barrier`` and the in-place ``all_reduce_`` (gradient sync) carry no gradient.

A :class:`Group` is a frozen record (name, global ranks, this rank's index, process group).
A group of one process is the identity for every op: it needs no process group and no
``init_process_group`` at all, so single-process training runs the same code.

What torch.distributed backends really support (checked with gloo on torch 2.13): all_reduce
(SUM/MAX/MIN; AVG is not in every gloo release, so "avg" is SUM then a division everywhere),
all_gather_into_tensor and reduce_scatter_tensor with equal sizes, all_to_all_single with
uneven splits (also bf16). Gloo rejects uneven list all_gather and uneven list all_to_all.
So the uneven all_gather / reduce_scatter here pad every rank's rows to the largest count,
run the equal-size collective and trim: the same semantics on every backend. A backend whose
library lacks one of the primitives registers a :class:`CollectiveOps` subclass for its
torch.distributed backend name with :func:`register_collective_ops`; everything above the
primitives is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

ReduceOpName = Literal["sum", "avg", "max", "min"]
_TORCH_OPS = {"sum": "SUM", "avg": "SUM", "max": "MAX", "min": "MIN"}
# torch 2.13 renamed the flat all-gather / reduce-scatter (the old names warn); 2.11 has only the old.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Group:
    """A named set of ranks that communicate; ``pg`` is None only for a group of one."""

    name: str
    ranks: tuple[int, ...]  # global ranks, in group order
    index: int  # this process's position in ``ranks``
    pg: Any = None  # torch.distributed ProcessGroup (None when size == 1)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's rank inside the group (same as ``index``)."""
        return self.index

    def __post_init__(self) -> None:
        assert 0 <= self.index < len(self.ranks), (self.index, self.ranks)
        assert self.pg is not None or len(self.ranks) == 1, f"group {self.name} has no process group"


def single_group(name: str = "world", global_rank: int = 0) -> Group:
    """A group of one process: every collective over it is the identity."""
    return Group(name, (global_rank,), 0, None)


def world_group() -> Group:
    """The default group of the running world, or a group of one when torch.distributed is off."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return single_group("world", rank)
    world = dist.get_world_size()
    return Group("world", tuple(range(world)), dist.get_rank(), dist.group.WORLD)


# ---------------------------------------------------------------------------------------------
# Primitives: the only place that calls torch.distributed. A backend may override any of them.
# ---------------------------------------------------------------------------------------------


def _staged(x: Tensor, group: Group) -> Tensor:
    """``x`` on a device the group's library can use (a CPU statistic on an accelerator-only
    group goes to the current accelerator); ``x`` itself when it already can."""
    types = getattr(group.pg, "_device_types", None)
    if not types or any(t.type == x.device.type for t in types):
        return x
    accel = getattr(torch, "accelerator", None)
    if accel is not None and accel.is_available():
        return x.to(torch.device(types[0].type, accel.current_device_index()))
    return x.to(torch.device(types[0].type))


class CollectiveOps:
    """The equal-size / in-place primitives every op below is built from.

    Tensors on a device the group's library cannot use (e.g. a CPU counter on an
    accelerator-only group) are staged through the library's device and come back.
    """

    def all_reduce_(self, x: Tensor, group: Group, op: ReduceOpName) -> Tensor:
        buf = _staged(x, group)
        dist.all_reduce(buf, op=getattr(dist.ReduceOp, _TORCH_OPS[op]), group=group.pg)
        if op == "avg":
            buf.div_(group.size)
        return x if buf is x else x.copy_(buf)

    def all_gather_equal(self, x: Tensor, group: Group) -> Tensor:
        """[n, ...] on every rank -> [size * n, ...], rank order."""
        buf = _staged(x.contiguous(), group)
        out = buf.new_empty((group.size * x.shape[0], *x.shape[1:]))
        _all_gather_flat(out, buf, group=group.pg)
        return out.to(x.device)

    def reduce_scatter_equal(self, x: Tensor, group: Group) -> Tensor:
        """[size * n, ...] on every rank -> [n, ...]: the sum over ranks of this rank's slice."""
        buf = _staged(x.contiguous(), group)
        out = buf.new_empty((x.shape[0] // group.size, *x.shape[1:]))
        _reduce_scatter_flat(out, buf, op=dist.ReduceOp.SUM, group=group.pg)
        return out.to(x.device)

    def all_to_all_single(self, x: Tensor, group: Group, output_splits: list[int],
                          input_splits: list[int]) -> Tensor:
        buf = _staged(x.contiguous(), group)
        out = buf.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, buf, output_splits, input_splits, group=group.pg)
        return out.to(x.device)

    def all_to_all_single_async(self, x: Tensor, group: Group, output_splits: list[int],
                                input_splits: list[int]) -> tuple[Tensor, Callable[[], Any]]:
        """Start the all-to-all; returns (the output buffer being filled, a wait function)."""
        buf = _staged(x.contiguous(), group)
        out = buf.new_empty((sum(output_splits), *x.shape[1:]))
        work = dist.all_to_all_single(out, buf, output_splits, input_splits, group=group.pg, async_op=True)
        return out, work.wait

    def all_gather_equal_async(self, x: Tensor, group: Group) -> tuple[Tensor, Callable[[], Any]]:
        """Start ``all_gather_equal``; returns (the output buffer being filled, a wait function)."""
        buf = _staged(x.contiguous(), group)
        out = buf.new_empty((group.size * x.shape[0], *x.shape[1:]))
        work = _all_gather_flat(out, buf, group=group.pg, async_op=True)
        return out, work.wait

    def broadcast_(self, x: Tensor, group: Group, src: int) -> Tensor:
        buf = _staged(x, group)
        dist.broadcast(buf, src=group.ranks[src], group=group.pg)
        return x if buf is x else x.copy_(buf)

    def barrier(self, group: Group) -> None:
        dist.barrier(group=group.pg)


_OPS: dict[str, Callable[[], CollectiveOps]] = {}
_DEFAULT_OPS = CollectiveOps()


def register_collective_ops(dist_backend: str) -> Callable[[type[CollectiveOps]], type[CollectiveOps]]:
    """Class decorator: use this CollectiveOps subclass for groups of ``dist_backend``."""

    def add(cls: type[CollectiveOps]) -> type[CollectiveOps]:
        if dist_backend in _OPS:
            raise ValueError(f"collective ops for {dist_backend!r} are registered twice")
        _OPS[dist_backend] = cls
        return cls

    return add


def _ops(group: Group) -> CollectiveOps:
    if _OPS:
        name = str(dist.get_backend(group.pg))
        if name in _OPS:
            return _OPS[name]()
    return _DEFAULT_OPS


# ---------------------------------------------------------------------------------------------
# Helpers for uneven sizes (pad to the largest, run the equal-size op, trim).
# ---------------------------------------------------------------------------------------------


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))], dim=0)


def _trim_uneven(padded: Tensor, sizes: Sequence[int]) -> Tensor:
    """Each rank's first ``sizes[r]`` of its ``max(sizes)`` gathered rows, concatenated."""
    biggest = max(sizes)
    if all(s == biggest for s in sizes):
        return padded
    pieces = padded.split(biggest, dim=0)
    return torch.cat([p[:s] for p, s in zip(pieces, sizes)], dim=0)


def _gather_uneven(x: Tensor, group: Group, sizes: Sequence[int]) -> Tensor:
    padded = _ops(group).all_gather_equal(_pad_rows(x, max(sizes)), group)
    return _trim_uneven(padded, sizes)


def _scatter_uneven(x: Tensor, group: Group, sizes: Sequence[int]) -> Tensor:
    biggest = max(sizes)
    if any(s != biggest for s in sizes):
        x = torch.cat([_pad_rows(p, biggest) for p in x.split(list(sizes), dim=0)], dim=0)
    return _ops(group).reduce_scatter_equal(x, group)[: sizes[group.index]]


def _along(x: Tensor, dim: int) -> Tensor:
    return x if dim == 0 else x.movedim(dim, 0)


def _back(x: Tensor, dim: int) -> Tensor:
    return x if dim == 0 else x.movedim(0, dim)


# ---------------------------------------------------------------------------------------------
# Autograd functions.
# ---------------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Group, output_splits: list[int], input_splits: list[int]) -> Tensor:
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _ops(group).all_to_all_single(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # The rows this rank received from rank j go back to rank j: splits swap.
        g = _ops(ctx.group).all_to_all_single(grad.contiguous(), ctx.group, ctx.input_splits,
                                              ctx.output_splits)
        return g, None, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Group, sizes: list[int]) -> Tensor:
        ctx.group, ctx.sizes = group, sizes
        return _gather_uneven(x, group, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _scatter_uneven(grad.contiguous(), ctx.group, ctx.sizes), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Group, sizes: list[int]) -> Tensor:
        ctx.group, ctx.sizes = group, sizes
        return _scatter_uneven(x, group, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _gather_uneven(grad.contiguous(), ctx.group, ctx.sizes), None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Group) -> Tensor:
        ctx.group = group
        return _ops(group).all_reduce_(x.clone(), group, "sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _ops(ctx.group).all_reduce_(grad.clone(), ctx.group, "sum"), None


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def all_reduce(x: Tensor, group: Group, op: ReduceOpName = "sum", differentiable: bool = False) -> Tensor:
    """A new tensor holding the reduction of ``x`` over the group.

    ``differentiable`` (op "sum" or "avg" only): the result feeds every rank's loss, so the
    gradient of ``x`` is the sum (for avg: the mean) of every rank's gradient.
    """
    if group.size == 1:
        return x if differentiable else x.clone()
    if differentiable:
        if op not in ("sum", "avg"):
            raise ValueError(f"a differentiable all_reduce supports 'sum' and 'avg', not {op!r}")
        out = _AllReduceSum.apply(x, group)
        return out / group.size if op == "avg" else out
    return _ops(group).all_reduce_(x.detach().clone(), group, op)


def all_reduce_(x: Tensor, group: Group, op: ReduceOpName = "sum") -> Tensor:
    """In-place reduction (gradient buffers, statistics); no autograd."""
    if group.size == 1:
        return x
    return _ops(group).all_reduce_(x, group, op)


def gather_sizes(n: int, group: Group, device: torch.device | None = None) -> list[int]:
    """Every rank's ``n`` (e.g. its token count), in group order."""
    if group.size == 1:
        return [n]
    t = torch.full((1,), n, dtype=torch.int64, device=device)  # a fill, not a blocking host copy
    return _ops(group).all_gather_equal(t, group).tolist()


def all_gather(x: Tensor, group: Group, dim: int = 0, sizes: Sequence[int] | None = None) -> Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in group order; differentiable.

    ``sizes``: each rank's length along ``dim`` when they differ (None: all equal; learn
    unknown ones with :func:`gather_sizes`). Backward: the gradient of this rank's slice
    summed over all ranks.
    """
    if group.size == 1:
        return x
    xs = _along(x, dim)
    sizes = [xs.shape[0]] * group.size if sizes is None else list(sizes)
    assert sizes[group.index] == xs.shape[0], (sizes, xs.shape, group.index)
    return _back(_AllGather.apply(xs.contiguous(), group, sizes), dim)


def all_gather_list(x: Tensor, group: Group, dim: int = 0,
                    sizes: Sequence[int] | None = None) -> list[Tensor]:
    """Every rank's ``x`` as a list in group order (uneven sizes allowed); differentiable."""
    if group.size == 1:
        return [x]
    sizes = [_along(x, dim).shape[0]] * group.size if sizes is None else list(sizes)
    return list(all_gather(x, group, dim, sizes).split(sizes, dim=dim))


def reduce_scatter(x: Tensor, group: Group, dim: int = 0, sizes: Sequence[int] | None = None) -> Tensor:
    """Sum ``x`` over the group; this rank keeps its slice along ``dim``; differentiable.

    ``sizes``: the slice length of each rank (None: ``x.shape[dim] / size`` each).
    """
    if group.size == 1:
        return x
    xs = _along(x, dim)
    if sizes is None:
        if xs.shape[0] % group.size:
            raise ValueError(f"reduce_scatter of {xs.shape[0]} rows over {group.size} ranks needs sizes=")
        sizes = [xs.shape[0] // group.size] * group.size
    sizes = list(sizes)
    assert sum(sizes) == xs.shape[0], (sizes, xs.shape)
    return _back(_ReduceScatter.apply(xs.contiguous(), group, sizes), dim)


def all_to_all(x: Tensor, group: Group, output_splits: Sequence[int] | None = None,
               input_splits: Sequence[int] | None = None) -> Tensor:
    """Rows ``input_splits[j]`` of ``x`` go to rank j; rows from rank j arrive in order.

    Uneven splits allowed (None: equal). Differentiable: backward sends every gradient row
    back to the rank it came from.
    """
    if group.size == 1:
        return x
    n = x.shape[0]
    if input_splits is None:
        assert n % group.size == 0, (n, group.size)
        input_splits = [n // group.size] * group.size
    if output_splits is None:
        output_splits = list(input_splits) if len(set(input_splits)) == 1 else None
        assert output_splits is not None, "uneven all_to_all needs output_splits (see exchange_splits)"
    return _AllToAll.apply(x, group, list(output_splits), list(input_splits))


class _AllToAllStart(torch.autograd.Function):
    """Launch the all-to-all; the returned buffer fills in the background until the wait."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Group, output_splits: list[int], input_splits: list[int],
                pending: PendingAllToAll) -> Tensor:
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out, pending.wait_fn = _ops(group).all_to_all_single_async(x, group, output_splits, input_splits)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = _ops(ctx.group).all_to_all_single(grad.contiguous(), ctx.group, ctx.input_splits,
                                              ctx.output_splits)
        return g, None, None, None, None


class _AllToAllWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf: Tensor, pending: PendingAllToAll, device: torch.device) -> Tensor:
        pending.wait_fn()
        ctx.buf_device = buf.device
        return buf.view_as(buf) if buf.device == device else buf.to(device)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.buf_device), None, None


class PendingAllToAll:
    """An all-to-all in flight: do other work, then ``wait()`` for the (differentiable) result."""

    def __init__(self) -> None:
        self.wait_fn: Callable[[], None] | None = None
        self._buf: Tensor | None = None
        self._device: torch.device | None = None
        self._done: Tensor | None = None

    def wait(self) -> Tensor:
        if self._done is None:
            self._done = _AllToAllWait.apply(self._buf, self, self._device)
        return self._done


def all_to_all_start(x: Tensor, group: Group, output_splits: Sequence[int],
                     input_splits: Sequence[int]) -> PendingAllToAll:
    """``all_to_all`` that returns at once; compute something else, then call ``.wait()``.

    Same semantics and gradient as ``all_to_all`` (the backward itself is synchronous); the
    overlap is real where the library runs collectives beside compute (an accelerator's
    communication stream, gloo's threads).
    """
    pending = PendingAllToAll()
    if group.size == 1:
        pending._done = x
        return pending
    pending._device = x.device
    pending._buf = _AllToAllStart.apply(x, group, list(output_splits), list(input_splits), pending)
    return pending


class _AllGatherStart(torch.autograd.Function):
    """Launch the equal-size all-gather; backward: the reduce-scatter of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Group, pending: PendingAllToAll) -> Tensor:
        ctx.group = group
        out, pending.wait_fn = _ops(group).all_gather_equal_async(x, group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _ops(ctx.group).reduce_scatter_equal(grad.contiguous(), ctx.group), None, None


class PendingAllGather(PendingAllToAll):
    """An all-gather in flight; ``wait()`` gives every rank's rows (uneven sizes trimmed)."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.sizes = sizes

    def wait(self) -> Tensor:
        if self._done is None:
            # A differentiable trim (its backward pads with 0).
            self._done = _trim_uneven(super().wait(), self.sizes)
        return self._done


def all_gather_start(x: Tensor, group: Group, sizes: Sequence[int] | None = None) -> PendingAllGather:
    """``all_gather`` along dim 0 that returns at once; do other work, then call ``.wait()``.

    Same semantics and gradient as ``all_gather(x, group, sizes=sizes)`` (the backward, a
    reduce-scatter, is synchronous).
    """
    sizes = [x.shape[0]] * group.size if sizes is None else list(sizes)
    assert sizes[group.index] == x.shape[0], (sizes, x.shape, group.index)
    pending = PendingAllGather(sizes)
    if group.size == 1:
        pending._done = x
        return pending
    pending._device = x.device
    pending._buf = _AllGatherStart.apply(_pad_rows(x, max(sizes)).contiguous(), group, pending)
    return pending


def exchange_splits(input_splits_P: Tensor, group: Group) -> Tensor:
    """Given how many rows this rank sends to each rank, how many it receives from each."""
    if group.size == 1:
        return input_splits_P
    return _ops(group).all_to_all_single(input_splits_P.contiguous(), group, [1] * group.size,
                                         [1] * group.size)


def broadcast(x: Tensor, group: Group, src: int = 0) -> Tensor:
    """A new tensor: group member ``src``'s ``x`` on every rank (same shape everywhere)."""
    if group.size == 1:
        return x.clone()
    return _ops(group).broadcast_(x.detach().clone().contiguous(), group, src)


def barrier(group: Group) -> None:
    if group.size > 1:
        _ops(group).barrier(group)


__all__ = [
    "CollectiveOps", "Group", "PendingAllGather", "PendingAllToAll", "all_gather", "all_gather_list",
    "all_gather_start", "all_reduce", "all_reduce_",
    "all_to_all", "all_to_all_start", "barrier", "broadcast", "exchange_splits", "gather_sizes",
    "reduce_scatter", "register_collective_ops", "single_group", "world_group",
]
