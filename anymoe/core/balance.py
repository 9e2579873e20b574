"""Load balancing: auxiliary losses, the auxiliary-loss-free bias, Sinkhorn.

Every loss here is returned unweighted; ``BalanceConfig`` holds the coefficients and
``weighted_total`` applies them. Notation: f_i is the load of expert i, P_i its mean router
probability, with f_i = E / (K T) * count_i so a perfectly balanced router has f_i = 1.

- ``aux_loss`` (Switch Transformer eq. 4, GShard; DeepSeek-V2 expert-level eq. 12):
  sum_i f_i P_i per micro-batch. Minimum 1 at uniform load and probability.
- ``global_batch`` (Qiu et al. 2025, "Demons in the Detail"): the same loss with the counts
  summed over the data-parallel group first, so each micro-batch is balanced against the
  global batch rather than forced to balance on its own.
- ``seq_aux_loss`` (DeepSeek-V3 eq. 17-20): the same quantity per sequence, with P from
  per-token normalised scores, averaged over sequences.
- ``ep_group_loss`` (DeepSeek-V2 device-level eq. 14; Pangu Ultra EP-group loss): experts
  split into G contiguous groups (one per EP rank); f'_g = mean of f_i in the group,
  P'_g = sum of P_i in it, loss sum_g f'_g P'_g; counts summed over the EP group when given.
- ``z_loss`` (ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2; keeps logits small.
- aux-free balancing (DeepSeek-V3 sec. 2.1.2): a per-expert bias added to the scores for
  the top-k choice only; after each optimizer step b_i += rate * sign(mean load - load_i).
- Sinkhorn (BASE layers, Clark et al. 2022 / Megatron): choose experts on doubly
  normalised scores so every expert gets T*K/E of the assignment mass.

Process groups are optional everywhere: a world of one passes None and nothing is reduced.
Counts are not differentiable, so their all-reduce needs no autograd.

Legend: B batch, S sequence, T tokens, E experts, K top-k, G expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from anymoe.core import collectives
from anymoe.core.collectives import Group
from anymoe.core.config import ConfigError, param
from anymoe.core.dispatch_fast import dispatch_ops_for

LOSS_NAMES = ("aux_loss", "seq_aux_loss", "ep_group_loss", "z_loss")


@dataclass(frozen=True)
class BalanceConfig:
    aux_loss: float = param(0.0, ge=0, doc="Switch/GShard aux loss coefficient (e.g. 1e-2)")
    seq_aux_loss: float = param(0.0, ge=0, doc="DeepSeek-V3 sequence-level aux loss coefficient (e.g. 1e-4)")
    global_batch: bool = param(False, doc="aux_loss counts summed over the data-parallel group first")
    ep_group_loss: float = param(0.0, ge=0, doc="device-level / EP-group balance loss coefficient")
    ep_groups: int = param(0, ge=0, doc="expert groups of the EP-group loss; 0 = the EP world size")
    z_loss: float = param(0.0, ge=0, doc="ST-MoE router z-loss coefficient (e.g. 1e-3)")
    aux_free: bool = param(False, doc="DeepSeek-V3 auxiliary-loss-free bias balancing")
    bias_update_rate: float = param(1e-3, gt=0, doc="aux-free bias step per update")
    sinkhorn: bool = param(False, doc="choose experts on Sinkhorn-balanced scores in training")
    sinkhorn_iters: int = param(8, ge=1, doc="Sinkhorn normalisation rounds")

    def validate(self) -> None:
        if self.aux_free and self.sinkhorn:
            raise ConfigError("sinkhorn", "pick one selection balancer: aux_free or sinkhorn, not both")


def all_reduce_sum(t: Tensor, group: object | None) -> Tensor:
    """Sum over a process group (a detached copy); identity for None or a group of one.

    ``group``: an anymoe.core.collectives.Group or a raw torch.distributed ProcessGroup.
    """
    if group is None:
        return t
    if isinstance(group, Group):
        return collectives.all_reduce(t.detach(), group, "sum")
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def expert_counts(ids_TK: Tensor, num_experts: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Routed (token, slot) pairs per expert, [E]; ids < 0 (dropped) are not counted. No host
    sync; the backend's histogram kernel where it registers one (dispatch_fast.DispatchOps)."""
    return dispatch_ops_for(ids_TK).expert_counts(ids_TK.reshape(-1), num_experts).to(dtype)


def aux_loss(probs_TE: Tensor, ids_TK: Tensor, group: object | None = None,
             counts_E: Tensor | None = None) -> Tensor:
    """Switch eq. 4: E * sum_i (count_i / (T K)) * mean_t p_ti. ``group``: global-batch counts.
    ``counts_E``: this rank's expert_counts(ids_TK) when the caller has them already."""
    T, E = probs_TE.shape
    K = ids_TK.shape[1]
    counts = expert_counts(ids_TK, E, probs_TE.dtype) if counts_E is None else counts_E.to(probs_TE.dtype)
    total = torch.full((), float(T * K), dtype=probs_TE.dtype, device=probs_TE.device)  # no host copy
    if group is not None:
        counts, total = all_reduce_sum(counts, group), all_reduce_sum(total, group)
    f_E = counts * (E / total)
    return (f_E * probs_TE.mean(0)).sum()


