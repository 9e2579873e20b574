"""Rows -> batch tensors [B, S]: right padding for training, left padding for generation.

Training batches pad on the right (pad id in inputs, -100 in labels, 0 in attention_mask),
so every real token keeps its position. Generation prompts pad on the LEFT, so the last
column of every row is the row's last prompt token and generation appends to all rows at
once; the model derives positions from attention_mask (left pads get no position).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from anymoe.data.datasets import IGNORE, PreferencePair, PromptItem, Sample


def _pad_to(rows: Sequence[Sequence[int]], value: int, length: int, left: bool = False) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        if n > length:
            raise ValueError(f"row {b} has {n} tokens, more than the batch length {length}")
        if n:
            t = torch.as_tensor(np.asarray(row, dtype=np.int64))
            if left:
                out[b, length - n:] = t
            else:
                out[b, :n] = t
    return out


def collate_lm(samples: Sequence[Sample], pad_id: int, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids, labels (shifted, -100 = no loss), attention_mask: all [B, S], right padded.

    ``seq_len`` fixes S (same shape every step: steadier memory, compile-friendly); default
    the longest row.
    """
    length = seq_len if seq_len is not None else max((len(s.input_ids) for s in samples), default=0)
    ids = _pad_to([s.input_ids for s in samples], pad_id, length)
    labels = _pad_to([s.labels for s in samples], IGNORE, length)
    mask = _pad_to([[1] * len(s.input_ids) for s in samples], 0, length)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_preference(pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """chosen_* and rejected_* (input_ids, labels, attention_mask), one common S so they can be
    concatenated into a [2B, S] forward (chosen rows first, as DPO implementations do)."""
    length = max(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs)
    out = {}
    for side in ("chosen", "rejected"):
        part = collate_lm([getattr(p, side) for p in pairs], pad_id, length)
        out.update({f"{side}_{k}": v for k, v in part.items()})
    return out


def collate_prompts(items: Sequence[PromptItem] | Sequence[Sequence[int]],
                    pad_id: int) -> dict[str, torch.Tensor]:
    """Generation prompts, LEFT padded: input_ids and attention_mask [B, S]."""
    rows = [it.prompt_ids if isinstance(it, PromptItem) else it for it in items]
    length = max((len(r) for r in rows), default=0)
    return {"input_ids": _pad_to(rows, pad_id, length, left=True),
            "attention_mask": _pad_to([[1] * len(r) for r in rows], 0, length, left=True)}


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss; for DP parity divide the summed loss by the GLOBAL count."""
    return int((labels != IGNORE).sum())


__all__ = ["collate_lm", "collate_preference", "collate_prompts", "count_loss_tokens"]
