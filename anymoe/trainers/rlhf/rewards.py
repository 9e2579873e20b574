"""Verifiable rewards as plain Python callables, and their weighted combination.

A reward function takes ``(prompt, response, sample)`` -- ``sample`` is the prompt's JSONL
row, so a task can carry its reference answer (``sample["answer"]``) -- and returns a float.
Built-ins register by name; a config may also name any importable callable as
``"package.module:function"``. ``WeightedReward`` sums several of them with weights and
reports each part, the multi-ability reward of the seeds (e.g. exact answer 1.0 + format 0.1).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from anymoe.core.config import ConfigError

RewardFn = Callable[[str, str, Mapping[str, Any]], float]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Add a reward function under ``name``; registering a name twice is a bug."""

    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = fn
        return fn

    return add


def _answer(sample: Mapping[str, Any]) -> str:
    if "answer" not in sample:
        raise ConfigError("reward", "this reward needs an 'answer' field in every prompt row of the JSONL")
    return str(sample["answer"]).strip()


@register_reward("exact_answer")
def exact_answer(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    """1 if the response (trimmed) is exactly the reference answer, else 0."""
    return float(response.strip() == _answer(sample))


@register_reward("digit_match")
def digit_match(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    """Partial credit: the fraction of the answer's characters right in their place, from the left.

    "68" vs "61" scores 0.5; a response longer than the answer loses the overlap share it overruns.
    """
    answer, got = _answer(sample), response.strip()
    if not answer:
        return 0.0
    right = sum(a == b for a, b in zip(answer, got))
    return right / max(len(answer), len(got))


@register_reward("numeric_format")
def numeric_format(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    """1 if the response is a bare integer (what an arithmetic answer must look like)."""
    return float(re.fullmatch(r"-?\d+", response.strip()) is not None)


@register_reward("digit_share")
def digit_share(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    """Share of the response's characters that are digits (0 for an empty response).

    A dense shaping term for arithmetic: a fresh byte-level policy emits a digit with
    probability ~10/259, so exact-answer rewards alone give almost no signal at first.
    """
    text = response.strip()
    return sum(c.isdigit() for c in text) / len(text) if text else 0.0


@register_reward("length_penalty")
def length_penalty(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    """-(characters beyond the reference answer's length) / 10: a nudge toward short answers."""
    extra = len(response.strip()) - len(_answer(sample))
    return -max(extra, 0) / 10.0


def resolve_reward(name: str, field: str = "reward") -> RewardFn:
    """A registered name, or ``"module:function"`` naming any importable callable."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(field, f"cannot import reward {name!r} ({err}); "
                              "check the module:function path") from None
        if not callable(fn):
            raise ConfigError(field, f"{name!r} is not callable")
        return fn
    raise ConfigError(field, f"unknown reward {name!r}; use one of {', '.join(REWARDS)} or 'module:function'")


class WeightedReward:
    """sum_i w_i f_i(prompt, response, sample); ``parts`` keeps every f_i for the logs."""

    def __init__(self, terms: Sequence[tuple[str, RewardFn, float]]) -> None:
        if not terms:
            raise ConfigError("rewards", "needs at least one reward, "
                              "e.g. [{name: exact_answer, weight: 1.0}]")
        self.terms = list(terms)

    @classmethod
    def from_config(cls, items: Sequence[Any], field: str = "rewards") -> WeightedReward:
        """From a list of RewardTerm-like objects with ``name`` and ``weight``."""
        return cls([(t.name, resolve_reward(t.name, f"{field}[{i}].name"), t.weight)
                    for i, t in enumerate(items)])

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 samples: Sequence[Mapping[str, Any]]) -> tuple[Tensor, dict[str, Tensor]]:
        """Scores [B] and each named part [B] (unweighted)."""
        parts = {name: torch.tensor([float(fn(p, r, s)) for p, r, s in zip(prompts, responses, samples)],
                                    dtype=torch.float32)
                 for name, fn, _w in self.terms}
        total = sum(w * parts[name] for name, _fn, w in self.terms)
        return total, parts


__all__ = ["REWARDS", "RewardFn", "WeightedReward", "digit_match", "exact_answer", "length_penalty",
           "digit_share", "numeric_format", "register_reward", "resolve_reward"]
