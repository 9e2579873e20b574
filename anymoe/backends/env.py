"""`anymoe env`: which backends can run here, and why not; package versions; the default.

Versions are read from installed package metadata, never by importing the package:
importing a torch_npu without CANN, or an IPEX built for another torch, fails (or exits
the process), and `anymoe env` exists to explain exactly that. Only the backend modules'
own guarded probes import their extensions.

    anymoe env                  table of backends, devices, versions, the auto choice
    anymoe env --backend npu    check one backend: exit 0 if usable, else 1 and the reason
    anymoe env --json           the same facts as JSON

Other commands call :func:`add_backend_option` and :func:`backend_from_args` to get the
same `--backend NAME` check before they start any work.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

from anymoe.backends.versions import installed_version
from anymoe.core.backend import Backend, BackendUnavailable, backend_names, create_backend, get_backend

PACKAGES = [
    "anymoe", "torch", "torch-npu", "deepspeed", "intel-extension-for-pytorch",
    "onnx", "onnxruntime", "onnxscript", "transformers", "safetensors", "numpy", "pyyaml",
]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        versions[name] = installed_version(name)
    if versions["anymoe"] is None:  # run from a source tree (PYTHONPATH=.), not installed
        from anymoe import __version__

        versions["anymoe"] = f"{__version__} (source tree)"
    return versions


def collect() -> dict[str, Any]:
    """Every fact `anymoe env` shows, as plain data."""
    rows = []
    for name in backend_names():
        b = create_backend(name)
        status = b.availability()
        rows.append({
            "name": name, "available": status.ok, "reason": status.reason,
            "devices": b.device_count() if status.ok else 0, "dist_backend": b.dist_backend,
            "sizing": b.sizing_policy().kind, "extensions": b.extensions() if status.ok else {},
        })
    try:
        default = get_backend("auto").name
    except BackendUnavailable as err:
        default = f"none ({err})"
    return {"backends": rows, "default": default, "versions": package_versions()}


def format_table(facts: dict[str, Any]) -> str:
    lines = [f"{'backend':8} {'usable':6} {'devices':7} {'dist':5} {'sizing':8} details"]
    for r in facts["backends"]:
        usable = "yes" if r["available"] else "no"
        lines.append(
            f"{r['name']:8} {usable:6} {r['devices']:<7} {r['dist_backend']:5} {r['sizing']:8} {r['reason']}"
        )
        for ext, text in r["extensions"].items():
            lines.append(f"{'':8} {'':6} {'':7} {'':5} {'':8} {ext}: {text}")
    lines.append(f"default (backend: auto): {facts['default']}")
    lines.append("versions: " + ", ".join(f"{k} {v or '-'}" for k, v in facts["versions"].items()))
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", metavar="NAME", default=None,
                        help="check one backend (auto, cpu, cuda, npu): exit 1 with the reason if unusable")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")


def run(args: argparse.Namespace) -> int:
    if args.backend is not None:
        try:
            b = get_backend(args.backend)
        except BackendUnavailable as err:
            print(f"anymoe: {err}", file=sys.stderr)
            if args.json:
                print(json.dumps({"backend": args.backend, "usable": False, "reason": str(err)}))
            return 1
        status = b.availability()
        if args.json:
            print(json.dumps({"backend": b.name, "usable": True, "reason": status.reason,
                              "devices": b.device_count()}))
        else:
            print(f"backend {b.name!r} is usable: {status.reason}")
        return 0
    facts = collect()
    print(json.dumps(facts, indent=1) if args.json else format_table(facts))
    return 0


def add_backend_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """The `--backend NAME` option every command that runs work accepts (``help``: what it selects there)."""
    parser.add_argument("--backend", metavar="NAME", default=None,
                        help=help or "auto (default: cuda, then npu, then cpu), cpu, cuda or npu")


def backend_from_args(args: argparse.Namespace, configured: str = "auto", **kwargs: Any) -> Backend:
    """The checked backend named on the command line (else by the config); exits with one line if unusable."""
    name = getattr(args, "backend", None) or configured
    try:
        return get_backend(name, **kwargs)
    except BackendUnavailable as err:
        raise SystemExit(f"anymoe: {err}") from None
