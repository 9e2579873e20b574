#!/usr/bin/env bash
# Ascend NPU checks, two modes:
#  - on a machine where torch_npu imports and sees a device: the backend conformance suite
#    (same tests as on CUDA) over HCCL, summary -> $OUT or bench/results/npu_conformance.json;
#  - anywhere else: install the real torch-npu wheel matching torch into a throwaway venv
#    (--system-site-packages, so it sees this torch) and check that anymoe survives it and
#    names the missing piece (tests/backends/test_npu_backend.py::test_real_wheel_*). The
#    venv is deleted afterwards: an installed torch-npu without CANN breaks `import torch`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_DEVICE_BACKEND_AUTOLOAD=0
DEST="${OUT:-bench/results}"
mkdir -p "$DEST"
if python -m anymoe env --backend npu; then
  python -m pytest tests/backends -m 'not slow' -q -rs -p no:cacheprovider \
    --junitxml="$DEST/npu_conformance.xml" "$@"
  status=$?
  python bench/conformance.py "$DEST/npu_conformance.xml" "$DEST/npu_conformance.json" --label npu
  exit $status
fi
TORCH_MM=$(python -c "import torch; print('.'.join(torch.__version__.split('+')[0].split('.')[:2]))")
VENV="$(mktemp -d)/npuvenv"
trap 'rm -rf "$(dirname "$VENV")"' EXIT
python -m venv "$VENV" --system-site-packages
"$VENV/bin/pip" install -q "torch-npu==${TORCH_MM}.*" || { echo "no torch-npu wheel for torch ${TORCH_MM}"; exit 2; }
ANYMOE_NPU_PYTHON="$VENV/bin/python" python -m pytest tests/backends/test_npu_backend.py -q -rs -p no:cacheprovider "$@"
