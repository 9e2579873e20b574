"""The MoE layer: route, (drop over capacity), dispatch, compute experts, combine, add shared.

``MoELayer.forward(x_BSD)`` does, in order:

1. route: the router scores every token in float32 and picks experts (``Routing``);
2. capacity: with ``capacity_factor`` set, pairs over an expert's capacity are masked
   (id -1, weight 0) and counted; dropless otherwise;
3. dispatch: rows sorted by local expert (``TokenDispatcher``; local or expert-parallel);
4. experts: stacked SwiGLU through the backend's grouped matmul;
5. combine: back to token order, weighted sum over the K slots;
6. shared experts (always on) added; balance losses computed from the routing.

It returns the output and a ``MoEAux`` record (coefficient-weighted loss, named losses,
loads, routing for replay, router probabilities). ``moe_stats`` turns an aux record into
numbers to log. ``update_bias`` is the aux-free balancing step the trainer calls after
``optimizer.step()``.

Legend: B batch, S sequence, T tokens (B*S), D model dim, E experts, K top-k, C capacity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from anymoe.core.balance import (
    BalanceConfig,
    all_reduce_sum,
    aux_free_update,
    balance_losses,
    expert_counts,
    weighted_total,
)
from anymoe.core.config import ConfigError, param
from anymoe.core.dispatch import TokenDispatcher, apply_capacity, capacity_per_expert
from anymoe.core.dispatch_fast import FastLocalDispatcher
from anymoe.core.ep_dispatch import combine_with
from anymoe.core.experts import Experts, SharedExperts
from anymoe.core.grouped_mm import GroupedMM
from anymoe.core.router import Router, RouterConfig, Routing, build_router
from anymoe.core.sizing import ExpertSizingPolicy


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = param(ge=1, doc="routed experts per MoE layer")
    top_k: int = param(ge=1, doc="experts per token (token choice); mean experts per token (expert choice)")
    expert_hidden: int = param(ge=1, doc="hidden size F of one routed SwiGLU expert")
    router: RouterConfig = param(default_factory=RouterConfig, doc="")
    balance: BalanceConfig = param(default_factory=BalanceConfig, doc="")
    shared_experts: int = param(0, ge=0, doc="always-on shared experts (one MLP of shared_experts * hidden)")
    shared_hidden: int | None = param(None, ge=1, doc="hidden of one shared expert (default expert_hidden)")
    shared_gate: bool = param(False, doc="sigmoid gate on the shared experts' output (Qwen2-MoE)")
    capacity_factor: float | None = param(None, gt=0, doc="expert capacity = factor * T * K / E; "
                                                          "null = dropless")
    drop_policy: Literal["probs", "position"] = param("probs", doc="which pairs over capacity are dropped")
    fused_w13: bool = param(False, doc="store gate and up projections as one w13 [E, D, 2F]")
    init_std: float = param(0.02, gt=0, doc="std of the experts' normal init")

    def validate(self) -> None:
        if self.top_k > self.num_experts:
            raise ConfigError("top_k", f"must be <= num_experts ({self.num_experts})")
        self.router.validate()
        self.router.check_experts(self.num_experts, self.top_k)
        self.balance.validate()
        kind = self.router.kind
        if kind in ("hash", "expert_choice"):
            b = self.balance
            for name in ("aux_loss", "seq_aux_loss", "ep_group_loss"):
                if getattr(b, name) > 0:
                    raise ConfigError(f"balance.{name}",
                                      f"{kind} routing has no learned top-k to balance; set 0")
            if b.aux_free or b.sinkhorn:
                raise ConfigError("balance.aux_free" if b.aux_free else "balance.sinkhorn",
                                  f"{kind} routing does not use selection scores; set false")
            if self.capacity_factor is not None:
                raise ConfigError("capacity_factor", f"{kind} routing has its own sizing; leave it null"
                                  + (" and set router.capacity" if kind == "expert_choice" else ""))
        if kind == "hash" and self.balance.z_loss > 0:
            raise ConfigError("balance.z_loss", "hash routing has no logits; set 0")


@dataclass
class MoEAux:
    """Side outputs of one MoE layer call."""

    loss: Tensor  # scalar: sum of coefficient-weighted balance losses
    losses: dict[str, Tensor]  # unweighted, by name (aux_loss, seq_aux_loss, ep_group_loss, z_loss)
    tokens_per_expert: Tensor  # [E] float: pairs each expert computed (after capacity)
    expert_ids: Tensor  # [T, K] int64 router choice before capacity (replay); expert choice: [E, C] token ids
    router_probs: Tensor  # [T, E] float32 router probabilities
    dropped: Tensor  # int64 scalar: pairs dropped over capacity (expert choice: tokens no expert took)
    routed_per_expert: Tensor | None = None  # [E] float: pairs chosen before capacity
    num_pairs: int = 0  # T * K (expert choice: T)


def moe_stats(aux: MoEAux, util_threshold: float = 0.1, per_expert: bool = False) -> dict[str, float]:
    """Load and routing statistics to log (reads values to the host).

    cv = std/mean of the load; utilisation = share of experts whose load exceeds
    ``util_threshold`` * mean load; entropy = mean over tokens of the router distribution's
    entropy (nats); dropped_frac = dropped / num_pairs.
    """
    load = aux.tokens_per_expert.detach().double().cpu()
    mean = load.mean()
    probs = aux.router_probs.detach().double()
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1).mean()
    out = {
        "load_mean": float(mean),
        "load_max": float(load.max()),
        "load_min": float(load.min()),
        "cv": float(load.std(unbiased=False) / mean) if mean > 0 else 0.0,
        "max_over_mean": float(load.max() / mean) if mean > 0 else 0.0,
        "entropy": float(entropy),
        "dropped_frac": float(aux.dropped) / max(aux.num_pairs, 1),
        "utilisation": float((load > util_threshold * mean).double().mean()),
        "aux_loss_total": float(aux.loss.detach()),
    }
    out.update({name: float(v.detach()) for name, v in aux.losses.items()})
    if per_expert:
        out.update({f"tokens_per_expert/{i}": float(v) for i, v in enumerate(load)})
    return out


class MoELayer(nn.Module):
    """Routed SwiGLU experts with optional shared experts; see the module docstring for the steps."""

    def __init__(self, cfg: MoEConfig, d_model: int, grouped_mm: GroupedMM | None = None,
                 sizing: ExpertSizingPolicy | None = None, dispatcher: TokenDispatcher | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.d_model = d_model
        E = cfg.num_experts
        # Parameters are drawn in a fixed order (router, experts, shared) from the global generator.
        self.router: Router = build_router(E, cfg.top_k, d_model, cfg.router, cfg.balance)
        # The fast local dispatcher (sync-free route index, gather-based permute, fused combine; the
        # backend registers device kernels for it) is the default; LocalDispatcher is its reference.
        self.dispatcher = dispatcher or FastLocalDispatcher(E)
        self.experts = Experts(E, d_model, cfg.expert_hidden, num_local=self.dispatcher.num_local_experts,
                               local_offset=self.dispatcher.local_expert_offset, grouped_mm=grouped_mm,
                               sizing=sizing, fused_w13=cfg.fused_w13, init_std=cfg.init_std)
        self.shared: SharedExperts | None = None
        if cfg.shared_experts:
            hidden = cfg.shared_experts * (cfg.shared_hidden or cfg.expert_hidden)
            self.shared = SharedExperts(d_model, hidden, cfg.shared_gate, cfg.init_std)
        # Shared experts computed while the return all-to-all is in flight (same numbers); a
        # performance switch, set from ParallelConfig.overlap_shared by parallel.attach_groups.
        self.overlap_shared = False
        self.dp_group: object | None = None
        self.ep_group: object | None = None
        self.bias_group: object | None = None

    def set_process_groups(self, dp: object | None = None, ep: object | None = None,
                           bias: object | None = None) -> None:
        """dp: global-batch aux loss; ep: EP-group loss; bias: every rank holding this router
        (the aux-free loads are summed over it so the bias stays identical on all of them)."""
        self.dp_group, self.ep_group, self.bias_group = dp, ep, bias

    # --- the steps ---------------------------------------------------------------------------
    def route(self, x_TD: Tensor, token_ids: Tensor | None, replay_ids: Tensor | None) -> Routing:
        return self.router(x_TD, None if token_ids is None else token_ids.reshape(-1), replay_ids)

    def forward(self, x_BSD: Tensor, token_ids: Tensor | None = None,
                replay_ids: Tensor | None = None) -> tuple[Tensor, MoEAux]:
        shape = x_BSD.shape
        B, S = (shape[0], shape[1]) if x_BSD.dim() == 3 else (1, shape[0])
        x_TD = x_BSD.reshape(-1, self.d_model)
        routing = self.route(x_TD, token_ids, replay_ids)
        shared_TD = None
        if routing.token_idx_EC is not None:
            y_TD, aux = self._expert_choice(x_TD, routing)
        elif self.overlap_shared and self.shared is not None:
            # The shared experts run while the return all-to-all is in flight (combine_with).
            (y_TD, shared_TD), aux = self._token_choice(x_TD, routing, (B, S), side=lambda: self.shared(x_TD))
        else:
            y_TD, aux = self._token_choice(x_TD, routing, (B, S))
        if self.shared is not None:
            y_TD = y_TD + (shared_TD if shared_TD is not None else self.shared(x_TD))
        return y_TD.view(shape), aux

    def _token_choice(self, x_TD: Tensor, r: Routing, batch: tuple[int, int],
                      side: Callable[[], Tensor] | None = None) -> tuple[Any, MoEAux]:
        cfg, E = self.cfg, self.cfg.num_experts
        ids_TK, weights_TK = r.expert_ids_TK, r.weights_TK
        routed_E = expert_counts(ids_TK, E)
        dropped = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        kept_ids_TK = ids_TK
        if cfg.capacity_factor is not None:
            cap = capacity_per_expert(ids_TK.shape[0], ids_TK.shape[1], E, cfg.capacity_factor)
            priority_TK = r.scores_TE.gather(1, ids_TK)
            kept_ids_TK, weights_TK, dropped = apply_capacity(ids_TK, weights_TK, priority_TK, E, cap,
                                                              cfg.drop_policy)
        x_ND, counts_E, meta = self.dispatcher.dispatch(autocast_input(x_TD), kept_ids_TK, weights_TK)
        fold = (side is None and getattr(self.experts, "takes_row_weights", False)
                and hasattr(self.dispatcher, "combine_summed"))
        if fold:  # the weights ride into the experts' activation; the combine is a plain sum
            y_ND = self.experts(x_ND, counts_E, self.dispatcher.row_weights(meta))
            y_TD = self.dispatcher.combine_summed(y_ND, meta)
        elif side is None:
            y_TD = self.dispatcher.combine(self.experts(x_ND, counts_E), meta)
        else:  # (combined rows, side()), the side computed during the return all-to-all
            y_TD = combine_with(self.dispatcher, self.experts(x_ND, counts_E), meta, side)
        losses = balance_losses(cfg.balance, r.probs_TE, r.logits_TE, ids_TK, batch, self.dp_group,
                                self.ep_group, self._num_ep_groups(), routed_E)
        kept_E = routed_E if cfg.capacity_factor is None else expert_counts(kept_ids_TK, E)
        aux = MoEAux(loss=weighted_total(cfg.balance, losses, r.probs_TE), losses=losses,
                     tokens_per_expert=kept_E, expert_ids=ids_TK, router_probs=r.probs_TE, dropped=dropped,
                     routed_per_expert=routed_E, num_pairs=ids_TK.numel())
        return y_TD, aux

    def _expert_choice(self, x_TD: Tensor, r: Routing) -> tuple[Tensor, MoEAux]:
        # Each expert's C tokens become pseudo-tokens routed (K=1) to that expert, so any
        # dispatcher serves expert choice; outputs are summed back onto their tokens.
        E, C = r.token_idx_EC.shape
        T = x_TD.shape[0]
        tok_M = r.token_idx_EC.reshape(-1)
        ids_M1 = torch.arange(E, device=x_TD.device).repeat_interleave(C).unsqueeze(1)
        x_ND, counts_E, meta = self.dispatcher.dispatch(autocast_input(x_TD).index_select(0, tok_M), ids_M1,
                                                        r.weights_EC.reshape(-1, 1))
        y_MD = self.dispatcher.combine(self.experts(x_ND, counts_E), meta)
        y_TD = torch.zeros_like(x_TD, dtype=y_MD.dtype).index_add(0, tok_M, y_MD)
        losses = balance_losses(self.cfg.balance, r.probs_TE, r.logits_TE, ids_M1, (1, T))
        taken_T = torch.zeros(T, dtype=torch.int64, device=x_TD.device).index_add(
            0, tok_M, torch.ones_like(tok_M))
        load_E = torch.full((E,), float(C), device=x_TD.device)
        aux = MoEAux(loss=weighted_total(self.cfg.balance, losses, r.probs_TE), losses=losses,
                     tokens_per_expert=load_E, expert_ids=r.token_idx_EC, router_probs=r.probs_TE,
                     dropped=(taken_T == 0).sum(), routed_per_expert=load_E, num_pairs=T)
        return y_TD, aux

    def _num_ep_groups(self) -> int:
        return int(getattr(self.dispatcher, "ep_size", 1))

    @torch.no_grad()
    def update_bias(self, group: object | None = None) -> None:
        """Aux-free step (DeepSeek-V3): b_i += rate * sign(mean load - load_i); resets the loads.

        Loads are summed over ``group`` (default: ``bias_group``) so every replica of the
        router takes the same step. No-op unless ``balance.aux_free``.
        """
        if not self.cfg.balance.aux_free:
            return
        loads = all_reduce_sum(self.router.load_accum, group if group is not None else self.bias_group)
        aux_free_update(self.router.expert_bias, loads, self.cfg.balance.bias_update_rate)
        self.router.load_accum.zero_()


def autocast_input(x_TD: Tensor) -> Tensor:
    """x in autocast's dtype where autocast is on for x's device, else x.

    The experts' matmuls compute in that dtype anyway; casting the T token rows before the
    dispatch, not the T*K copies after it, halves the bytes every dispatch step moves (the
    gather, an expert-parallel all-to-all, their backward). The row gradients then come back
    in that dtype and are summed per token in float32, rounded once, as an autocast matmul's
    input gradient is. On the H100 (moe-1b, bf16 autocast) the dispatch gathered and cast
    float32 rows: 2.4 ms of a 127 ms step in the gather alone (bench/results/gpu_h100/session6/).
    """
    dev = x_TD.device.type
    if x_TD.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return x_TD.to(torch.get_autocast_dtype(dev))
    return x_TD


def replace(cfg: MoEConfig, **changes) -> MoEConfig:
    """A copy of ``cfg`` with ``changes`` (nested sub-configs as dicts merge into their dataclass)."""
    for name in ("router", "balance"):
        if isinstance(changes.get(name), dict):
            changes[name] = dataclasses.replace(getattr(cfg, name), **changes[name])
    return dataclasses.replace(cfg, **changes)
