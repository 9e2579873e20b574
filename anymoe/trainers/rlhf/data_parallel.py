"""Data parallelism for the RLHF trainers (``anymoe rlhf ... --nproc N`` or torchrun).

Every rank holds the whole policy (and reference, critic, reward model), takes a contiguous
slice of each step's prompts or preference pairs, and averages gradients over the world
before every optimizer step, so the replicas take the same steps and stay equal.

The PPO/GRPO update is a sequence of micro-steps, and ranks may hold different numbers of
micro-batches (prompts are bucketed by token length). A micro-step is therefore the union of
every rank's i-th micro-batch: a rank that has run out takes part with zero gradients, and the
sum is divided by the number of ranks that had a batch; token-mean loss terms are rescaled by each
rank's share of the micro-step's tokens (``token_share``), so the policy step is the one-process
step on the union of the micro-batches (token-mean exactly, the critic's value loss too; seq-mean
and dr-grpo where the ranks' micro-batches hold equally many sequences). Expert parallelism is
not offered in RL (the rollout's decode steps would have to run in lockstep over the EP group).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn

from anymoe.core import collectives as C
from anymoe.core.collectives import Group, all_reduce_
from anymoe.core.parallel import ParallelGroups, sync_gradients

T = TypeVar("T")


class DataParallel:
    """The RL trainers' view of the world group: slices, gradient averages, host reductions."""

    def __init__(self, groups: ParallelGroups | None = None) -> None:
        self.groups = groups if groups is not None and groups.world.size > 1 else None

    @property
    def size(self) -> int:
        return self.groups.world.size if self.groups is not None else 1

    @property
    def rank(self) -> int:
        return self.groups.world.rank if self.groups is not None else 0

    @property
    def group(self) -> Group | None:
        """The world group (for the aux-free bias step's load sums); None in one process."""
        return self.groups.world if self.groups is not None else None

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a step's items (their count divides by ``size``)."""
        per = len(items) // self.size
        assert per * self.size == len(items), (len(items), self.size)
        return list(items[self.rank * per:(self.rank + 1) * per])

    def owns(self, index: int) -> bool:
        """Whether this rank evaluates item / batch ``index`` (round robin: any count divides)."""
        return index % self.size == self.rank

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks, in float64 (one small collective)."""
        if self.groups is None:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        all_reduce_(t, self.groups.world, "sum")
        return [float(v) for v in t.tolist()]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D ``t`` concatenated in rank order (lengths may differ)."""
        if self.groups is None:
            return t
        t = t.detach().contiguous()
        return C.all_gather(t, self.groups.world, sizes=C.gather_sizes(t.shape[0], self.groups.world))

    def mean(self, values: dict[str, float], summed: tuple[str, ...] = ("nonfinite",)) -> dict[str, float]:
        """Per-rank statistics averaged over the ranks that report each one (a rank whose every
        micro-step was skipped has no loss terms), those named in ``summed`` added up."""
        if self.groups is None:
            return dict(values)
        everyone: list[list[str]] = [[] for _ in range(self.size)]
        torch.distributed.all_gather_object(everyone, sorted(values), group=self.groups.world.pg)
        keys = sorted(set().union(*everyone))
        totals = self.sum([v for k in keys for v in (values.get(k, 0.0), 1.0 if k in values else 0.0)])
        sums, counts = totals[0::2], totals[1::2]
        return {k: sums[i] if k in summed else sums[i] / counts[i] for i, k in enumerate(keys)}

    def token_share(self, tokens: float, took_part: bool) -> float:
        """``tokens x ranks that took part / all their tokens``: a rank's token mean times this,
        averaged over those ranks, is the mean over all their tokens (1.0 in one process)."""
        if self.groups is None:
            return 1.0
        total, ranks = self.sum([tokens if took_part else 0.0, 1.0 if took_part else 0.0])
        return tokens * ranks / total if took_part and total > 0 else 1.0

    def max(self, n: int) -> int:
        """The largest ``n`` over the ranks (e.g. the micro-steps an update takes everywhere)."""
        if self.groups is None:
            return n
        return int(all_reduce_(torch.tensor([float(n)], dtype=torch.float64), self.groups.world, "max"))

    def average_gradients(self, params: Sequence[nn.Parameter], took_part: bool) -> None:
        """Gradients summed over the ranks that had a micro-batch, divided by their count.

        The parameters some rank has a gradient for get one everywhere (zeros where this rank
        computed none), so every rank reduces the same tensors; those no rank has one for keep
        None, so the optimizer leaves them alone as in one process (no weight decay: e.g. the
        critic's unused LM head). A world of one is left as it is.
        """
        if self.groups is None:
            return
        trainable = [p for p in params if p.requires_grad]
        if not took_part:
            for p in trainable:
                p.grad = None
        *has, count = self.sum([float(p.grad is not None) for p in trainable] + [float(took_part)])
        reduced = [p for p, n in zip(trainable, has) if n > 0]
        for p in reduced:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        sync_gradients(reduced, self.groups, expert_ids=set())  # mean over the world
        if reduced and count != self.size:
            torch._foreach_mul_([p.grad for p in reduced], self.size / count)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        return self.sum([1.0 if flag else 0.0])[0] > 0


__all__ = ["DataParallel"]
