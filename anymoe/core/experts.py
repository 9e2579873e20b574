"""Stacked SwiGLU experts computed through a grouped matmul, and always-on shared experts.

``Experts`` holds this rank's E_local experts as stacked weights, w1/w3 [E, D, F] (gate
and up; or one fused w13 [E, D, 2F] = [gate | up]) and w2 [E, F, D], and computes
``y = (silu(x w1) * (x w3)) w2`` for rows already sorted by expert, with the backend's
``grouped_mm(x_TD, w_EDF, counts_E)``.

Expert sizing: a policy may pad F up to P (powers of two on Ascend). The parameters are
*stored* padded, with zeros in columns F..P of w1/w3 and rows F..P of w2, so the kernels
see the shape they want with no copy per step. The pad is inert and stays exactly zero:
its SwiGLU activation is silu(0) * 0 = 0, so every gradient into it is zero, Adam's moments
stay zero (update 0 / (sqrt(0) + eps) = 0), and decoupled weight decay of 0 is 0. The state
dict is always canonical (unpadded F): a post-hook slices the pad off, a load pre-hook pads
incoming canonical tensors, so checkpoints move between backends. (Padding in forward
instead would copy every expert weight every step.) Optimizer state keeps the stored
(padded) shape.

Initialisation draws the canonical weights of *all* E experts from torch's global
generator, expert by expert, and keeps the local ones: the same seed gives the same
weights for any sizing policy and any expert-parallel size.

Legend: N rows sorted by expert, D model dim, F expert hidden (canonical), P padded hidden,
E local experts, H shared hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anymoe.core.dispatch_fast import swiglu, swiglu_weighted
from anymoe.core.grouped_mm import GroupedMM, grouped_mm_loop
from anymoe.core.sizing import IDENTITY, ExpertSizingPolicy


class Experts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, hidden: int, *, num_local: int | None = None,
                 local_offset: int = 0, grouped_mm: GroupedMM | None = None,
                 sizing: ExpertSizingPolicy | None = None, fused_w13: bool = False,
                 init_std: float = 0.02, out_std: float | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.num_local = num_experts if num_local is None else num_local
        self.local_offset = local_offset
        self.d_model, self.hidden = d_model, hidden
        self.sizing = sizing or IDENTITY
        self.padded_hidden = self.sizing.padded(hidden)
        self.grouped_mm = grouped_mm or grouped_mm_loop
        self.fused_w13 = fused_w13
        E, D, P = self.num_local, d_model, self.padded_hidden
        if fused_w13:
            self.w13 = nn.Parameter(torch.zeros(E, D, 2 * P))
        else:
            self.w1 = nn.Parameter(torch.zeros(E, D, P))
            self.w3 = nn.Parameter(torch.zeros(E, D, P))
        self.w2 = nn.Parameter(torch.zeros(E, P, D))
        self.reset_parameters(init_std, out_std)
        self.register_state_dict_post_hook(_canonical_state_dict)
        self.register_load_state_dict_pre_hook(_pad_loaded_state)

    # --- canonical <-> stored layout -------------------------------------------------------
    def canonical(self) -> dict[str, Tensor]:
        """Unpadded views of the weights (w1/w3 [E, D, F] or w13 [E, D, 2F], w2 [E, F, D])."""
        Fh, P = self.hidden, self.padded_hidden
        out = {}
        if self.fused_w13:
            out["w13"] = torch.cat([self.w13[..., :Fh], self.w13[..., P:P + Fh]], dim=-1)
        else:
            out["w1"], out["w3"] = self.w1[..., :Fh], self.w3[..., :Fh]
        out["w2"] = self.w2[:, :Fh, :]
        return out

    def to_stored(self, name: str, value: Tensor) -> Tensor:
        """A canonical tensor in the stored (padded) layout."""
        Fh, P = self.hidden, self.padded_hidden
        if P == Fh:
            return value
        if name == "w13":
            gate, up = value[..., :Fh], value[..., Fh:]
            return torch.cat([F.pad(gate, (0, P - Fh)), F.pad(up, (0, P - Fh))], dim=-1)
        if name == "w2":
            return F.pad(value, (0, 0, 0, P - Fh))
        return F.pad(value, (0, P - Fh))

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal(0, std) canonical weights of all E experts, drawn in a fixed order; pad zero."""
        out_std = std if out_std is None else out_std
        E, D, Fh = self.num_experts, self.d_model, self.hidden
        lo, hi = self.local_offset, self.local_offset + self.num_local
        draws = {}
        for name, shape, s in (("w1", (D, Fh), std), ("w3", (D, Fh), std), ("w2", (Fh, D), out_std)):
            # Draw every expert (global generator, CPU) so EP sizes agree; keep the local slice.
            local = []
            for e in range(E):
                w = torch.randn(shape) * s
                if lo <= e < hi:
                    local.append(w)
            draws[name] = torch.stack(local) if local else torch.zeros(0, *shape)
        canon = {"w2": draws["w2"]}
        if self.fused_w13:
            canon["w13"] = torch.cat([draws["w1"], draws["w3"]], dim=-1)
        else:
            canon["w1"], canon["w3"] = draws["w1"], draws["w3"]
        for name, value in canon.items():
            param = getattr(self, name)
            param.copy_(self.to_stored(name, value).to(param.dtype))

    @torch.no_grad()
    def zero_pad_(self) -> None:
        """Force the pad back to zero (after an external re-initialisation of the stored params)."""
        Fh, P = self.hidden, self.padded_hidden
        if P == Fh:
            return
        if self.fused_w13:
            self.w13[..., Fh:P].zero_()
            self.w13[..., P + Fh:].zero_()
        else:
            self.w1[..., Fh:].zero_()
            self.w3[..., Fh:].zero_()
        self.w2[:, Fh:, :].zero_()

    def pad_is_zero(self) -> bool:
        Fh, P = self.hidden, self.padded_hidden
        if P == Fh:
            return True
        parts = [self.w2[:, Fh:, :]]
        parts += [self.w13[..., Fh:P], self.w13[..., P + Fh:]] if self.fused_w13 else \
            [self.w1[..., Fh:], self.w3[..., Fh:]]
        return all(bool((p == 0).all()) for p in parts)

    # --- compute ------------------------------------------------------------------------------
    @property
    def takes_row_weights(self) -> bool:
        """Whether forward folds combine weights in (MoELayer._token_choice). Only the fused
        w13 path: its one-pass SwiGLU takes the weight for free. The separate w1/w3 path is the
        reference one and keeps the weighted combine (a row reduction there would round
        differently over pow2-padded columns; padded and unpadded runs stay bitwise equal)."""
        return self.fused_w13

    def forward(self, x_ND: Tensor, counts_E: Tensor, row_weights_N: Tensor | None = None) -> Tensor:
        """SwiGLU of each row through its expert; rows sorted by local expert, counts [E_local].

        ``row_weights_N`` (fused w13 only): each row's combine weight, folded into the activation
        before w2 (exact, w2 is linear), so the caller's combine is a plain sum that keeps no copy
        of the outputs for its backward; the weight's gradient comes out of the SwiGLU pass.
        """
        mm = self.grouped_mm
        if self.fused_w13:
            # One pass over [gate | up] (a fused kernel where the backend registers one).
            h_N2P = mm(x_ND, self.w13, counts_E)
            act = swiglu(h_N2P) if row_weights_N is None else swiglu_weighted(h_N2P, row_weights_N)
            return mm(act, self.w2, counts_E)
        if row_weights_N is not None:
            raise ValueError("row_weights_N needs fused_w13 experts (see takes_row_weights)")
        gate_NP, up_NP = mm(x_ND, self.w1, counts_E), mm(x_ND, self.w3, counts_E)
        return mm(F.silu(gate_NP) * up_NP, self.w2, counts_E)

    def extra_repr(self) -> str:
        return (f"experts={self.num_local}/{self.num_experts} (offset {self.local_offset}), "
                f"d={self.d_model}, "
                f"hidden={self.hidden} (stored {self.padded_hidden}), fused_w13={self.fused_w13}")


