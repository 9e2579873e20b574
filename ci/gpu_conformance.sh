#!/usr/bin/env bash
# Backend conformance on a CUDA machine, from the source tree (no pip install needed):
# grouped matmul (fp32/bf16, empty and single-row groups, grads) vs float64, seeding,
# determinism, memory stats, and every collective over NCCL across 2 (and 4) GPUs.
#
#   bash ci/gpu_conformance.sh [LABEL] [extra pytest args]
# Writes $OUT/gpu_conformance_<LABEL>.json (or bench/results/ when $OUT is unset) and the
# JUnit XML beside it. Exit status: pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_DEVICE_BACKEND_AUTOLOAD=0
LABEL="${1:-cuda}"; shift || true
DEST="${OUT:-bench/results}"
mkdir -p "$DEST"
python -c "import torch, pytest; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpus', torch.cuda.device_count())" || { echo "needs torch and pytest on this machine"; exit 2; }
python -m anymoe env || true
# -m 'not slow' replaces pyproject's default '-m not gpu ...' so the gpu-marked tests run.
python -m pytest tests/backends tests/core/test_grouped_mm.py -m 'not slow' -q -rs -p no:cacheprovider \
  --junitxml="$DEST/gpu_conformance_${LABEL}.xml" "$@"
status=$?
python bench/conformance.py "$DEST/gpu_conformance_${LABEL}.xml" "$DEST/gpu_conformance_${LABEL}.json" \
  --label "$LABEL"
exit $status
