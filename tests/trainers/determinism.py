"""Shared by the parity tests: parity mode turns deterministic algorithms on in this process."""

import contextlib

import torch


@contextlib.contextmanager
def restore_determinism():
    """Leave torch's deterministic-algorithms setting as it was before the block."""
    before = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)
