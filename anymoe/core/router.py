"""Routers: which experts see each token, and with what combine weight.

A router maps tokens [T, D] to a :class:`Routing` record. Token-choice routers pick K
experts per token; the expert-choice router lets each expert pick its C best tokens.
Router math runs in float32 (float64 when the input is float64, for reference tests)
whatever the model dtype: softmax over hundreds of experts in bf16 flips top-k choices.

Routers (``RouterConfig.kind``), each registered in ``ROUTERS``:

- ``topk``: token-choice top-k over softmax (Shazeer 2017 / GShard / Switch) or sigmoid
  scores (DeepSeek-V3); softmax before top-k (probabilities of all experts, gathered) or
  after it (Mixtral: softmax over the K chosen logits); optional renormalisation of the K
  weights and a scaling factor (DeepSeek's ``routed_scaling_factor``).
- ``noisy_topk``: Shazeer et al. 2017 eq. 4: logits + N(0, 1) * softplus(x W_noise),
  W_noise learned and zero at start, training only.
- ``group_limited``: DeepSeek-V2/V3 device/node-limited routing: score the
  ``n_groups`` expert groups (max score, or sum of the two best as in V3), keep the best
  ``topk_groups`` groups, then take the top-k experts inside them.
- ``hash``: Roller et al. 2021 (Hash Layers): a fixed random token-id -> expert map, no
  learned gate; K > 1 takes K consecutive experts from the hashed one, weights 1/K.
- ``expert_choice``: Zhou et al. 2022: softmax over experts, then every expert takes its
  C = ceil(capacity * T * K / E) highest-scoring tokens. Balanced by construction, but it
  looks at all tokens of the batch (not causal; use for encoders or as an ablation).

Every token-choice router honours ``replay_ids`` (routing replay, R3): the given expert ids
replace the top-k choice and the weights are the current scores gathered at them,
normalised the same way, so gradients still reach the router.

Selection may use biased scores (auxiliary-loss-free balancing, DeepSeek-V3 eq. 16: the
bias moves the choice, never the combine weight) or Sinkhorn-normalised scores
(``balance.sinkhorn``, BASE layers / Megatron), see anymoe.core.balance.

Legend: T tokens, D model dim, E experts, K top-k, C tokens per expert, G groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anymoe.core.balance import BalanceConfig, expert_counts, sinkhorn
from anymoe.core.config import ConfigError, param
from anymoe.core.dispatch_fast import dispatch_ops_for
from anymoe.core.router_gemm import linear_upcast, logits_dtype, router_logits

RouterKind = Literal["topk", "noisy_topk", "group_limited", "hash", "expert_choice"]


class _GatherK(torch.autograd.Function):
    """``src_TE.gather(1, ids_TK)`` whose backward sums K one-hot terms instead of scattering.

    The gather's own backward is a scatter-add into [T, E]; with deterministic algorithms on, CUDA
    runs that as a sort of the T*K indices plus an accumulating index_put (1.8 ms of an 81 ms moe-1b
    step on the H100, bench/results/gpu_h100/session8/). Here dsrc[t, e] = sum_k [ids[t, k] == e] *
    g[t, k], in k order: one fused elementwise pass, deterministic, and exactly the scatter-add's
    value where a row's ids are distinct (top-k ids are), since each element then gets one term."""

    @staticmethod
    def forward(ctx, src_TE: Tensor, ids_TK: Tensor) -> Tensor:
        ctx.save_for_backward(ids_TK)
        ctx.num_experts = src_TE.shape[1]
        return src_TE.gather(1, ids_TK)

    @staticmethod
    def backward(ctx, g_TK: Tensor):
        (ids_TK,) = ctx.saved_tensors
        experts_E = torch.arange(ctx.num_experts, device=ids_TK.device)
        g_TE = None
        for k in range(ids_TK.shape[1]):
            term = torch.where(ids_TK[:, k:k + 1] == experts_E, g_TK[:, k:k + 1], 0.0)
            g_TE = term if g_TE is None else g_TE + term
        return g_TE, None


