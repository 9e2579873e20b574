#!/usr/bin/env bash
# CPU backend with Intel Extension for PyTorch. IPEX's last release (2.8.0) refuses any torch
# but 2.8.* ("needs to work with PyTorch 2.8.*, but PyTorch 2.13.0+cpu is found"), so this
# builds its own venv with torch 2.8 (CPU wheel) + IPEX 2.8 and runs the CPU conformance
# suite there. Not part of the default CI (a second torch is a large download).
#   bash ci/ipex_cpu.sh [VENV_DIR]
# Cost: a second torch (the ~200 MB CPU wheel) and IPEX (~100 MB) downloaded and installed into
# the venv, then the CPU conformance tests. TORCH_INDEX overrides the torch wheel index (a mirror,
# for machines that cannot reach download.pytorch.org). Measured here with
# TORCH_INDEX=https://pypi.org/simple (PyPI's torch 2.8.0 is the CUDA build; it runs on the CPU):
# 4 min, a 6.8 GB venv, 77 passed / 9 skipped (bench/results/ipex_cpu.json).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/anymoe-ipex-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.8.*" --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
"$VENV/bin/pip" install -q "intel-extension-for-pytorch==2.8.*" pyyaml numpy pytest pytest-timeout
export PYTHONPATH="$PWD" TORCH_DEVICE_BACKEND_AUTOLOAD=0
"$VENV/bin/python" -m anymoe env
# The env table must say "ipex: used: intel-extension-for-pytorch 2.8.x".
"$VENV/bin/python" -m anymoe env --json | "$VENV/bin/python" -c \
  "import json,sys; f=json.load(sys.stdin); cpu=[b for b in f['backends'] if b['name']=='cpu'][0]; \
   assert cpu['extensions']['ipex'].startswith('used'), cpu; print('IPEX in use:', cpu['extensions']['ipex'])"
"$VENV/bin/python" -m pytest tests/backends tests/core/test_grouped_mm.py -q -rs -p no:cacheprovider
