"""The one place that knows how to call an anymoe MoE model for RL: forward and generation.

Legend: B sequences, P prompt tokens, R response tokens, L = P + R, V vocabulary,
D model dim, T = B*L tokens, K top-k, E experts, N MoE layers.

Every role (actor, critic, reference, reward model) goes through ``forward_rl``; the rollout
goes through ``generate_rl``. Both return plain records, so the RL code never depends on
the model's own output types.

``forward_precision(device_type, dtype)`` (entered by the RLHF trainers around a whole run, from
``train.precision``) runs every forward and generation under autocast: the forwards only, as
torch advises; losses, log-softmax (``token_logprobs`` upcasts) and backward stay outside.

``generate_rl`` decodes with the models' KV-cache generator (anymoe.models.generate) and
records, for routing replay (R3), the experts every layer chose for every position: the
prompt's from the prefill, each sampled token's from the decode step that feeds it (the
generator feeds the last token once more so the record covers all L positions).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class ForwardOut:
    logits_BLV: Tensor
    hidden_BLD: Tensor                 # final-norm output, what the LM head reads
    expert_ids_NTK: list[Tensor]       # per MoE layer, the experts each token used
    router_probs_NTE: list[Tensor]     # per MoE layer, the full router distribution (float32)
    aux_loss: Tensor                   # the model's coefficient-weighted auxiliary losses
    moe_aux: list[Any]                 # per MoE layer, the layer's own MoEAux record


@dataclass
class Generated:
    tokens_BR: Tensor                  # sampled response tokens (pad_id after a row's end token)
    logp_BR: Tensor                    # log-prob of each token under the sampling distribution (0 on pad)
    routing_NTK: list[Tensor]          # per MoE layer, the rollout's experts for all B*(P+R) positions


_AUTOCAST: ContextVar[tuple[str, torch.dtype] | None] = ContextVar("anymoe_rl_autocast", default=None)


@contextmanager
def forward_precision(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """Inside this block every ``forward_rl`` / ``generate_rl`` runs under ``torch.autocast(dtype)``
    (None: in the models' own dtype)."""
    token = _AUTOCAST.set(None if dtype is None else (device_type, dtype))
    try:
        yield
    finally:
        _AUTOCAST.reset(token)


def _autocast() -> AbstractContextManager:
    spec = _AUTOCAST.get()
    return nullcontext() if spec is None else torch.autocast(device_type=spec[0], dtype=spec[1])


def forward_rl(model: nn.Module, ids_BL: Tensor, replay_NTK: list[Tensor] | None = None) -> ForwardOut:
    """Full-sequence forward returning logits, final hidden states and each layer's routing."""
    with _autocast():
        out = model(ids_BL, replay_ids=replay_NTK, return_aux=True)
    return ForwardOut(out.logits, out.last_hidden, [a.expert_ids for a in out.moe_aux],
                      [a.router_probs for a in out.moe_aux], out.aux_loss, list(out.moe_aux))


def hidden_size(model: nn.Module) -> int:
    return int(model.cfg.d_model)


@torch.no_grad()
def generate_rl(model: nn.Module, prompt_BP: Tensor, max_new_tokens: int, *, eos_id: int, pad_id: int,
                temperature: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> Generated:
    """Sample up to ``max_new_tokens`` per prompt with the models' KV-cache generator.

    ``temperature=0`` is greedy. The log-probs are those of the model's own distribution (raw
    logits, what the training forward computes), whatever temperature/top-k sampled the token.
    """
    from anymoe.models.generate import generate

    with _autocast():
        out = generate(model, prompt_BP, max_new_tokens, temperature=temperature, top_k=top_k,
                       stop_tokens=(eos_id,), pad_id=pad_id, use_cache=True, return_routing=True,
                       generator=generator)
    B = prompt_BP.shape[0]
    routing_NTK = [r.reshape(-1, r.shape[-1]) for r in out.routing]
    L = prompt_BP.shape[1] + out.tokens.shape[1]
    assert all(r.shape[0] == B * L for r in routing_NTK), "the generator recorded too few positions"
    return Generated(out.tokens, out.logprobs, routing_NTK)


__all__ = ["ForwardOut", "Generated", "forward_precision", "forward_rl", "generate_rl", "hidden_size"]