def gather_k(src_TE: Tensor, ids_TK: Tensor) -> Tensor:
    """[T, K] values of ``src_TE`` at the chosen experts (see ``_GatherK`` for the backward)."""
    return _GatherK.apply(src_TE, ids_TK)


@dataclass(frozen=True)
class RouterConfig:
    kind: RouterKind = param("topk", doc="topk | noisy_topk | group_limited | hash | expert_choice")
    score: Literal["softmax", "sigmoid"] = param("softmax", doc="score function over router logits")
    softmax_before_topk: bool = param(True, doc="softmax over all experts then top-k (else top-k logits, "
                                              "softmax over the K)")
    normalize_topk: bool = param(False, doc="renormalise the K combine weights to sum to 1")
    scaling: float = param(1.0, gt=0, doc="multiply combine weights (DeepSeek routed_scaling_factor)")
    n_groups: int = param(1, ge=1, doc="expert groups for group_limited routing (e.g. EP ranks or nodes)")
    topk_groups: int = param(1, ge=1, doc="groups kept per token for group_limited routing")
    group_score: Literal["max", "top2_sum"] = param("max", doc="group score: max (V2) or sum of best 2 (V3)")
    jitter: float = param(0.0, ge=0, lt=1, doc="Switch input jitter: x * U(1-j, 1+j) in training")
    capacity: float = param(1.0, gt=0, doc="expert_choice: tokens per expert = capacity * T * K / E")
    hash_vocab: int = param(0, ge=0, doc="hash routing: vocabulary size of the token-id -> expert table")
    hash_seed: int = param(0, doc="hash routing: seed of the fixed table")
    init_std: float = param(0.02, gt=0, doc="std of the router weight's normal init")

    def validate(self) -> None:
        if self.kind == "group_limited":
            if self.n_groups < 2:
                raise ConfigError("n_groups", "group_limited routing needs n_groups >= 2")
            if self.topk_groups > self.n_groups:
                raise ConfigError("topk_groups", f"must be <= n_groups ({self.n_groups})")
        if self.kind == "hash" and self.hash_vocab <= 0:
            raise ConfigError("hash_vocab", "hash routing needs the vocabulary size, e.g. hash_vocab: 32000")
        if self.kind == "expert_choice" and self.score != "softmax":
            raise ConfigError("score", "expert_choice routing uses softmax scores; set score: softmax")

    def check_experts(self, num_experts: int, top_k: int, path: str = "router") -> None:
        """Cross-checks against the layer's expert count (called by MoEConfig.validate)."""
        if self.kind == "group_limited":
            if num_experts % self.n_groups:
                raise ConfigError(f"{path}.n_groups", f"must divide num_experts ({num_experts})")
            per_group = num_experts // self.n_groups
            if self.topk_groups * per_group < top_k:
                raise ConfigError(f"{path}.topk_groups", f"topk_groups * experts per group ({per_group}) "
                                  f"must be >= top_k ({top_k}); raise topk_groups")
            if self.group_score == "top2_sum" and per_group < 2:
                raise ConfigError(f"{path}.group_score", "top2_sum needs >= 2 experts per group; use max")


@dataclass
class Routing:
    """What a router decided for T tokens.

    Token choice: ``expert_ids_TK`` and ``weights_TK``. Expert choice: ``token_idx_EC`` and
    ``weights_EC`` (``expert_ids_TK``/``weights_TK`` are None). ``probs_TE`` are the
    probabilities the balance losses use (softmax, or sigmoid scores normalised per token).
    """

    probs_TE: Tensor  # [T, E] float32, differentiable
    logits_TE: Tensor | None  # [T, E] float32 (None for hash routing)
    scores_TE: Tensor  # [T, E] score used for combine weights (softmax or sigmoid)
    expert_ids_TK: Tensor | None = None  # [T, K] int64
    weights_TK: Tensor | None = None  # [T, K] float32 combine weights
    token_idx_EC: Tensor | None = None  # [E, C] int64 (expert choice)
    weights_EC: Tensor | None = None  # [E, C] float32 (expert choice)


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    def deco(cls: type[Router]) -> type[Router]:
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is registered twice")
        ROUTERS[name] = cls
        return cls

    return deco


