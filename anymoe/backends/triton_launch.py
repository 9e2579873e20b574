"""What the CUDA backend's Triton-kernel modules share about calling their kernels."""

from __future__ import annotations

import torch


def eager() -> bool:
    """Outside torch.compile the launchers run directly; while tracing, the custom ops (one opaque
    node each for the compiler) do. Eagerly the custom-op layer would only add host time."""
    return not torch.compiler.is_compiling()


__all__ = ["eager"]