def seq_aux_loss(probs_BSE: Tensor, ids_BSK: Tensor) -> Tensor:
    """DeepSeek-V3 eq. 17-20: per sequence sum_i f_i P_i, f_i = E/(K S) count_i; mean over B."""
    B, S, E = probs_BSE.shape
    K = ids_BSK.shape[-1]
    flat = ids_BSK.reshape(B, S * K)
    counts_BE = torch.zeros(B, E + 1, dtype=probs_BSE.dtype, device=probs_BSE.device)
    counts_BE.scatter_add_(1, torch.where(flat < 0, E, flat), torch.ones_like(flat, dtype=probs_BSE.dtype))
    f_BE = counts_BE[:, :E] * (E / (K * S))
    return (f_BE * probs_BSE.mean(1)).sum(-1).mean()


def ep_group_loss(probs_TE: Tensor, ids_TK: Tensor, num_groups: int, group: object | None = None) -> Tensor:
    """DeepSeek-V2 eq. 14 device-level loss over ``num_groups`` contiguous expert groups."""
    T, E = probs_TE.shape
    K = ids_TK.shape[1]
    if E % num_groups:
        raise ValueError(f"ep_group_loss: {num_groups} groups do not divide {E} experts")
    counts = expert_counts(ids_TK, E, probs_TE.dtype)
    total = torch.full((), float(T * K), dtype=probs_TE.dtype, device=probs_TE.device)  # no host copy
    if group is not None:
        counts, total = all_reduce_sum(counts, group), all_reduce_sum(total, group)
    f_GE = (counts * (E / total)).view(num_groups, E // num_groups)
    P_GE = probs_TE.mean(0).view(num_groups, E // num_groups)
    return (f_GE.mean(-1) * P_GE.sum(-1)).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE eq. 5: mean_t (log sum_j exp x_tj)^2."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def sinkhorn(logits_TE: Tensor, iters: int = 8) -> Tensor:
    """Doubly normalised exp(logits): rows sum to 1/T, columns to 1/E (fixed rounds, no sync).

    A per-row max is subtracted first; row scalings are absorbed by the row normaliser.
    """
    T, E = logits_TE.shape
    cost = torch.exp(logits_TE - logits_TE.amax(-1, keepdim=True))
    d0 = cost.new_ones(T)
    d1 = cost.new_ones(E)
    for _ in range(iters):
        d0 = (1.0 / T) / ((cost * d1).sum(1) + 1e-8)
        d1 = (1.0 / E) / ((cost * d0.unsqueeze(1)).sum(0) + 1e-8)
    return cost * d0.unsqueeze(1) * d1


@torch.no_grad()
def aux_free_update(bias_E: Tensor, load_E: Tensor, rate: float) -> None:
    """DeepSeek-V3: b_i += rate * sign(mean load - load_i), in place (under-loaded experts rise)."""
    bias_E.add_(torch.sign(load_E.mean() - load_E).to(bias_E.dtype), alpha=rate)


def balance_losses(cfg: BalanceConfig, probs_TE: Tensor, logits_TE: Tensor | None, ids_TK: Tensor,
                   batch: tuple[int, int], dp_group: object | None = None, ep_group: object | None = None,
                   num_ep_groups: int = 1, counts_E: Tensor | None = None) -> dict[str, Tensor]:
    """The enabled losses (coefficient > 0), unweighted, named; ``batch`` is (B, S) with T = B*S.
    ``counts_E``: expert_counts(ids_TK) if the caller has them (one histogram per layer)."""
    out: dict[str, Tensor] = {}
    if cfg.aux_loss > 0:
        out["aux_loss"] = aux_loss(probs_TE, ids_TK, dp_group if cfg.global_batch else None, counts_E)
    if cfg.seq_aux_loss > 0:
        B, S = batch
        out["seq_aux_loss"] = seq_aux_loss(probs_TE.view(B, S, -1), ids_TK.view(B, S, -1))
    if cfg.ep_group_loss > 0:
        groups = cfg.ep_groups or num_ep_groups
        out["ep_group_loss"] = ep_group_loss(probs_TE, ids_TK, groups, ep_group)
    if cfg.z_loss > 0 and logits_TE is not None:
        out["z_loss"] = z_loss(logits_TE)
    return out


def weighted_total(cfg: BalanceConfig, losses: dict[str, Tensor], like: Tensor) -> Tensor:
    """sum of coefficient * loss; a zero scalar (on ``like``'s device) when none is enabled."""
    total = like.new_zeros((), dtype=torch.float32 if like.dtype != torch.float64 else like.dtype)
    for name, value in losses.items():
        total = total + getattr(cfg, name) * value
    return total