class Router(nn.Module):
    """Base router: a learned gate ``weight`` [E, D] and the aux-free selection bias.

    ``expert_bias`` (DeepSeek-V3) is a persistent buffer so training resumes with it;
    ``load_accum`` counts routed (token, slot) pairs per expert since the last bias update.
    """

    learned = True

    def __init__(self, num_experts: int, top_k: int, d_model: int, cfg: RouterConfig,
                 balance: BalanceConfig | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.cfg = num_experts, top_k, cfg
        self.balance = balance or BalanceConfig()
        if self.learned:
            self.weight = nn.Parameter(torch.empty(num_experts, d_model))
            nn.init.normal_(self.weight, std=cfg.init_std)
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        self.register_buffer("load_accum", torch.zeros(num_experts), persistent=False)

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits in float32 (float64 for float64 input); the backend's GEMM (router_gemm)."""
        if self.training and self.cfg.jitter > 0:  # Switch Transformer input jitter
            x = x_TD.to(logits_dtype(x_TD))
            noise = torch.empty_like(x).uniform_(1.0 - self.cfg.jitter, 1.0 + self.cfg.jitter)
            return linear_upcast(x * noise, self.weight)
        return router_logits(x_TD, self.weight)

    def scores(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
        """(scores used for weights, probabilities used by balance losses)."""
        if self.cfg.score == "sigmoid":
            s = torch.sigmoid(logits_TE)
            return s, s / s.sum(-1, keepdim=True)
        p = torch.softmax(logits_TE, dim=-1)
        return p, p

    def selection_scores(self, scores_TE: Tensor, logits_TE: Tensor) -> Tensor:
        """Scores the top-k is taken over: plus the aux-free bias, or Sinkhorn-balanced."""
        sel = scores_TE.detach()
        if self.training and self.balance.sinkhorn:
            sel = sinkhorn(logits_TE.detach(), self.balance.sinkhorn_iters)
        if self.balance.aux_free:
            sel = sel + self.expert_bias.to(sel.dtype)
        return sel

    def limit(self, sel_TE: Tensor) -> Tensor:
        """Restrict the choice (group-limited routing); identity here."""
        return sel_TE

    def combine_weights(self, ids_TK: Tensor, scores_TE: Tensor, logits_TE: Tensor) -> Tensor:
        if self.cfg.score == "softmax" and not self.cfg.softmax_before_topk:
            w = torch.softmax(gather_k(logits_TE, ids_TK), dim=-1)  # Mixtral: softmax over the K
        else:
            w = gather_k(scores_TE, ids_TK)
            if self.cfg.normalize_topk:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.cfg.scaling

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None,
                replay_ids_TK: Tensor | None = None) -> Routing:
        logits = self.logits(x_TD)
        scores, probs = self.scores(logits)
        if replay_ids_TK is not None:
            ids = replay_ids_TK.to(device=logits.device, dtype=torch.long)
        else:
            sel = self.limit(self.selection_scores(scores, logits))
            ids = dispatch_ops_for(sel).topk_ids(sel, self.top_k)
        self.accumulate_load(ids)
        return Routing(probs_TE=probs, logits_TE=logits, scores_TE=scores, expert_ids_TK=ids,
                       weights_TK=self.combine_weights(ids, scores, logits))

    @torch.no_grad()
    def accumulate_load(self, ids: Tensor) -> None:
        """Count routed pairs per expert for the aux-free bias update (training only)."""
        if self.training and self.balance.aux_free:
            self.load_accum += expert_counts(ids, self.num_experts, self.load_accum.dtype)


@register_router("topk")
class TopKRouter(Router):
    """Token-choice top-k over softmax or sigmoid scores."""


@register_router("noisy_topk")
class NoisyTopKRouter(Router):
    """Shazeer et al. 2017 noisy top-k gating: learned, input-dependent Gaussian noise."""

    def __init__(self, num_experts: int, top_k: int, d_model: int, cfg: RouterConfig,
                 balance: BalanceConfig | None = None) -> None:
        super().__init__(num_experts, top_k, d_model, cfg, balance)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))  # zero at start (paper)

    def logits(self, x_TD: Tensor) -> Tensor:
        clean = super().logits(x_TD)
        if not self.training:
            return clean
        dt = clean.dtype
        std = F.softplus(linear_upcast(x_TD.to(dt), self.noise_weight))
        return clean + torch.randn_like(clean) * std


