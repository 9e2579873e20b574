"""Which implementation of a family of ops runs for a tensor: the backend's, or plain torch.

A family (the fast dispatch kernels, the fused cross-entropy) has a pure-torch implementation
that runs everywhere; a backend registers a faster one for its device type. Autograd functions
look the implementation up by *name*: a string constant traces cleanly under torch.compile,
where an object passed through autograd would not.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from torch import Tensor


class NamedOps(Protocol):
    name: str


OpsT = TypeVar("OpsT", bound=NamedOps)


class OpRegistry(Generic[OpsT]):
    """Device type -> fastest ops, and name -> ops, for one family; ``default`` runs elsewhere."""

    def __init__(self, family: str, default: OpsT) -> None:
        self.family, self.default = family, default
        self._by_device: dict[str, OpsT] = {}
        self._by_name: dict[str, OpsT] = {default.name: default}

    def register(self, device_type: str, ops: OpsT) -> None:
        """A backend's faster ops for tensors of ``device_type`` (one registration each)."""
        if self._by_device.get(device_type, ops) is not ops:
            raise ValueError(f"{self.family} ops for device type {device_type!r} are registered twice")
        if self._by_name.get(ops.name, ops) is not ops:
            raise ValueError(f"{self.family} ops named {ops.name!r} are registered twice; rename one")
        self._by_device[device_type] = ops
        self._by_name[ops.name] = ops

    def for_tensor(self, x: Tensor, fast: bool = True) -> OpsT:
        """The registered ops for x's device (``fast``), else the pure-torch ones."""
        return self._by_device.get(x.device.type, self.default) if fast else self.default

    def named(self, name: str) -> OpsT:
        return self._by_name[name]

    def is_registered(self, ops: OpsT) -> bool:
        return self._by_name.get(ops.name) is ops


__all__ = ["NamedOps", "OpRegistry"]
