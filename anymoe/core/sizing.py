"""Expert sizing policies: how a backend wants an expert's hidden size laid out.

Ascend's matrix units prefer power-of-two expert dimensions, so the NPU backend pads the
expert hidden size F up to a policy size P >= F with zero weights. Zero-padded SwiGLU
columns are inert: silu(0) * 0 = 0 feeds zero rows of w2, and the gradients of the pad are
exactly zero, so AdamW (whose decoupled weight decay of 0 is 0) keeps them at zero. The
padded model therefore computes the same function, and checkpoints stay unpadded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertSizingPolicy:
    """Maps a canonical expert hidden size to the size the device computes with."""

    kind: str = "identity"  # identity | pow2 | multiple_of
    multiple: int = 1

    def padded(self, hidden: int) -> int:
        if hidden <= 0:
            raise ValueError(f"expert hidden size must be positive, got {hidden}")
        if self.kind == "identity":
            return hidden
        if self.kind == "pow2":
            return 1 << (hidden - 1).bit_length()
        if self.kind == "multiple_of":
            return -(-hidden // self.multiple) * self.multiple
        raise ValueError(f"unknown sizing policy {self.kind!r}; use identity, pow2 or multiple_of")


IDENTITY = ExpertSizingPolicy("identity")
POW2 = ExpertSizingPolicy("pow2")


def parse_policy(spec: str) -> ExpertSizingPolicy:
    """'identity', 'pow2' or 'multiple_of:N' -> a policy (used by --set and tests)."""
    if spec in ("identity", "pow2"):
        return ExpertSizingPolicy(spec)
    if spec.startswith("multiple_of:") and spec.split(":", 1)[1].isdigit():
        return ExpertSizingPolicy("multiple_of", int(spec.split(":", 1)[1]))
    raise ValueError(f"sizing policy {spec!r} is not one of identity, pow2, multiple_of:N")