@register_router("group_limited")
class GroupLimitedRouter(Router):
    """DeepSeek-V2/V3 group-limited routing: best groups first, then experts inside them."""

    def limit(self, sel_TE: Tensor) -> Tensor:
        T, E = sel_TE.shape
        G = self.cfg.n_groups
        sel_TGe = sel_TE.view(T, G, E // G)
        if self.cfg.group_score == "top2_sum":
            group_TG = sel_TGe.topk(2, dim=-1).values.sum(-1)
        else:
            group_TG = sel_TGe.amax(dim=-1)
        # A float scatter then a compare: the same mask, and it exports to ONNX with both exporters.
        best_TG = group_TG.topk(self.cfg.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_TG).scatter(1, best_TG, 1.0) > 0
        keep_TE = keep_TG.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        return sel_TE.masked_fill(~keep_TE, float("-inf"))


@register_router("hash")
class HashRouter(Router):
    """Roller et al. 2021 hash layers: token id -> fixed random expert(s), no learned gate."""

    learned = False

    def __init__(self, num_experts: int, top_k: int, d_model: int, cfg: RouterConfig,
                 balance: BalanceConfig | None = None) -> None:
        super().__init__(num_experts, top_k, d_model, cfg, balance)
        gen = torch.Generator().manual_seed(cfg.hash_seed)
        base = torch.randint(num_experts, (cfg.hash_vocab,), generator=gen)
        # K consecutive experts from the hashed one: distinct, and balanced when base is uniform.
        table = (base.unsqueeze(1) + torch.arange(top_k)) % num_experts
        self.register_buffer("table", table, persistent=False)

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None,
                replay_ids_TK: Tensor | None = None) -> Routing:
        if token_ids_T is None:
            raise ValueError("hash routing needs token_ids: call the MoE layer with token_ids=[B, S] ids")
        dt = logits_dtype(x_TD)
        if replay_ids_TK is not None:
            ids = replay_ids_TK.to(device=x_TD.device, dtype=torch.long)
        else:
            ids = self.table.to(x_TD.device)[token_ids_T.reshape(-1).long() % self.cfg.hash_vocab]
        T, E, K = ids.shape[0], self.num_experts, ids.shape[1]
        probs = x_TD.new_zeros(T, E, dtype=dt).scatter_(1, ids, 1.0 / K)
        weights = torch.full((T, K), self.cfg.scaling / K, dtype=dt, device=x_TD.device)
        self.accumulate_load(ids)
        return Routing(probs_TE=probs, logits_TE=None, scores_TE=probs, expert_ids_TK=ids, weights_TK=weights)


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Zhou et al. 2022: each expert takes its C highest-probability tokens."""

    def capacity(self, num_tokens: int) -> int:
        per_expert = math.ceil(self.cfg.capacity * num_tokens * self.top_k / self.num_experts)
        return max(1, min(num_tokens, per_expert))

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None,
                replay_ids_TK: Tensor | None = None) -> Routing:
        if replay_ids_TK is not None:
            raise ValueError("routing replay needs token-choice routing; expert_choice has no per-token ids")
        logits = self.logits(x_TD)
        probs = torch.softmax(logits, dim=-1)  # over experts, per token (paper eq. 1)
        C = self.capacity(x_TD.shape[0])
        weights_EC, token_idx_EC = probs.t().topk(C, dim=-1)
        return Routing(probs_TE=probs, logits_TE=logits, scores_TE=probs, token_idx_EC=token_idx_EC,
                       weights_EC=weights_EC * self.cfg.scaling)


def build_router(num_experts: int, top_k: int, d_model: int, cfg: RouterConfig,
                 balance: BalanceConfig | None = None) -> Router:
    return ROUTERS[cfg.kind](num_experts, top_k, d_model, cfg, balance)
