"""From a DataConfig to batches: the one entry point trainers call.

    data = build_data(cfg.data)                              # tokenizer + train/eval datasets
    train = data.train_stream(global_batch, dp_rank, dp_size)
    batch = train.next_batch()        # this rank's rows: dict of [global_batch/dp_size, S] tensors
    state = train.state_dict()        # put in the checkpoint; train.load_state_dict(state) resumes
    for batch in data.eval_batches(global_batch, dp_rank, dp_size): ...

Batches per format (labels already shifted, -100 = no loss; see datasets.py):
    text/jsonl/synthetic/sft   input_ids, labels, attention_mask
    preference                 chosen_{input_ids,labels,attention_mask}, rejected_{...}
    prompts                    input_ids, attention_mask (LEFT padded), and the items
                               themselves under "items" (prompt text, answer, JSONL row)

Loss parity over data-parallel sizes needs the loss normalised by the GLOBAL count of
loss tokens (all-reduce ``count_loss_tokens(labels)``), not by each rank's count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from anymoe.core.config import ConfigError
from anymoe.data.collate import collate_lm, collate_preference, collate_prompts
from anymoe.data.config import DataConfig
from anymoe.data.datasets import (
    IGNORE,
    DocumentLMDataset,
    ListDataset,
    PackedLMDataset,
    PreferencePair,
    PromptItem,
    Sample,
    pack_samples,
    preference_pair,
    sft_example,
    token_stream,
)
from anymoe.data.sampler import ShardedSampler
from anymoe.data.sources import read_jsonl, read_text, require_str, seeded_split, split_documents
from anymoe.data.tokenizers import Tokenizer, build_tokenizer


class BatchStream:
    """This rank's training batches, in the seeded global order; resumable."""

    def __init__(self, dataset: Sequence[Any], collate: Callable[[list[Any]], dict[str, Any]],
                 sampler: ShardedSampler) -> None:
        self.dataset, self.collate, self.sampler = dataset, collate, sampler

    def next_batch(self) -> dict[str, Any]:
        return self.collate([self.dataset[i] for i in self.sampler.next_indices()])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


@dataclass
class DataBundle:
    cfg: DataConfig
    tokenizer: Tokenizer
    train: Sequence[Any]
    eval: Sequence[Any]

    @property
    def kind(self) -> str:
        return {"preference": "preference", "prompts": "prompts"}.get(self.cfg.format, "lm")

    def collate(self, rows: list[Any]) -> dict[str, Any]:
        pad = self.tokenizer.pad_id
        if self.kind == "preference":
            return collate_preference(rows, pad)
        if self.kind == "prompts":
            return {**collate_prompts(rows, pad), "items": rows}
        fixed = self.cfg.seq_len if self.cfg.packing and self.cfg.format != "sft" else None
        return collate_lm(rows, pad, fixed)

    def train_stream(self, global_batch: int, dp_rank: int = 0, dp_size: int = 1) -> BatchStream:
        sampler = ShardedSampler(len(self.train), global_batch, dp_rank, dp_size, self.cfg.seed,
                                 self.cfg.shuffle)
        return BatchStream(self.train, self.collate, sampler)

    def eval_batches(self, global_batch: int, dp_rank: int = 0, dp_size: int = 1) -> Iterator[dict[str, Any]]:
        """Every eval sample once, in file order, in global batches cut like training batches.

        A short last batch is filled up to a multiple of dp_size, so every rank runs the same
        number of batches (no collective hangs). Filler rows carry no loss (labels all -100), so
        a loss summed over ranks is the same for any dp_size; every batch also has ``row_valid``
        [B] (bool, False on filler rows) for per-row metrics (reward accuracy, prompt rewards).
        """
        if global_batch % dp_size:
            raise ConfigError("global_batch", f"{global_batch} is not divisible by {dp_size} ranks")
        n = len(self.eval)
        for start in range(0, n, global_batch):
            rows = [self.eval[i] for i in range(start, min(n, start + global_batch))]
            n_real = len(rows)
            while len(rows) % dp_size:
                rows.append(self._filler(rows[0]))
            per = len(rows) // dp_size
            lo = dp_rank * per
            batch = self.collate(rows[lo:lo + per])
            batch["row_valid"] = torch.arange(lo, lo + per) < n_real
            yield batch

    def _filler(self, like: Any) -> Any:
        if self.kind == "lm":
            return Sample([self.tokenizer.pad_id] * len(like.input_ids), [IGNORE] * len(like.input_ids))
        if self.kind == "preference":  # a real pair's shape, no loss tokens; row_valid marks it
            blank = [IGNORE] * len(like.chosen.labels), [IGNORE] * len(like.rejected.labels)
            return PreferencePair(like.prompt, Sample(like.chosen.input_ids, blank[0]),
                                  Sample(like.rejected.input_ids, blank[1]))
        return like  # a prompt: the caller skips it through row_valid


def _documents(cfg: DataConfig, paths: list[str], field: str) -> list[str]:
    if cfg.format == "synthetic":
        # Imported here so `python -m anymoe.data.synthetic` does not find itself already imported.
        from anymoe.data.synthetic import generate_corpus

        return split_documents(generate_corpus(cfg.seed, cfg.synthetic_bytes))
    docs: list[str] = []
    for i, path in enumerate(paths):
        where = field if len(paths) == 1 else f"{field}[{i}]"
        if cfg.format == "text":
            docs.extend(split_documents(read_text(path, where)))
        else:
            docs.extend(require_str(row, cfg.text_key, f"{path}:{n}", "data.text_key")
                        for n, row in enumerate(read_jsonl(path, where), 1))
    return docs


