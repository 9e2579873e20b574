"""The MoE decoder: embed -> N x [attention, MoE or dense FFN] -> norm -> logits.

A block is pre-norm (Llama / Mixtral / DeepSeek layout), with an optional depth-scaled
sandwich norm on each sublayer output (Pangu Ultra):

    h   = x + post_attn_norm(attn(attn_norm(x)))      post_*_norm only with sandwich_norm
    out = h + post_ffn_norm(ffn(ffn_norm(h)))         ffn = MoELayer, or DenseMLP for the first N

A block hands ``out`` on as the pair (h, f): the next block's attn_norm (or the final norm)
does the add, fused with the norm where the backend has the kernel (``add_rms_norm``), so no
residual add is a pass of its own, forward or backward. The arithmetic is the same.

Parameters are created on the CPU from torch's global generator (the caller seeds it), so
every backend starts from bit-identical weights; the caller then moves the model with
``.to(backend.device())``. The backend only supplies the MoE layers' grouped matmul and
expert sizing policy.

Legend: B batch, S sequence, T tokens (= B*S), D model dim, V vocabulary, K top-k.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from anymoe.core.moe import MoEAux, MoELayer
from anymoe.core.norm import add_rms_norm
from anymoe.models.cache import KVCache
from anymoe.models.config import ModelConfig
from anymoe.models.layers import Attention, DenseMLP, RMSNorm, RotaryEmbedding, build_attention_mask, init_std
from anymoe.models.mla import MLAttention
from anymoe.models.moe_dense import dense_moe_forward


@dataclass
class ModelOutput:
    """What ``model(ids, return_aux=True)`` returns."""

    logits: Tensor  # [B, S, V]
    aux_loss: Tensor  # scalar: sum over MoE layers of each layer's coefficient-weighted aux loss
    moe_aux: list[MoEAux] = field(default_factory=list)  # one per MoE layer, in depth order
    last_hidden: Tensor | None = None  # [B, S, D] after the final norm (reward / value heads read it)
    hidden_states: list[Tensor] | None = None  # [B, S, D] input of each block, then the final output

    @property
    def expert_ids(self) -> list[Tensor]:
        """Routing choices [T, K] per MoE layer (for routing replay)."""
        return [a.expert_ids for a in self.moe_aux]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, grouped_mm: Any = None, sizing: Any = None,
                 dispatcher: Any = None) -> None:
        super().__init__()
        self.idx = idx
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MLAttention(cfg, idx) if cfg.attention == "mla" else Attention(cfg, idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(idx)
        if self.is_moe:
            self.ffn = MoELayer(cfg.moe, cfg.d_model, grouped_mm=grouped_mm, sizing=sizing,
                                dispatcher=dispatcher)
        else:
            self.ffn = DenseMLP(cfg.d_model, cfg.dense_hidden)
        if cfg.sandwich_norm:
            # Depth-scaled sandwich norm (Pangu Ultra): the output norm's gain starts at 1/sqrt(L),
            # so each sublayer adds a bounded, depth-scaled update to the residual stream.
            gain = 1.0 / math.sqrt(cfg.n_layers)
            self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, gain)
            self.post_ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, gain)
        else:
            self.post_attn_norm = self.post_ffn_norm = None
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.checkpointing = cfg.checkpointing
        self.every_expert = False  # MoETransformer.set_moe_impl("every_expert") for export

    def _attn(self, y: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
              cache: KVCache | None) -> Tensor:
        a = self.attn(y, (cos, sin), mask, cache)
        return a if self.post_attn_norm is None else self.post_attn_norm(a)

    def _norm_attn(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        """attn_norm and attention: what selective checkpointing recomputes from x alone."""
        return self._attn(self.attn_norm(x), cos, sin, mask, None)

    def _dense(self, y: Tensor) -> Tensor:
        f = self.ffn(y)
        return f if self.post_ffn_norm is None else self.post_ffn_norm(f)

    def _moe(self, y: Tensor, token_ids: Tensor | None,
             replay: Tensor | None) -> tuple[Tensor, MoEAux | None]:
        if self.every_expert:  # export / inference formulation (moe_dense.py): no aux record
            f, aux = dense_moe_forward(self.ffn, y, token_ids), None
        else:
            f, aux = self.ffn(y, token_ids=token_ids, replay_ids=replay)
        return (f if self.post_ffn_norm is None else self.post_ffn_norm(f)), aux

    def _forward(self, x: Tensor, delta: Tensor | None, cos: Tensor, sin: Tensor, mask: Tensor | None,
                 cache: KVCache | None, token_ids: Tensor | None,
                 replay: Tensor | None) -> tuple[Tensor, Tensor, MoEAux | None]:
        selective = self.checkpointing == "selective" and self.training and cache is None
        if selective:  # recompute norm + attention in backward; keep the MoE (its dispatch may communicate)
            x = x if delta is None else x + delta  # the checkpoint then keeps one tensor, x
            a = checkpoint(self._norm_attn, x, cos, sin, mask, use_reentrant=False)
        else:
            x, y = add_rms_norm(x, delta, self.attn_norm.weight, self.attn_norm.eps)  # x += the last update
            a = self._attn(y, cos, sin, mask, cache)
        h, y = add_rms_norm(x, self.drop(a), self.ffn_norm.weight, self.ffn_norm.eps)
        if self.is_moe:
            f, aux = self._moe(y, token_ids, replay)
        else:
            f = checkpoint(self._dense, y, use_reentrant=False) if selective else self._dense(y)
            aux = None
        return h, self.drop(f), aux

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: KVCache | None = None, token_ids: Tensor | None = None,
                replay: Tensor | None = None,
                delta: Tensor | None = None) -> tuple[Tensor, Tensor, MoEAux | None]:
        """The residual stream arrives as ``x + delta`` (delta: the previous block's FFN output;
        zeros or None before the first block) and leaves as ``h + f``: each residual add is done
        by the norm that follows it (``add_rms_norm``, one kernel per direction where the
        backend fuses them) instead of by a separate add. With activation checkpointing the
        incoming add is done first, so a checkpoint keeps one tensor per block, as before the
        pair. Returns (h, f, aux)."""
        if self.checkpointing == "full" and self.training and cache is None:
            # Whole-block recompute. The recompute routes the same tokens again, so the aux-free load
            # counters see every token twice: a uniform factor that sign(mean - load) ignores.
            x = x if delta is None else x + delta
            return checkpoint(self._forward, x, None, cos, sin, mask, None, token_ids, replay,
                              use_reentrant=False)
        return self._forward(x, delta, cos, sin, mask, cache, token_ids, replay)


class MoETransformer(nn.Module):
    """Decoder-only transformer with MoE feed-forward blocks; see the module docstring."""

    def __init__(self, cfg: ModelConfig, backend: Any = None, parallel: Any = None,
                 dispatcher: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        grouped_mm = backend.grouped_mm if backend is not None else None
        sizing = backend.sizing_policy() if backend is not None else None
        if dispatcher is None and parallel is not None:
            dispatcher = _dispatcher_for(cfg, parallel)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        rope_dim = cfg.mla.qk_rope_head_dim if cfg.attention == "mla" else cfg.dim_per_head
        self.rope = RotaryEmbedding(rope_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, i, grouped_mm, sizing, dispatcher)
                                    for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if parallel is not None and getattr(parallel, "world_size", 1) > 1:
            from anymoe.core.parallel import attach_groups

            attach_groups(self, parallel)

    # ----------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the non-MoE weights from the global generator in a fixed order (see ``init_std``).

        Norm gains keep their constructed value (1, or 1/sqrt(L) for sandwich norms), biases 0.
        The MoE layers drew their own weights at construction (moe-core: every expert in a fixed
        order, so any EP size and sizing policy get the same canonical weights, pad zero) from
        N(0, moe.init_std); they are rescaled here to this model's stds rather than re-drawn
        (no second draw of a billion expert weights; zero pads stay zero). The router keeps its
        ``router.init_std`` draw except under ``init: tiny``, where it is rescaled too.
        """
        std_in, std_out = init_std(self.cfg)
        for name, p in self.named_parameters():
            if ".ffn." in name and self._is_moe_param(name):
                continue
            if name.endswith("norm.weight"):
                continue
            if name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std_out)
            else:
                p.normal_(0.0, std_in)
        for layer in self.moe_layers():
            drawn = layer.cfg.init_std
            for part in (layer.experts, layer.shared):
                if part is None:
                    continue
                for pname in ("w1", "w3", "w13"):
                    if hasattr(part, pname):
                        getattr(part, pname).mul_(std_in / drawn)
                part.w2.mul_(std_out / drawn)
            if self.cfg.init == "tiny" and getattr(layer.router, "learned", True):
                layer.router.weight.mul_(std_in / layer.router.cfg.init_std)

    def _is_moe_param(self, name: str) -> bool:
        idx = int(name.split(".")[1])
        return self.blocks[idx].is_moe

    # -------------------------------------------------------------------------------------- helpers
    def moe_layers(self) -> Iterator[MoELayer]:
        for b in self.blocks:
            if b.is_moe:
                yield b.ffn

    @property
    def num_moe_layers(self) -> int:
        return sum(1 for _ in self.moe_layers())

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Aux-loss-free balancing step on every MoE layer (call after optimizer.step())."""
        for layer in self.moe_layers():
            layer.update_bias()

    def set_checkpointing(self, mode: str) -> None:
        if mode not in ("none", "selective", "full"):
            raise ValueError(f"checkpointing must be none, selective or full; got {mode!r}")
        for b in self.blocks:
            b.checkpointing = mode

    def set_moe_impl(self, impl: str) -> None:
        """"dispatch" (training path, default) or "every_expert" (export-friendly, moe_dense.py)."""
        if impl not in ("dispatch", "every_expert"):
            raise ValueError(f"moe impl must be dispatch or every_expert; got {impl!r}")
        for b in self.blocks:
            b.every_expert = impl == "every_expert"

    def set_export_formulation(self, on: bool = True) -> None:
        """The exporters' formulation (``on``) or the training one: MoE layers through every
        expert (``set_moe_impl``) and grouped-query attention with an explicit K/V repeat
        (SDPA's ``enable_gqa`` does not export to ONNX everywhere). Same function either way."""
        self.set_moe_impl("every_expert" if on else "dispatch")
        for module in self.modules():
            if isinstance(module, Attention):
                module.repeat_kv_heads = on

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def num_parameters(self, active: bool = False) -> int:
        """Parameters of the whole model (every expert, at its configured hidden size); with
        ``active=True`` those one token computes with.

        Routed experts count from the config, not from this process's tensors: under expert
        parallelism a rank holds E / ep of them, and a sizing policy may store them padded (the pad
        is zeros). Active = the dense parameters plus K experts per MoE layer, minus the input
        embedding table when untied (a lookup, no FLOPs); the output head counts.
        """
        params = {id(p): p for p in self.parameters()}
        routed = {id(p) for layer in self.moe_layers() for p in layer.experts.parameters(recurse=False)}
        dense = sum(p.numel() for i, p in params.items() if i not in routed)
        if active and not self.cfg.tie_embeddings:
            dense -= self.embed.weight.numel()
        m = self.cfg.moe
        if m is None:
            return dense
        experts = m.top_k if active else m.num_experts
        return dense + self.num_moe_layers * experts * 3 * self.cfg.d_model * m.expert_hidden

    # -------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, kv_cache: KVCache | None = None,
                replay_ids: Sequence[Tensor] | None = None, return_aux: bool = False,
                return_hidden: bool = False) -> Tensor | ModelOutput:
        """Logits [B, S, V] for ``input_ids`` [B, S], or a ModelOutput with ``return_aux``.

        attention_mask [B, past + S] (1 = real token, 0 = left padding) covers cached positions
        too; position_ids default to the count of real tokens before each position.
        replay_ids: one [B*S, K] expert-id tensor per MoE layer (routing replay for RLHF).
        """
        B, S = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        L = past + S
        if attention_mask is not None and attention_mask.shape != (B, L):
            raise ValueError(f"attention_mask must be [B, past + S] = [{B}, {L}]; "
                             f"got {list(attention_mask.shape)}")
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        n_moe = self.num_moe_layers
        if replay_ids is not None and len(replay_ids) != n_moe:
            raise ValueError(f"replay_ids needs one [T, K] tensor per MoE layer ({n_moe}); "
                             f"got {len(replay_ids)}")
        x = self.embed(input_ids)
        if position_ids is None:  # past..L-1 in every row: cached tables, broadcast over the batch
            cos, sin = self.rope.shared_positions(past, L, x.dtype, x.device)
        else:
            cos, sin = self.rope(position_ids, x.dtype)
        # No padding and no cache: SDPA's causal flag (mask None), with no shape test a tracer would freeze.
        no_mask = attention_mask is None and kv_cache is None
        mask = None if no_mask else build_attention_mask(attention_mask, S, L, x.device)
        auxes: list[MoEAux] = []
        hidden: list[Tensor] | None = [] if return_hidden else None
        # The residual stream is x + delta (see Block.forward). A zero delta for the first block
        # rather than None, requiring grad as the later deltas do: one compiled graph serves
        # every block (None, or a different requires_grad, would be another graph to compile).
        delta = torch.zeros_like(x).requires_grad_(x.requires_grad)
        for block in self.blocks:
            if hidden is not None:
                hidden.append(x + delta)
            replay = replay_ids[len(auxes)] if (replay_ids is not None and block.is_moe) else None
            x, delta, aux = block(x, cos, sin, mask, kv_cache, input_ids, replay, delta)
            if aux is not None:
                auxes.append(aux)
        _, x = add_rms_norm(x, delta, self.norm.weight, self.norm.eps)
        if hidden is not None:
            hidden.append(x)
        logits = self.lm_head(x)
        if not return_aux:
            return logits
        aux_loss = sum((a.loss for a in auxes), logits.new_zeros((), dtype=torch.float32))
        return ModelOutput(logits=logits, aux_loss=aux_loss, moe_aux=auxes, last_hidden=x,
                           hidden_states=hidden)


def _dispatcher_for(cfg: ModelConfig, parallel: Any) -> Any:
    """The expert-parallel dispatcher for ``parallel`` (None when EP = 1)."""
    if cfg.moe is None or getattr(parallel, "ep_size", 1) <= 1:
        return None
    from anymoe.core import ep_dispatch  # EP engineer's module; loaded only for EP > 1

    return ep_dispatch.build_dispatcher(cfg.moe, parallel)


__all__ = ["Block", "ModelOutput", "MoETransformer"]
