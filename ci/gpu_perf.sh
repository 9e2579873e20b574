#!/usr/bin/env bash
# GPU performance run (issue 9): GPU-marked kernel tests, then the MoE-layer and
# training-throughput benches; JSON results and logs go to $OUT (default bench/results).
# Usage on the GPU machine, from the repo root:  bash ci/gpu_perf.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
TAG=${TAG:-$(python3 -c 'import torch; print(torch.cuda.get_device_name(0).split()[1].lower())' 2>/dev/null || echo gpu)}
status=0
python3 -m pytest -m gpu -q -p no:cacheprovider tests/backends/test_cuda_kernels.py 2>&1 | tee "$OUT/gpu_tests_$TAG.log" || status=1
if [[ "${1:-}" == "--quick" ]]; then
  python3 bench/moe_layer.py --configs C --iters 10 --out "$OUT/moe_layer_${TAG}_quick.json" || status=1
else
  python3 bench/moe_layer.py --out "$OUT/moe_layer_$TAG.json" 2>&1 | tee "$OUT/moe_layer_$TAG.log" || status=1
  if [[ -f bench/train_throughput.py ]]; then
    python3 bench/train_throughput.py --out "$OUT/train_throughput_$TAG.json" 2>&1 | tee "$OUT/train_throughput_$TAG.log" || status=1
  fi
fi
exit $status
