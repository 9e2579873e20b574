"""Token datasets: packed LM rows, one-document rows, SFT rows, preference pairs, RL prompts.

Label convention (the trainer relies on it): labels are ALREADY SHIFTED here.
``labels[t]`` is the token that should follow ``input_ids[:t+1]``, so the loss is plain
``cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)`` with no shift in
the model or trainer. ``-100`` (IGNORE) marks positions without a loss: padding, and the
prompt of an SFT example.

Packing (pretraining): every document's tokens followed by eos form one stream; row i is
``stream[i*S : i*S + S + 1]`` split into inputs ``[:-1]`` and labels ``[1:]`` (stride S, so
no token is lost). Worked example, S=4, docs "ab" "cde" (bytes; E = eos):

    stream        a b E c d e E
    row 0  input  a b E c    labels  b E c d
    (7 tokens make (7 - 1) // 4 = 1 row; the tail "e E" is too short for a row and is
    dropped: at most seq_len tokens of the whole stream are lost)

Attention is not blocked across documents inside a row (GPT-2/Megatron style); the eos
between them marks the boundary. SFT rows (worked example in :func:`sft_example`) mask the
prompt: only the response and its eos are learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from anymoe.data.tokenizers import Tokenizer

IGNORE = -100


@dataclass(frozen=True)
class Sample:
    """One training row before padding: equal-length inputs and (shifted) labels."""

    input_ids: Sequence[int]
    labels: Sequence[int]


def token_stream(docs: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """Documents joined into one stream with eos after each (the document boundary)."""
    total = sum(len(d) + 1 for d in docs)
    out = np.empty(total, dtype=np.int64)
    pos = 0
    for d in docs:
        out[pos:pos + len(d)] = d
        out[pos + len(d)] = eos_id
        pos += len(d) + 1
    return out


class PackedLMDataset:
    """Fixed-length rows cut from the document stream (see the module docstring)."""

    def __init__(self, stream: np.ndarray, seq_len: int) -> None:
        self.stream, self.seq_len = stream, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(i)
        chunk = self.stream[i * self.seq_len: i * self.seq_len + self.seq_len + 1]
        return Sample(chunk[:-1], chunk[1:])


class DocumentLMDataset:
    """Packing off: one document (+ eos) per row, truncated to seq_len; padding is added at collate."""

    def __init__(self, docs: Sequence[Sequence[int]], eos_id: int, seq_len: int) -> None:
        self.rows = [np.asarray(list(d) + [eos_id], dtype=np.int64)[:seq_len + 1] for d in docs if len(d)]
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:
        row = self.rows[i]
        return Sample(row[:-1], row[1:])


def sft_example(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int,
                seq_len: int) -> Sample | None:
    """Prompt + response + eos, prompt masked from the loss; None if no response token fits.

    Worked example (S >= 5): prompt [p1 p2], response [r1 r2], eos E.
        full    p1 p2 r1 r2 E
        input   p1 p2 r1 r2          labels  -100 r1 r2 E
    Position 0 predicts p2 (a prompt token): masked. Position 1 (p2) predicts r1: learned.
    """
    full = list(prompt_ids) + list(response_ids) + [eos_id]
    full = full[:seq_len + 1]
    n_prompt = len(prompt_ids)
    labels = [tok if t + 1 >= n_prompt else IGNORE for t, tok in enumerate(full[1:])]
    if all(lab == IGNORE for lab in labels):
        return None
    return Sample(full[:-1], labels)


def pack_samples(samples: Sequence[Sample], seq_len: int) -> list[Sample]:
    """Greedy first-fit in order: whole samples concatenated while they fit in seq_len.

    Labels keep each sample's mask. No label crosses a boundary: a sample's last label is its
    own eos, and the next sample's first position predicts that sample's second token. A
    sample longer than seq_len cannot occur (sft_example truncates); one that does not fit in
    the current row starts the next row.
    """
    out: list[Sample] = []
    ids: list[int] = []
    labels: list[int] = []
    for s in samples:
        if ids and len(ids) + len(s.input_ids) > seq_len:
            out.append(Sample(ids, labels))
            ids, labels = [], []
        ids.extend(int(t) for t in s.input_ids)
        labels.extend(int(t) for t in s.labels)
    if ids:
        out.append(Sample(ids, labels))
    return out


class ListDataset:
    """A list of samples (SFT rows, packed SFT rows)."""

    def __init__(self, samples: Sequence[Any]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Any:
        return self.samples[i]


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred and a rejected response, each a full SFT-style Sample."""

    prompt: str
    chosen: Sample
    rejected: Sample


@dataclass(frozen=True)
class PromptItem:
    """An RL prompt: its text, tokens (no eos: generation continues it) and its JSONL row."""

    prompt: str
    prompt_ids: Sequence[int]
    answer: str | None
    row: dict[str, Any]


def preference_pair(tok: Tokenizer, prompt: str, chosen: str, rejected: str,
                    seq_len: int) -> PreferencePair | None:
    p = tok.encode(prompt)
    c = sft_example(p, tok.encode(chosen), tok.eos_id, seq_len)
    r = sft_example(p, tok.encode(rejected), tok.eos_id, seq_len)
    if c is None or r is None:
        return None
    return PreferencePair(prompt, c, r)


__all__ = ["IGNORE", "DocumentLMDataset", "ListDataset", "PackedLMDataset", "PreferencePair", "PromptItem",
           "Sample", "pack_samples", "preference_pair", "sft_example", "token_stream"]
