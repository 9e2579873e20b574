"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, stop tokens.

Prompts of different lengths are left-padded into one batch; the attention mask hides the
pads and the position ids count only real tokens, so each row computes what it would alone.
The cache path feeds the prompt once (prefill), then one token per step; ``use_cache=False``
recomputes the whole sequence each step (the reference the cache is tested against: greedy
decoding gives identical tokens).

Returns the new tokens, the log-probability of each under the model (log-softmax of the raw
logits, float32, before temperature/top-k/top-p), and, with ``return_routing``, each MoE
layer's expert choices for every position (prompt and response) for routing replay in RLHF.

Sampling draws from a CPU ``torch.Generator`` (seeded by ``seed``), so a seed gives the
same samples on every backend when the logits agree.

Legend: B batch, P padded prompt length, R generated tokens, V vocabulary, K top-k experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from anymoe.core.config import ConfigError


@dataclass
class GenerationOutput:
    tokens: Tensor  # [B, R] new tokens; pad_id after a row's stop token
    logprobs: Tensor  # [B, R] float32 log p(token | prefix) under the model; 0 on pads
    lengths: Tensor  # [B] new tokens per row, the stop token included
    finished: Tensor  # [B] bool: the row emitted a stop token
    prompt: Tensor  # [B, P] the left-padded prompts
    prompt_mask: Tensor  # [B, P] 1 = real prompt token
    routing: list[Tensor] | None = None  # per MoE layer [B, P + R, K]: experts of every position

    def sequences(self) -> list[list[int]]:
        """Each row's prompt (without pads) followed by its generated tokens (up to the stop token)."""
        out = []
        for b in range(self.tokens.shape[0]):
            prompt = self.prompt[b][self.prompt_mask[b].bool()].tolist()
            out.append(prompt + self.tokens[b, : int(self.lengths[b])].tolist())
        return out


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> (ids [B, P], mask [B, P]) padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[b, P - len(p) :] = 1
    return ids, mask


def process_logits(logits_BV: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
    logits = logits_BV.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    if temperature < 0:
        raise ConfigError("temperature", f"must be >= 0 (0 = greedy); got {temperature}")
    if top_k < 0:
        raise ConfigError("top_k", f"must be >= 0 (0 = off); got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError("top_p", f"must be in (0, 1]; got {top_p}")
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens", f"must be >= 1; got {max_new_tokens}")


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    use_cache: bool = True,
    return_routing: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` per prompt; ``temperature=0`` is greedy.

    prompts: token lists (left-padded here) or an already left-padded [B, P] tensor with
    ``attention_mask``.
    """
    _check(temperature, top_k, top_p, max_new_tokens)
    device = next(model.parameters()).device
    if isinstance(prompts, Tensor):
        ids = prompts.long()
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
    else:
        ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    if generator is None and temperature > 0:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    B, P = ids.shape
    stops = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache() if use_cache else None
        out = model(ids, attention_mask=mask, kv_cache=cache, return_aux=True)
        routing = [[a.expert_ids.reshape(B, P, -1)] for a in out.moe_aux] if return_routing else None
        seq, seq_mask = ids, mask
        done = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        toks, logps = [], []
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            logp_BV = torch.log_softmax(logits, -1)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = process_logits(logits, temperature, top_k, top_p).softmax(-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(device)
            lp = logp_BV.gather(-1, nxt[:, None]).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            toks.append(nxt)
            logps.append(torch.where(done, torch.zeros_like(lp), lp))
            lengths = lengths + (~done).long()
            if stops.numel():
                done = done | torch.isin(nxt, stops)
            last = step == max_new_tokens - 1
            if (last or bool(done.all())) and not return_routing:
                break
            # Feed the token (also after the last step when routing is recorded, so every position has one).
            seq_mask = torch.cat([seq_mask, torch.ones(B, 1, dtype=seq_mask.dtype, device=device)], 1)
            seq = torch.cat([seq, nxt[:, None]], 1)
            if use_cache:
                out = model(nxt[:, None], attention_mask=seq_mask, kv_cache=cache, return_aux=True)
            else:
                out = model(seq, attention_mask=seq_mask, return_aux=True)
            if routing is not None:
                for n, a in enumerate(out.moe_aux):
                    routing[n].append(a.expert_ids.reshape(B, -1, a.expert_ids.shape[-1])[:, -1:])
            if last or bool(done.all()):
                break
    finally:
        model.train(was_training)
    routing_out = [torch.cat(chunks, 1) for chunks in routing] if routing is not None else None
    return GenerationOutput(
        tokens=torch.stack(toks, 1),
        logprobs=torch.stack(logps, 1),
        lengths=lengths,
        finished=done,
        prompt=ids,
        prompt_mask=mask,
        routing=routing_out,
    )


__all__ = ["GenerationOutput", "generate", "left_pad", "process_logits"]
