"""The sample order: seeded, the same for every device and world size, sharded, resumable.

Why it is built this way (loss parity): a DP=1 run and a DP=N run must train on exactly the
same global batch at every step. So the order is defined once, globally, and ranks only cut
it up:

    epoch e's order   = a permutation of range(N) from numpy's PCG64 seeded with (seed, e)
    the global stream = order(0) ++ order(1) ++ ...        (batches may straddle epochs)
    global batch k    = stream[k*G : (k+1)*G]
    rank r of D       = global batch k [r*G/D : (r+1)*G/D]   (contiguous; concatenating the
                        ranks' rows in rank order gives the global batch back, in order)

Worked example, N=5, G=4, seed order(0) = [3 0 4 1 2], order(1) = [1 4 2 0 3]:
    batch 0 = [3 0 4 1]          D=2: rank0 [3 0], rank1 [4 1]
    batch 1 = [2 | 1 4 2]        (epoch 0's last sample, then epoch 1's first three)
The state (epoch, position) is global, not per rank, so a checkpoint taken with D=2 resumes
under D=4 with the same stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from anymoe.core.config import ConfigError


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of one epoch: a function of (num_samples, seed, epoch) only."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    return rng.permutation(num_samples).astype(np.int64)


class ShardedSampler:
    """Yields this rank's sample indices of each global batch; state = (epoch, position)."""

    def __init__(self, num_samples: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ConfigError("data.path", "the data holds no complete sample; give more text or a shorter "
                                           "data.seq_len")
        if global_batch < 1:
            raise ConfigError("global_batch", f"must be >= 1; got {global_batch}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in a data-parallel group of {dp_size}")
        if global_batch % dp_size:
            raise ConfigError("global_batch", f"{global_batch} rows cannot be split evenly over {dp_size} "
                                              f"data-parallel ranks; use a multiple of {dp_size}")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.dp_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = epoch_order(self.num_samples, self.seed, epoch, self.shuffle)
            self._order_epoch = epoch
        return self._order

    def next_global(self) -> list[int]:
        """The next global batch (every rank computes the same one) and advance the state."""
        out: list[int] = []
        while len(out) < self.global_batch:
            order = self._epoch_order(self.epoch)
            take = min(self.global_batch - len(out), self.num_samples - self.position)
            out.extend(int(i) for i in order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def next_indices(self) -> list[int]:
        """This rank's contiguous share of the next global batch."""
        batch = self.next_global()
        lo = self.dp_rank * self.local_batch
        return batch[lo:lo + self.local_batch]

    def __iter__(self):
        while True:
            yield self.next_indices()

    # ---- checkpoint state ----
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_samples", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                field = {"seed": "data.seed", "shuffle": "data.shuffle"}.get(key, "data.path")
                raise ConfigError(field, f"the checkpoint's data {key} is {state[key]!r} but this run's is "
                                         f"{getattr(self, key)!r}; resume with the same data settings")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_samples:
            raise ValueError(f"corrupt data state: epoch {epoch}, position {position} of {self.num_samples}")
        self.epoch, self.position = epoch, position


__all__ = ["ShardedSampler", "epoch_order"]
