"""Package-version helpers shared by the backends and `anymoe env` (no imports beyond the stdlib)."""

from __future__ import annotations

import importlib.metadata


def major_minor(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13)."""
    parts = version.split("+")[0].split(".")[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


__all__ = ["installed_version", "major_minor"]
