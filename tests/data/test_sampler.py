"""The sample order: seed-only, DP-size invariant (union of shards == global batch), resumable."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anymoe.core.config import ConfigError
from anymoe.data.sampler import ShardedSampler, epoch_order


def reference_stream(n, seed, steps, global_batch, shuffle=True):
    """Plain reference: list whole epochs end to end, then cut into global batches."""
    flat = []
    epoch = 0
    while len(flat) < steps * global_batch:
        flat.extend(epoch_order(n, seed, epoch, shuffle).tolist())
        epoch += 1
    return [flat[k * global_batch:(k + 1) * global_batch] for k in range(steps)]


def test_epoch_order_is_a_permutation_and_depends_on_seed_and_epoch():
    a = epoch_order(50, 3, 0)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_order(50, 3, 0))
    assert not np.array_equal(a, epoch_order(50, 4, 0))
    assert not np.array_equal(a, epoch_order(50, 3, 1))
    assert epoch_order(5, 3, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n, gb", [(37, 8), (8, 8), (5, 4), (100, 12)])
def test_union_of_shards_is_the_global_batch_for_every_world_size(n, gb):
    steps = 3 * n // gb + 2  # crosses several epoch boundaries
    ref = reference_stream(n, 7, steps, gb)
    for dp in (1, 2, 4):
        if gb % dp:
            continue
        samplers = [ShardedSampler(n, gb, r, dp, seed=7) for r in range(dp)]
        for k in range(steps):
            shards = [s.next_indices() for s in samplers]
            assert all(len(sh) == gb // dp for sh in shards)
            assert sum(shards, []) == ref[k], (dp, k)  # rank-order concatenation is the global batch


def test_every_epoch_sees_each_sample_once():
    s = ShardedSampler(24, 6, seed=1)
    seen = sum((s.next_indices() for _ in range(4)), [])
    assert sorted(seen) == list(range(24)) and s.state_dict()["epoch"] == 1


@pytest.mark.parametrize("stop, dp_before, dp_after", [(3, 1, 1), (5, 2, 2), (4, 2, 4), (7, 4, 1)])
def test_resume_continues_the_exact_stream(stop, dp_before, dp_after):
    n, gb, total = 29, 8, 12
    ref = reference_stream(n, 11, total, gb)
    before = [ShardedSampler(n, gb, r, dp_before, seed=11) for r in range(dp_before)]
    for k in range(stop):
        assert sum((s.next_indices() for s in before), []) == ref[k]
    states = [s.state_dict() for s in before]
    assert all(st == states[0] for st in states)  # the state is global: any rank's copy resumes any rank
    after = [ShardedSampler(n, gb, r, dp_after, seed=11) for r in range(dp_after)]
    for s in after:
        s.load_state_dict(dict(states[0]))
    for k in range(stop, total):
        assert sum((s.next_indices() for s in after), []) == ref[k]


def test_resume_refuses_other_data_settings():
    s = ShardedSampler(10, 2, seed=1)
    s.next_indices()
    with pytest.raises(ConfigError) as info:
        ShardedSampler(10, 2, seed=2).load_state_dict(s.state_dict())
    assert info.value.field == "data.seed"
    with pytest.raises(ConfigError) as info:
        ShardedSampler(11, 2, seed=1).load_state_dict(s.state_dict())
    assert info.value.field == "data.path"


def test_bad_batch_and_group():
    with pytest.raises(ConfigError, match="multiple of 4") as info:
        ShardedSampler(10, 6, 0, 4)
    assert info.value.field == "global_batch"
    with pytest.raises(ConfigError) as info:
        ShardedSampler(0, 4)
    assert info.value.field == "data.path"
    with pytest.raises(ValueError):
        ShardedSampler(10, 4, 2, 2)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), per_rank=st.integers(1, 5), dp=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 2**31), steps=st.integers(1, 12), data=st.data())
def test_property_shards_and_resume(n, per_rank, dp, seed, steps, data):
    gb = per_rank * dp
    ref = reference_stream(n, seed, steps, gb)
    stop = data.draw(st.integers(0, steps))
    ranks = [ShardedSampler(n, gb, r, dp, seed=seed) for r in range(dp)]
    for k in range(stop):
        assert sum((s.next_indices() for s in ranks), []) == ref[k]
    state = ranks[0].state_dict()
    resumed = ShardedSampler(n, gb, 0, 1, seed=seed)
    resumed.load_state_dict(state)
    for k in range(stop, steps):
        assert resumed.next_indices() == ref[k]
