"""A training step's loss and MoE statistics, kept on the device and read to the host once.

Any host read (``float(t)``, ``t.cpu()``, ``t.item()``) waits for all work queued before it.
Reading the cross-entropy, the aux loss, every layer's named losses, loads, router entropy and
drops after each micro-batch's forward left the device idle between forward and backward
while the host caught up, once per micro-batch. Here a micro-batch only appends one float64
row on the device; :meth:`MicroBatchStats.read` stacks the rows (plus any extra scalars, e.g.
the squared gradient norms), copies them to the host in one transfer, and then sums them with
the same host arithmetic, in the same order, as the per-micro-batch reads did. The casts to
float64 are exact for every value logged (fp32/bf16 losses, integer loads and drops), so each
metric is bit-identical to reading it right away.

Row layout of one micro-batch: [CE sum, aux loss, then per MoE layer: its named losses (in
the layer's order), router entropy, dropped pairs, tokens per expert (E values)].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from anymoe.trainers.transfer import to_host_later

Reduce = Callable[[Tensor], Tensor]  # e.g. a data-parallel all-reduce sum of the stacked rows


def entropy_on_device(router_probs_TE: Tensor) -> Tensor:
    """Mean over tokens of -sum p log p (nats) as a float64 device scalar (no host read;
    anymoe.trainers.metrics.router_entropy is this, read to the host)."""
    p = router_probs_TE.detach().double().clamp_min(1e-30)
    if not p.numel():
        return p.new_zeros(())
    return -(p * p.log()).sum(-1).mean()


@dataclass
class StepStats:
    """The host-side sums of one step (what the trainer logs)."""

    ce_sum: Tensor  # float64 scalar on the host: CE summed over this rank's micro-batches
    aux_total: float  # mean over micro-batches of the model's weighted aux loss
    aux_sums: dict[str, float]  # per loss name: sum over layers of the mean over micro-batches
    layer_loads: list[Tensor] | None  # per MoE layer: tokens per expert, summed (float64)
    layer_extra: list[dict[str, float]] = field(default_factory=list)  # entropy (mean), dropped (sum)
    extra: list[float] = field(default_factory=list)  # the extra scalars handed to read()


class MicroBatchStats:
    """Collects one device row per micro-batch; see the module docstring."""

    def __init__(self, accum: int) -> None:
        self.accum = accum
        self.rows: list[Tensor] = []
        self.layout: list[tuple[tuple[str, ...], int]] | None = None

    def add(self, ce: Tensor, out: Any) -> None:
        """Record a micro-batch: its summed CE and the model's ModelOutput (aux records).

        Call right after the forward: the row is a fresh tensor, so graph outputs that a later
        CUDA-graph replay overwrites are no longer needed."""
        parts = [ce.detach().double().reshape(1), out.aux_loss.detach().double().reshape(1)]
        layout = []
        for aux in out.moe_aux:
            parts += [value.detach().double().reshape(1) for value in aux.losses.values()]
            parts += [entropy_on_device(aux.router_probs).reshape(1),
                      aux.dropped.detach().double().reshape(1),
                      aux.tokens_per_expert.detach().double().reshape(-1)]
            layout.append((tuple(aux.losses), aux.tokens_per_expert.numel()))
        assert self.layout in (None, layout), (self.layout, layout)  # same model every micro-batch
        self.layout = layout
        self.rows.append(torch.cat(parts))

    def read(self, extra: Sequence[Tensor] = (), reduce: Reduce | None = None) -> StepStats:
        """One host transfer of every row and ``extra`` scalar, then the per-step sums."""
        return self.fetch(extra, reduce).summarize()

    def fetch(self, extra: Sequence[Tensor] = (), reduce: Reduce | None = None) -> HostRows:
        """The one host transfer, without the per-layer sums (``HostRows.summarize``): a trainer
        reads the loss and ``extra`` (the gradient norm), queues the optimizer step, then sums
        while the device runs it. Summing first left an H100 idle for 3 ms a step (moe-1b)."""
        return self.fetch_later(extra, reduce)()

    def fetch_later(self, extra: Sequence[Tensor] = (),
                    reduce: Reduce | None = None) -> Callable[[], HostRows]:
        """``fetch``, started now and finished by the returned call, which waits for the work queued
        before this call only: a trainer queues its optimizer step in between, and then sums while
        the device runs it, as after ``fetch``. ``reduce`` (e.g. a data-parallel all-reduce sum) is
        applied to the stacked rows on the device first, so the host sums are over every rank's rows
        with no collective of host tensors (which would wait for the queued step)."""
        assert self.rows and self.layout is not None, "fetch() before any add()"
        rows = torch.stack(self.rows).reshape(-1)
        rows = reduce(rows) if reduce is not None else rows
        flat = [rows] + [t.detach().double().reshape(1) for t in extra]
        wait = to_host_later(torch.cat(flat))
        width, n = self.rows[0].numel(), len(self.rows)

        def finish() -> HostRows:
            host = wait()
            return HostRows(self, host[:width * n].view(n, width), host[width * n:].tolist())

        return finish

    def ce_sum_on_device(self) -> Tensor:
        """This rank's CE summed over its micro-batches on the device: ``StepStats.ce_sum``'s float64
        additions in its order, so the same value, before any host read."""
        total = self.rows[0].new_zeros(())
        for row in self.rows:
            total = total + row[0]
        return total

    def _accumulate(self, stats: StepStats, row: Tensor) -> None:
        stats.ce_sum += row[0]
        stats.aux_total += float(row[1]) / self.accum
        i = 2
        for layer_i, (names, n_experts) in enumerate(self.layout or []):
            for name in names:
                stats.aux_sums[name] = stats.aux_sums.get(name, 0.0) + float(row[i]) / self.accum
                i += 1
            entropy, dropped, load = row[i], row[i + 1], row[i + 2:i + 2 + n_experts]
            i += 2 + n_experts
            if stats.layer_loads is None:
                stats.layer_loads = [torch.zeros(n, dtype=torch.float64) for _, n in self.layout or []]
                stats.layer_extra = [{"entropy": 0.0, "dropped": 0.0} for _ in self.layout or []]
            stats.layer_loads[layer_i] += load
            stats.layer_extra[layer_i]["entropy"] += float(entropy) / self.accum
            stats.layer_extra[layer_i]["dropped"] += float(dropped)


@dataclass
class HostRows:
    """A step's rows on the host (``MicroBatchStats.fetch``), before the per-layer sums."""

    source: MicroBatchStats
    rows: Tensor  # [micro-batches, row width] float64
    extra: list[float]  # the extra scalars handed to fetch(), in order

    def summarize(self) -> StepStats:
        stats = StepStats(ce_sum=torch.zeros((), dtype=torch.float64), aux_total=0.0, aux_sums={},
                          layer_loads=None, extra=self.extra)
        for row in self.rows:
            self.source._accumulate(stats, row)
        return stats


__all__ = ["HostRows", "MicroBatchStats", "StepStats", "entropy_on_device"]
