"""Row movement for the expert-parallel dispatchers: gathers and their adjoints, no padded copies.

Every expert-parallel dispatcher moves token rows three times on each side of its collectives:
into a send buffer (one row per (token, destination)), from the received rows into rows sorted
by local expert (one per (row, expert) pair), and back (a weighted sum per row, a plain sum per
token). Each move here is an autograd op whose backward is the other move, all on the
dispatch_fast ops (device kernels through ``dispatch_ops_for``), with no host reads.

What "nothing" points at, without a zero row appended to a big tensor (``torch.cat`` would
copy all of it):

- A sum over a token's destinations (``masked_sum``): a destination the token was not sent to
  points at a row the token *was* sent to (row 0 when it was sent nowhere), with weight 0.
- A sum over a row's K pairs (``PermuteRows`` backward, the local combine): a pair computed
  elsewhere points at the sorted rows' own trailing zero row N, which the experts compute like
  any other row (its output is multiplied by weight 0, its gradient is 0).

``phase(name)`` marks a phase of a dispatcher as a profiler range ``ep/<name>`` while a profiler
runs (bench/ep_dispatch.py buckets kernel time by phase); otherwise it does nothing, since a
range costs ~8 us of host time even with no profiler attached.

Legend: T tokens (rows into a hop), D model dim, K top-k, P members of a group, S rows sent,
N pairs computed here (the sorted rows are N + 1 with the pad row).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from anymoe.core.dispatch_fast import dispatch_ops_for

_profiler_enabled = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)


def phase(name: str) -> AbstractContextManager:
    """A profiler range ``ep/<name>`` when a profiler is running, else a no-op context."""
    if _profiler_enabled():
        return torch.profiler.record_function("ep/" + name)
    return nullcontext()


def masked_sum(y_SD: Tensor, pos_TP: Tensor, mask_TP: Tensor) -> Tensor:
    """out[t] = sum_p mask[t, p] y[pos[t, p]] (fp32 accumulation; a forward-only op)."""
    if y_SD.shape[0] == 0 or pos_TP.shape[0] == 0:  # nothing sent (every pair dropped) or no tokens
        return y_SD.new_zeros(pos_TP.shape[0], y_SD.shape[1])
    return dispatch_ops_for(y_SD).combine_fwd(y_SD, pos_TP, mask_TP)


class SendRows(torch.autograd.Function):
    """out[s] = x[src[s]]; backward dx[t] = sum_p mask[t, p] g[pos[t, p]]."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, src_S: Tensor, pos_TP: Tensor, mask_TP: Tensor) -> Tensor:
        ctx.save_for_backward(pos_TP, mask_TP)
        return dispatch_ops_for(x_TD).gather_rows(x_TD.contiguous(), src_S)

    @staticmethod
    def backward(ctx, g_SD: Tensor):
        pos_TP, mask_TP = ctx.saved_tensors
        return masked_sum(g_SD.contiguous(), pos_TP, mask_TP), None, None, None


class ReduceSent(torch.autograd.Function):
    """out[t] = sum_p mask[t, p] y[pos[t, p]]; backward dy[s] = g[src[s]] (SendRows reversed)."""

    @staticmethod
    def forward(ctx, y_SD: Tensor, src_S: Tensor, pos_TP: Tensor, mask_TP: Tensor) -> Tensor:
        ctx.save_for_backward(src_S)
        return masked_sum(y_SD.contiguous(), pos_TP, mask_TP)

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        (src_S,) = ctx.saved_tensors
        return dispatch_ops_for(g_TD).gather_rows(g_TD.contiguous(), src_S), None, None, None


class PermuteRows(torch.autograd.Function):
    """out[n] = x[src[n]]; with ``pad`` the last row is the zero pad row instead. Backward
    dx[t] = sum_k g[pos[t, k]] (pairs computed elsewhere point at the pad row, whose gradient is 0:
    its combine weights are 0)."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, src_N: Tensor, pos_TK: Tensor, pad: bool) -> Tensor:
        ctx.save_for_backward(pos_TK)
        if x_TD.shape[0] == 0:
            return x_TD.new_zeros(src_N.shape[0], x_TD.shape[1])
        out = dispatch_ops_for(x_TD).gather_rows(x_TD.contiguous(), src_N)
        if pad:
            out[-1].zero_()
        return out

    @staticmethod
    def backward(ctx, g_ND: Tensor):
        (pos_TK,) = ctx.saved_tensors
        if pos_TK.shape[0] == 0:
            return g_ND.new_zeros(0, g_ND.shape[1]), None, None, None
        return dispatch_ops_for(g_ND).gather_sum(g_ND.contiguous(), pos_TK), None, None, None


__all__ = ["PermuteRows", "ReduceSent", "SendRows", "masked_sum", "phase"]
