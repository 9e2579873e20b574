"""Tokenizers behind one small Protocol: UTF-8 bytes (no files) or a local Hugging Face tokenizer.

The byte tokenizer is the default because it needs nothing on disk and gives every machine
the same ids: ids 0..255 are the bytes themselves, then pad (256), bos (257) and eos (258),
so ``vocab_size`` is 259. A Hugging Face tokenizer is loaded only from a local directory
(``local_files_only=True``): anymoe never downloads one.

``encode`` never adds special tokens; the datasets place bos/eos themselves, so both
tokenizers put document boundaries in the same places.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from anymoe.core.config import ConfigError


@runtime_checkable
class Tokenizer(Protocol):
    name: str

    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus pad/bos/eos after them."""

    name = "bytes"
    PAD, BOS, EOS = 256, 257, 258

    @property
    def vocab_size(self) -> int:
        return 259

    @property
    def pad_id(self) -> int:
        return self.PAD

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        names = {self.PAD: "<pad>", self.BOS: "<bos>", self.EOS: "<eos>"}
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special:
                out.append(names.get(i, f"<{i}>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A Hugging Face tokenizer read from a local directory (``save_pretrained`` output)."""

    def __init__(self, directory: str | Path, field: str = "data.tokenizer") -> None:
        d = Path(directory).expanduser()
        if not d.is_dir():
            raise ConfigError(field, f"tokenizer directory {str(directory)!r} does not exist; use 'bytes' or "
                                     "a local directory written by tokenizer.save_pretrained()")
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ConfigError(field, f"a Hugging Face tokenizer needs transformers ({err}); "
                                     "pip install 'anymoe[hf]' or use tokenizer: bytes") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except Exception as err:  # transformers raises OSError/ValueError/... for a bad directory
            raise ConfigError(field, f"cannot read a tokenizer from {str(d)!r}: {err}".splitlines()[0]
                              + "; check the directory holds a complete save_pretrained() output") from None
        self.name = str(d)
        if self._tok.eos_token_id is None:
            raise ConfigError(field, f"tokenizer in {str(d)!r} has no eos token; set eos_token and save it "
                                     "again (documents are separated by eos)")

    @property
    def vocab_size(self) -> int:
        return len(self._tok)  # includes added special tokens, unlike tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        pad = self._tok.pad_token_id
        return self.eos_id if pad is None else int(pad)

    @property
    def bos_id(self) -> int:
        bos = self._tok.bos_token_id
        return self.eos_id if bos is None else int(bos)

    @property
    def eos_id(self) -> int:
        return int(self._tok.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once (a fast tokenizer runs them in parallel in Rust)."""
        if not texts:
            return []
        return [list(ids) for ids in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def build_tokenizer(spec: str, field: str = "data.tokenizer") -> Tokenizer:
    """'bytes' or a local Hugging Face tokenizer directory."""
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec, field)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, field: str = "model.vocab_size") -> None:
    """The model's embedding must hold every id the tokenizer can produce."""
    if model_vocab_size < tokenizer.vocab_size:
        raise ConfigError(field, f"is {model_vocab_size} but tokenizer {tokenizer.name!r} produces ids up to "
                                 f"{tokenizer.vocab_size - 1}; set it to at least {tokenizer.vocab_size}")


__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "build_tokenizer", "check_vocab"]
