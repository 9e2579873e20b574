"""Key/value cache for incremental decoding.

One entry per attention layer holding the keys and values of every position seen so far,
[B, G, L, Dh], grown by concatenation. Generation (``generate.py``) feeds the prompt once,
then one token per step; attention reads the cached keys instead of recomputing them.
Legend: B batch, G key/value heads, L cached length, Dh head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer cached keys and values; ``length`` is the number of cached positions."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        first = self.keys[0] if self.keys else None
        return 0 if first is None else int(first.shape[2])

    def update(self, layer: int, k_BGSD: Tensor, v_BGSD: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's keys/values for ``layer``; return all of them, [B, G, L, Dh]."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k_BGSD, v_BGSD
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k_BGSD], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v_BGSD], dim=2)
        return self.keys[layer], self.values[layer]

    def select(self, rows: Tensor) -> None:
        """Keep only batch rows ``rows`` (drop finished sequences, reorder beams)."""
        self.keys = [None if k is None else k.index_select(0, rows) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, rows) for v in self.values]


__all__ = ["KVCache"]
