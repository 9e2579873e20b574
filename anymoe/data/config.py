"""DataConfig: where the training text comes from and how it becomes token sequences.

One frozen dataclass, loaded by ``anymoe.core.config.load_config`` under the ``data:`` key.
Everything that can be checked without reading the data is checked at load, before any
model is built: a missing file or an unreadable tokenizer directory is a ``ConfigError``
naming the field and the fix, not a stack trace ten minutes into a run. Nothing here ever
downloads: files are local paths, or ``shipped:NAME`` for the files anymoe ships in
``anymoe/data/shipped/`` (found wherever the package is installed).

The names follow OpenRLHF where it has them (``input_key``, ``output_key``, ``eval_split``,
``prompt_split`` plays the role of its ``input_template``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from anymoe.core.config import ConfigError, param

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
SHIPPED_PREFIX = "shipped:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")

Format = Literal["text", "jsonl", "sft", "synthetic", "preference", "prompts"]


def resolve_path(path: str) -> Path:
    """A config path as a filesystem path: ``shipped:NAME`` is a file anymoe ships."""
    if path.startswith(SHIPPED_PREFIX):
        return SHIPPED_DIR / path[len(SHIPPED_PREFIX):]
    return Path(path).expanduser()


def _check_file(path: str, field: str) -> None:
    p = resolve_path(path)
    if not p.exists():
        shipped = ", ".join(sorted(f"shipped:{f.name}" for f in SHIPPED_DIR.glob("*") if f.is_file()))
        raise ConfigError(field, f"data file {path!r} does not exist ({p.resolve()}); give a local file "
                                 f"path (relative to the working directory) or one of: {shipped}")
    if not p.is_file():
        raise ConfigError(field, f"{path!r} is a directory, not a file; list the files themselves")
    if not os.access(p, os.R_OK):
        raise ConfigError(field, f"data file {path!r} is not readable; fix its permissions")


@dataclass(frozen=True)
class DataConfig:
    """Training (and evaluation) data: files, format, tokenizer, sequence shaping, order."""

    format: Format = param("text", doc="text: plain text files (documents separated by a blank line); "
                                       "jsonl: one {text_key: ...} per line; sft: prompt/response JSONL; "
                                       "synthetic: the built-in English-like corpus made from `seed`; "
                                       "preference: prompt/chosen/rejected JSONL; prompts: RL prompts JSONL")
    path: str | list[str] = param("shipped:tiny_corpus.txt",
                                  doc="data file or list of files (shipped:NAME = a file anymoe ships)")
    seq_len: int = param(128, ge=2, doc="tokens per training sequence")
    tokenizer: str = param("bytes", doc="'bytes' (UTF-8 bytes + pad/bos/eos, no files) or a local "
                                        "Hugging Face tokenizer directory")
    packing: bool = param(True, doc="pack documents (eos between them) into full seq_len rows; "
                                    "off: one document per row, right-padded")
    eval_split: float | str = param(0.0, doc="held-out fraction in [0, 1) of the samples, or the path of "
                                             "an eval file in the same format")
    prompt_split: str = param("keys", doc="how prompt and response are separated: 'keys' (input_key / "
                                          "output_key fields) or a separator string inside text_key; the "
                                          "separator ends the prompt")
    input_key: str = param("prompt", doc="JSONL field of the prompt (sft, preference, prompts)")
    output_key: str = param("response", doc="JSONL field of the response (sft)")
    text_key: str = param("text", doc="JSONL field of the document (jsonl; sft with a separator)")
    chosen_key: str = param("chosen", doc="JSONL field of the preferred response (preference)")
    rejected_key: str = param("rejected", doc="JSONL field of the rejected response (preference)")
    answer_key: str = param("answer", doc="JSONL field of the reference answer (prompts; optional per row)")
    shuffle: bool = param(True, doc="shuffle samples each epoch (order depends only on `seed`)")
    seed: int = param(0, ge=0, doc="data order seed; the same on every backend and world size")
    synthetic_bytes: int = param(1_000_000, ge=1000, le=50_000_000,
                                 doc="size of the corpus made for format 'synthetic'")

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @property
    def eval_file(self) -> str | None:
        return self.eval_split if isinstance(self.eval_split, str) else None

    @property
    def eval_fraction(self) -> float:
        return 0.0 if isinstance(self.eval_split, str) else float(self.eval_split)

    def validate(self) -> None:
        if self.format != "synthetic":
            if not self.paths or any(not p for p in self.paths):
                raise ConfigError("path", f"format {self.format!r} reads files: give a path "
                                          "(e.g. shipped:tiny_corpus.txt), or use format: synthetic")
            for i, p in enumerate(self.paths):
                _check_file(p, "path" if isinstance(self.path, str) else f"path[{i}]")
        if isinstance(self.eval_split, str):
            if not self.eval_split:
                raise ConfigError("eval_split", "give a held-out fraction such as 0.05, or an eval file path")
            _check_file(self.eval_split, "eval_split")
        elif not 0.0 <= self.eval_split < 1.0:
            raise ConfigError("eval_split", f"a held-out fraction must be in [0, 1); got {self.eval_split}")
        if not self.prompt_split:
            raise ConfigError("prompt_split", "use 'keys' (separate JSONL fields) or a non-empty separator "
                                              "string such as '\\nAnswer:'")
        for name in ("input_key", "output_key", "text_key", "chosen_key", "rejected_key", "answer_key"):
            if not getattr(self, name):
                raise ConfigError(name, "a JSONL field name cannot be empty")
        if self.format == "sft" and self.prompt_split == "keys" and self.input_key == self.output_key:
            raise ConfigError("output_key", f"prompt and response need different fields; both are "
                                            f"{self.input_key!r}")
        if self.format in ("text", "jsonl", "synthetic") and self.prompt_split != "keys":
            raise ConfigError("prompt_split", f"format {self.format!r} has no prompts; remove prompt_split "
                                              "or use format: sft")
        if self.format == "preference" and self.prompt_split != "keys":
            raise ConfigError("prompt_split", "preference pairs are read from input_key / chosen_key / "
                                              "rejected_key; set prompt_split: keys")
        self._validate_tokenizer()

    def _validate_tokenizer(self) -> None:
        if self.tokenizer == "bytes":
            return
        d = Path(self.tokenizer).expanduser()
        if not d.exists():
            raise ConfigError("tokenizer", f"tokenizer directory {self.tokenizer!r} does not exist; use "
                                           "'bytes' or the local directory a Hugging Face tokenizer was "
                                           "saved to (save_pretrained); anymoe never downloads")
        if not d.is_dir():
            raise ConfigError("tokenizer", f"{self.tokenizer!r} is a file; give the directory holding "
                                           "tokenizer.json / tokenizer_config.json")
        if not os.access(d, os.R_OK | os.X_OK):
            raise ConfigError("tokenizer", f"tokenizer directory {self.tokenizer!r} is not readable; fix "
                                           "its permissions")
        if not any((d / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError("tokenizer", f"{self.tokenizer!r} holds no tokenizer files (one of "
                                           f"{', '.join(TOKENIZER_FILES)}); save one there with "
                                           "tokenizer.save_pretrained(dir)")


__all__ = ["SHIPPED_DIR", "DataConfig", "resolve_path"]
