"""Device-specific code lives in anymoe/backends/ only (DESIGN.md: layers)."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "anymoe"
DEVICE_WORDS = re.compile(
    r"torch\.cuda|torch\.npu\b|torch_npu|intel_extension_for_pytorch|\bipex\b|\.cuda\(|\.npu\(|\bnccl\b|\bhccl\b"
    r"|[\"'](cuda|npu)(:\d+)?[\"']"  # "cuda", 'npu:0'
    r"|\b(NCCL|HCCL|CUBLAS|CUDA|ASCEND)_[A-Z_]+",  # device libraries' environment variables
    re.IGNORECASE,
)
DEVICE_FREE = ["core", "models", "trainers", "data"]


def test_no_device_names_outside_backends():
    offenders = []
    for folder in DEVICE_FREE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if DEVICE_WORDS.search(line):
                    offenders.append(f"{path.relative_to(ROOT.parent)}:{lineno}: {line.strip()}")
    assert not offenders, "device-specific code outside anymoe/backends/:\n" + "\n".join(offenders)


def test_core_does_not_import_higher_layers():
    for path in sorted((ROOT / "core").rglob("*.py")):
        text = path.read_text()
        for higher in ("anymoe.models", "anymoe.trainers"):
            assert higher not in text, f"{path} imports {higher}: core must not depend on higher layers"


# Each vendor extension is imported by exactly one backend module, never at import time.
EXTENSION_HOME = {"torch_npu": "npu.py", "intel_extension_for_pytorch": "cpu.py"}


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_vendor_extensions_are_imported_by_their_backend_only():
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for module in _imports(tree) & set(EXTENSION_HOME):
            assert path == ROOT / "backends" / EXTENSION_HOME[module], f"{path} imports {module}"
        top = {n.names[0].name.split(".")[0] for n in tree.body if isinstance(n, ast.Import)}
        assert not top & set(EXTENSION_HOME), f"{path} imports a vendor extension at import time"
        if "torch.cuda" in path.read_text():
            assert path.parent.name == "backends", f"{path} uses torch.cuda outside anymoe/backends/"


def test_package_turns_off_torch_extension_autoload_before_torch_loads():
    """A torch_npu installed without CANN would otherwise break `import torch` (torch auto-loads it)."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] == "torch" for n in names), "anymoe/__init__ imports torch"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    code = ("import anymoe, os, sys; "
            "print(os.environ['TORCH_DEVICE_BACKEND_AUTOLOAD'], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT.parent, timeout=60)
    assert done.stdout.split() == ["0", "False"], done.stderr


def test_ruff_bans_device_apis_outside_backends():
    text = (ROOT.parent / "pyproject.toml").read_text()
    for api in ("torch.cuda", "torch_npu", "intel_extension_for_pytorch"):
        assert f'"{api}".msg' in text, f"pyproject.toml: ruff banned-api lacks {api}"
    assert re.search(r'"anymoe/backends/\*" = \[[^]]*"TID251"', text), "backends must be exempt from TID251"
