#!/usr/bin/env bash
# GPU performance run (issue 9), one command: the GPU-marked kernel tests, then the MoE-layer
# bench (A/B/C, balanced + Zipf), the per-call grouped GEMM bench, the AdamW step bench (torch fused
# vs TritonAdamW over moe-1b's parameters), the training-throughput bench (moe-1b vs transformers)
# and the real trainer's step on the same shape (bench/trainer_step.py).
# JSON results, logs and kernel profiles go to $OUT (default bench/results); about 7 minutes
# on one H100. Usage on the GPU machine, from the repo root:  bash ci/gpu_perf.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
TAG=${TAG:-$(python3 -c 'import torch; print(torch.cuda.get_device_name(0).split()[1].lower())' 2>/dev/null || echo gpu)}
status=0
python3 -m pytest -m gpu -q -p no:cacheprovider tests/backends/test_cuda_kernels.py \
  tests/backends/test_cuda_loss_kernels.py tests/backends/test_cuda_optim.py tests/backends/test_cuda_qk_rope.py \
  tests/backends/test_cuda_router.py \
  tests/trainers/test_compile.py tests/core/test_ep_rows.py tests/models 2>&1 \
  | tee "$OUT/gpu_tests_$TAG.log" || status=1
if [[ "${1:-}" == "--quick" ]]; then
  python3 bench/moe_layer.py --configs C --iters 10 --out "$OUT/moe_layer_${TAG}_quick.json" || status=1
  python3 bench/train_throughput.py --variants hf anymoe_fast --checkpointing off --steps 5 --no-profile \
    --out "$OUT/train_throughput_${TAG}_quick.json" || status=1
else
  python3 bench/cross_entropy.py --out "$OUT/cross_entropy_$TAG.json" || status=1
  python3 bench/grouped_gemm.py --out "$OUT/grouped_gemm_$TAG.json" > "$OUT/grouped_gemm_$TAG.log" 2>&1 || status=1
  python3 bench/optimizer.py --out "$OUT/optimizer_$TAG.json" || status=1
  python3 bench/moe_layer.py --out "$OUT/moe_layer_$TAG.json" 2>&1 | tee "$OUT/moe_layer_$TAG.log" || status=1
  python3 bench/train_throughput.py --out "$OUT/train_throughput_$TAG.json" 2>&1 \
    | tee "$OUT/train_throughput_$TAG.log" || status=1
  python3 bench/trainer_step.py --out "$OUT/trainer_step_$TAG.json" 2>&1 \
    | tee "$OUT/trainer_step_$TAG.log" || status=1
  # The device tool returns at most 8 files: the per-variant profiles travel as one archive.
  if [[ -d "$OUT/profiles" && "$OUT" != "bench/results" ]]; then
    tar czf "$OUT/profiles_$TAG.tgz" -C "$OUT" profiles && rm -r "$OUT/profiles"
  fi
fi
exit $status
