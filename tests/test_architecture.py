"""Device-specific code lives in anymoe/backends/ only (DESIGN.md: layers)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "anymoe"
DEVICE_WORDS = re.compile(
    r"torch\.cuda|torch_npu|intel_extension_for_pytorch|\bipex\b|\.cuda\(|\bnccl\b|\bhccl\b|[\"']cuda[\"']|[\"']npu[\"']",
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