def _rows(cfg: DataConfig, paths: list[str], field: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i, path in enumerate(paths):
        where = field if len(paths) == 1 else f"{field}[{i}]"
        out.extend((f"{path}:{n}", row) for n, row in enumerate(read_jsonl(path, where), 1))
    return out


def split_prompt(cfg: DataConfig, row: dict[str, Any], where: str, response_key: str) -> tuple[str, str]:
    """(prompt, response) of a row by ``prompt_split``: two fields, or a separator in text_key."""
    if cfg.prompt_split == "keys":
        return (require_str(row, cfg.input_key, where, "data.input_key"),
                require_str(row, response_key, where, f"data.{_key_field(cfg, response_key)}"))
    text = require_str(row, cfg.text_key, where, "data.text_key")
    cut = text.find(cfg.prompt_split)
    if cut < 0:
        raise ConfigError("data.prompt_split", f"{where}: separator {cfg.prompt_split!r} not found in field "
                                               f"{cfg.text_key!r}; fix the row or the separator")
    cut += len(cfg.prompt_split)
    return text[:cut], text[cut:]


def _key_field(cfg: DataConfig, key: str) -> str:
    for name in ("output_key", "chosen_key", "rejected_key"):
        if getattr(cfg, name) == key:
            return name
    return "output_key"


def _lm_dataset(cfg: DataConfig, tok: Tokenizer, docs: list[str]) -> Sequence[Sample]:
    ids = tok.encode_batch(docs)
    if cfg.packing:
        return PackedLMDataset(token_stream(ids, tok.eos_id), cfg.seq_len)
    return DocumentLMDataset(ids, tok.eos_id, cfg.seq_len)


def _sft_dataset(cfg: DataConfig, tok: Tokenizer, rows: list[tuple[str, dict]]) -> Sequence[Sample]:
    samples = []
    for where, row in rows:
        prompt, response = split_prompt(cfg, row, where, cfg.output_key)
        s = sft_example(tok.encode(prompt), tok.encode(response), tok.eos_id, cfg.seq_len)
        if s is not None:  # prompt alone fills seq_len: nothing to learn from this row
            samples.append(s)
    return ListDataset(pack_samples(samples, cfg.seq_len) if cfg.packing else samples)


def _preference_dataset(cfg: DataConfig, tok: Tokenizer, rows: list[tuple[str, dict]]) -> Sequence[Any]:
    pairs = []
    for where, row in rows:
        prompt = require_str(row, cfg.input_key, where, "data.input_key")
        chosen = require_str(row, cfg.chosen_key, where, "data.chosen_key")
        rejected = require_str(row, cfg.rejected_key, where, "data.rejected_key")
        pair = preference_pair(tok, prompt, chosen, rejected, cfg.seq_len)
        if pair is not None:
            pairs.append(pair)
    return ListDataset(pairs)


def _prompt_dataset(cfg: DataConfig, tok: Tokenizer, rows: list[tuple[str, dict]]) -> Sequence[Any]:
    items = []
    for where, row in rows:
        if cfg.prompt_split == "keys":
            prompt = require_str(row, cfg.input_key, where, "data.input_key")
        else:
            prompt, _ = split_prompt(cfg, row, where, cfg.output_key)
        answer = row.get(cfg.answer_key)
        ids = tok.encode(prompt)[-cfg.seq_len:]  # keep the end: generation continues from it
        items.append(PromptItem(prompt, ids, None if answer is None else str(answer), row))
    return ListDataset(items)


def build_data(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> DataBundle:
    """Read, tokenize and split the data of ``cfg`` (all on this process; deterministic)."""
    tok = tokenizer if tokenizer is not None else build_tokenizer(cfg.tokenizer)
    if cfg.format in ("text", "jsonl", "synthetic"):
        docs = _documents(cfg, cfg.paths, "data.path")
        if cfg.eval_file is not None:
            train_docs, eval_docs = docs, _documents(cfg, [cfg.eval_file], "data.eval_split")
        else:
            train_docs, eval_docs = seeded_split(docs, cfg.eval_fraction, cfg.seed)
        train, evals = _lm_dataset(cfg, tok, train_docs), _lm_dataset(cfg, tok, eval_docs)
    else:
        make = {"sft": _sft_dataset, "preference": _preference_dataset,
                "prompts": _prompt_dataset}[cfg.format]
        rows = _rows(cfg, cfg.paths, "data.path")
        if cfg.eval_file is not None:
            train_rows, eval_rows = rows, _rows(cfg, [cfg.eval_file], "data.eval_split")
        else:
            train_rows, eval_rows = seeded_split(rows, cfg.eval_fraction, cfg.seed)
        train, evals = make(cfg, tok, train_rows), make(cfg, tok, eval_rows)
    if len(train) == 0:
        raise ConfigError("data.path", f"no complete training sample of seq_len {cfg.seq_len} in the data; "
                                       "give more data or lower data.seq_len")
    return DataBundle(cfg, tok, train, evals)


__all__ = ["BatchStream", "DataBundle", "build_data", "split_prompt"]
