"""MicroBatchStats (one host read per step) against the per-micro-batch host reads it replaced:
every sum bit-identical, on fresh random values, several layers and loss names."""

from types import SimpleNamespace

import pytest
import torch

from anymoe.trainers.metrics import router_entropy
from anymoe.trainers.step_stats import MicroBatchStats, entropy_on_device


def _fake_output(gen, layers=3, experts=5, tokens=7, names=("aux_loss", "z_loss")):
    auxes = []
    for _ in range(layers):
        probs = torch.softmax(torch.randn(tokens, experts, generator=gen), -1)
        auxes.append(SimpleNamespace(
            losses={n: torch.rand((), generator=gen) for n in names},  # fp32, as the layers give them
            router_probs=probs,
            tokens_per_expert=torch.randint(0, 9, (experts,), generator=gen).float(),
            dropped=torch.randint(0, 4, (), generator=gen)))
    return SimpleNamespace(aux_loss=torch.rand((), generator=gen), moe_aux=auxes)


def _reference(items, accum):
    """The old train_step's per-micro-batch reads, verbatim in arithmetic and order."""
    ce_sum = torch.zeros((), dtype=torch.float64)
    aux_sums, aux_total, loads, extra = {}, 0.0, None, []
    for ce, out in items:
        ce_sum += ce.detach().double().cpu()
        aux_total += float(out.aux_loss.detach()) / accum
        for i, aux in enumerate(out.moe_aux):
            for name, value in aux.losses.items():
                aux_sums[name] = aux_sums.get(name, 0.0) + float(value.detach()) / accum
            load = aux.tokens_per_expert.detach().double().cpu()
            if loads is None:
                loads = [torch.zeros_like(load) for _ in out.moe_aux]
                extra = [{"entropy": 0.0, "dropped": 0.0} for _ in out.moe_aux]
            loads[i] += load
            extra[i]["entropy"] += router_entropy(aux.router_probs) / accum
            extra[i]["dropped"] += float(aux.dropped)
    return ce_sum, aux_total, aux_sums, loads, extra


@pytest.mark.parametrize("accum", [1, 3])
def test_one_read_equals_reading_every_micro_batch(accum):
    gen = torch.Generator().manual_seed(accum)
    items = [(torch.rand((), generator=gen) * 100, _fake_output(gen)) for _ in range(accum)]
    stats = MicroBatchStats(accum)
    for ce, out in items:
        stats.add(ce, out)
    extra_in = [torch.tensor(2.5, dtype=torch.float64), torch.tensor(0.125, dtype=torch.float64)]
    got = stats.read(extra_in)
    ce_sum, aux_total, aux_sums, loads, extra = _reference(items, accum)
    assert got.ce_sum.item() == ce_sum.item()  # exact, not approximate
    assert got.aux_total == aux_total and got.aux_sums == aux_sums and got.layer_extra == extra
    assert len(got.layer_loads) == len(loads)
    for a, b in zip(got.layer_loads, loads):
        assert torch.equal(a, b)
    assert got.extra == [2.5, 0.125]
    # the split read: loss and extra first (before the optimizer step), the per-layer sums after
    host = stats.fetch(extra_in)
    assert host.extra == [2.5, 0.125] and host.summarize().ce_sum.item() == ce_sum.item()
    later = host.summarize()
    assert later.aux_total == aux_total and later.aux_sums == aux_sums and later.layer_extra == extra
    assert all(torch.equal(a, b) for a, b in zip(later.layer_loads, loads))
    # started before the optimizer step is queued, finished after; the CE sum also on the device
    finish = stats.fetch_later(extra_in)
    late = finish()
    assert late.extra == host.extra and torch.equal(late.rows, host.rows)
    assert stats.ce_sum_on_device().item() == ce_sum.item()  # the same additions in the same order


def test_no_moe_layers_and_non_finite_values():
    out = SimpleNamespace(aux_loss=torch.zeros(()), moe_aux=[])
    stats = MicroBatchStats(2)
    stats.add(torch.tensor(float("nan")), out)
    stats.add(torch.tensor(1.0), out)
    got = stats.read()
    assert got.layer_loads is None and got.aux_sums == {} and got.extra == []
    assert got.ce_sum.isnan() and stats.ce_sum_on_device().isnan()


def test_entropy_on_device_is_router_entropy():
    probs = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), -1)
    assert entropy_on_device(probs).item() == router_entropy(probs)
    assert entropy_on_device(torch.zeros(0, 4)).item() == router_entropy(torch.zeros(0, 4)) == 0.0
