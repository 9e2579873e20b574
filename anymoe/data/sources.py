"""Reading local data files into documents or rows, and the seeded eval split.

Text files: documents are separated by one or more blank lines (a file without blank lines
is one document). JSONL: one JSON object per line; a bad line is reported with its file and
line number. Nothing is ever fetched from a network.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from anymoe.core.config import ConfigError
from anymoe.data.config import resolve_path

T = TypeVar("T")
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")


def split_documents(text: str) -> list[str]:
    """Blank-line separated documents, stripped, empty ones dropped."""
    return [d.strip() for d in _BLANK_LINES.split(text.replace("\r\n", "\n")) if d.strip()]


def read_text(path: str, field: str = "data.path") -> str:
    try:
        return resolve_path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(field, f"data file {path!r} does not exist; give a local file path") from None
    except UnicodeDecodeError as err:
        raise ConfigError(field, f"{path!r} is not UTF-8 text ({err.reason} at byte {err.start}); "
                                 "convert it to UTF-8") from None


def read_jsonl(path: str, field: str = "data.path") -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(read_text(path, field).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(field, f"{path}:{lineno} is not valid JSON ({err.msg}); every line of a JSONL "
                                     "file must be one JSON object") from None
        if not isinstance(row, dict):
            raise ConfigError(field, f"{path}:{lineno} is a JSON {type(row).__name__}, not an object "
                                     "with named fields")
        rows.append(row)
    return rows


def require_str(row: dict[str, Any], key: str, where: str, key_field: str) -> str:
    """``row[key]`` as a string, or a ConfigError naming the config field that chose ``key``."""
    if key not in row:
        have = ", ".join(map(repr, row)) or "none"
        raise ConfigError(key_field, f"{where} has no field {key!r} (fields: {have}); set {key_field} to the "
                                     "field that holds it")
    value = row[key]
    if not isinstance(value, str):
        raise ConfigError(key_field, f"{where} field {key!r} is a {type(value).__name__}, not a string")
    return value


def seeded_split(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, eval): ``ceil(fraction * n)`` items chosen by a seeded draw; both keep file order."""
    n = len(items)
    if fraction <= 0.0 or n == 0:
        return list(items), []
    n_eval = min(n - 1, max(1, int(np.ceil(fraction * n))))
    if n_eval < 1:
        raise ConfigError("data.eval_split", f"only {n} item(s): too few to hold any out; add data or set 0")
    # A stream distinct from the shuffle's (seed, epoch) streams: the split never moves with epochs.
    rng = np.random.Generator(np.random.PCG64([seed, 0x5E_11]))
    held = np.zeros(n, dtype=bool)
    held[rng.choice(n, size=n_eval, replace=False)] = True
    return [x for x, h in zip(items, held) if not h], [x for x, h in zip(items, held) if h]


__all__ = ["read_jsonl", "read_text", "require_str", "seeded_split", "split_documents"]