def _canonical_state_dict(module: Experts, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if module.padded_hidden == module.hidden:
        return
    for name, value in module.canonical().items():
        key = prefix + name
        if key in state_dict:
            # A copy, not a view: torch.save would write a view's whole (padded) storage.
            value = value.contiguous()
            state_dict[key] = value if state_dict[key].requires_grad else value.detach()


def _pad_loaded_state(module: Experts, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                      missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    Fh, P = module.hidden, module.padded_hidden
    if P == Fh:
        return
    canon_rows = {"w1": Fh, "w3": Fh, "w13": 2 * Fh}
    for name in ("w1", "w3", "w13", "w2"):
        key = prefix + name
        if key not in state_dict or not hasattr(module, name):
            continue
        value = state_dict[key]
        is_canonical = value.shape[1] == Fh if name == "w2" else value.shape[-1] == canon_rows[name]
        if is_canonical:  # padded checkpoints (written by other tools) load as they are
            state_dict[key] = module.to_stored(name, value)


class SharedExperts(nn.Module):
    """Always-on SwiGLU MLP of hidden H (= n_shared * hidden), optional sigmoid gate (Qwen2-MoE)."""

    def __init__(self, d_model: int, hidden: int, gate: bool = False, init_std: float = 0.02) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d_model, hidden) * init_std)
        self.w3 = nn.Parameter(torch.randn(d_model, hidden) * init_std)
        self.w2 = nn.Parameter(torch.randn(hidden, d_model) * init_std)
        self.gate = nn.Parameter(torch.zeros(d_model)) if gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        y = (F.silu(x_TD @ self.w1) * (x_TD @ self.w3)) @ self.w2
        if self.gate is not None:
            y = y * torch.sigmoid(x_TD @ self.gate).unsqueeze(-1)
        return y
