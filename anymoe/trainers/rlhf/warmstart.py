"""A brief supervised warm start that teaches a fresh policy the answer *format* only.

RL from a randomly initialised byte-level policy has almost no signal: a digit is 10 of 259
tokens, so a verifiable reward is nearly always 0 and group-normalised advantages vanish.
Real recipes start RL from an SFT model; for the tiny demo and tests we take the shortcut
of a few cross-entropy steps on the prompts paired with *another row's* answer (answers
shuffled across rows). The policy learns "a number, then the end token" but not which
number, so any rise of the exact-answer reward afterwards is the RL's doing.

Legend: B sequences, L tokens.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def format_pairs(rows: Sequence[Mapping[str, Any]], prompt_key: str, answer_key: str,
                 seed: int) -> list[tuple[str, str]]:
    """(prompt, answer of a different row): the right shape of answer, not the right value."""
    answers = [str(r[answer_key]) for r in rows]
    rng = random.Random(seed)
    shuffled = answers[:]
    rng.shuffle(shuffled)
    return [(str(r[prompt_key]), a) for r, a in zip(rows, shuffled)]


def sft_steps(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], steps: int, *,
              batch: int = 32, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Cross-entropy on the response tokens (answer + end token) of right-padded pairs; returns losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    losses = []
    model.train()
    for _ in range(steps):
        chunk = [pairs[rng.randrange(len(pairs))] for _ in range(batch)]
        seqs, targets = [], []
        for prompt, answer in chunk:
            p = tokenizer.encode(prompt)
            r = tokenizer.encode(answer) + [tokenizer.eos_id]
            seqs.append(p + r)
            targets.append([-100] * (len(p) - 1) + r)
        L = max(len(s) for s in seqs)
        ids_BL = torch.tensor([s + [tokenizer.pad_id] * (L - len(s)) for s in seqs], device=device)
        tgt_BL = torch.tensor([t + [-100] * (L - 1 - len(t)) for t in targets], device=device)
        logits = model(ids_BL[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt_BL.reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


__all__ = ["format_pairs", "sft_steps"]
