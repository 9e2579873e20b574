"""The one place that knows how to call an anymoe MoE model for RL: forward and generation.

Legend: B sequences, P prompt tokens, R response tokens, L = P + R, V vocabulary,
D model dim, T = B*L tokens, K top-k, E experts, N MoE layers.

Every role (actor, critic, reference, reward model) goes through ``forward_rl``; the rollout
goes through ``generate_rl``. Both return plain records, so the RL code never depends on
the model's own output types.

``generate_rl`` decodes with the model's KV cache and records, for routing replay (R3),
the experts every layer chose for every position: the prompt's from the prefill, each
sampled token's from the decode step that feeds it. The last sampled token is fed once
more than plain sampling would need, so the record covers all L positions.
"""

from __future__ import annotations

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


def forward_rl(model: nn.Module, ids_BL: Tensor, replay_NTK: list[Tensor] | None = None) -> ForwardOut:
    """Full-sequence forward returning logits, final hidden states and each layer's routing."""
    out = model(ids_BL, replay_ids=replay_NTK, return_aux=True)
    return ForwardOut(out.logits, out.last_hidden, [a.expert_ids for a in out.moe_aux],
                      [a.router_probs for a in out.moe_aux], out.aux_loss, list(out.moe_aux))


def hidden_size(model: nn.Module) -> int:
    return int(model.cfg.d_model)


def sample_next(logits_BV: Tensor, temperature: float, top_k: int,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Sample one token per row; returns (token [B], its log-prob under the sampling distribution [B])."""
    logits = logits_BV.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp_BV = torch.log_softmax(logits, -1)
    # Sample on the host generator (seeded, device-independent), then move back.
    nxt = torch.multinomial(logp_BV.exp().cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
    return nxt, logp_BV.gather(-1, nxt[:, None]).squeeze(-1)


@torch.no_grad()
def generate_rl(model: nn.Module, prompt_BP: Tensor, max_new_tokens: int, *, eos_id: int, pad_id: int,
                temperature: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> Generated:
    """Sample up to ``max_new_tokens`` per prompt with the KV cache, recording logp and routing."""
    B, P = prompt_BP.shape
    cache = model.new_cache()
    out = model(prompt_BP, kv_cache=cache, return_aux=True)
    routing = [[a.expert_ids.reshape(B, P, -1)] for a in out.moe_aux]
    logits = out.logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=prompt_BP.device)
    toks, logps = [], []
    for _ in range(max_new_tokens):
        nxt, lp = sample_next(logits, temperature, top_k, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        toks.append(nxt)
        logps.append(torch.where(done, torch.zeros_like(lp), lp))
        done = done | (nxt == eos_id)
        out = model(nxt[:, None], kv_cache=cache, return_aux=True)
        for n, a in enumerate(out.moe_aux):
            routing[n].append(a.expert_ids.reshape(B, 1, -1))
        logits = out.logits[:, -1]
        if bool(done.all()):
            break
    L = P + len(toks)
    routing_NTK = [torch.cat(chunks, 1).reshape(B * L, -1) for chunks in routing]
    return Generated(torch.stack(toks, 1), torch.stack(logps, 1), routing_NTK)


__all__ = ["ForwardOut", "Generated", "forward_rl", "generate_rl", "hidden_size", "sample_next"]
