#!/usr/bin/env bash
# Cross-backend loss parity on a CUDA machine (issue 7), from the source tree:
#   CPU fp32 vs CUDA fp32 (TF32 off: parity mode turns it off), 200 steps of configs/parity.yaml,
#   gate: max relative loss difference <= 1e-3, against a CPU run made here and against the
#   committed CPU reference (bench/results/parity/cpu_fp32.jsonl);
#   CPU bf16 vs CUDA bf16 (measured and documented, no gate);
#   CUDA resume vs straight, CUDA pow2 vs default sizing (measured);
#   with 2+ GPUs: EP=1 vs EP=2 under NCCL (torchrun, 2 processes), fp32 and bf16.
#
#   OUT=/some/dir bash ci/parity_gpu.sh            (OUT defaults to parity_gpu_out/)
#   PARITY_BACKEND=npu PARITY_NDEV=2 bash ci/parity_gpu.sh   (another accelerator backend; the
#   device count is then given, as this script counts CUDA devices only); PARITY_STEPS=N for
#   a quick try (the comparisons with the committed 200-step references need 200).
#
# Writes to $OUT: every curve (<name>.jsonl), its log, per pair a table (.txt), JSON and
# plot (.png), and summary.txt (each run, each pair with its table). Takes a few minutes (the CPU runs are
# the slow part). Exit status: 0 when every gated pair is within tolerance, 1 when one is
# not, 2 when a run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_DEVICE_BACKEND_AUTOLOAD=0
OUT="${OUT:-parity_gpu_out}"
mkdir -p "$OUT"
CFG=configs/parity.yaml
REF=bench/results/parity
STEPS="${PARITY_STEPS:-200}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
status=0

python -m anymoe env | tee "$OUT/env.txt" || true
DEV="${PARITY_BACKEND:-cuda}"  # the backend under test; its curves are named $NAME_*
NAME="${PARITY_NAME:-$DEV}"
NGPU="${PARITY_NDEV:-$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")}"
echo "backend $DEV, devices: $NGPU, steps: $STEPS" | tee -a "$SUMMARY"
if [ "$NGPU" -lt 1 ]; then
  echo "no $DEV device here: nothing to compare" | tee -a "$SUMMARY"
  exit 2
fi

run() {  # run NAME THREADS ARGS...: one parity curve (CPU runs use one intra-op thread, as the reference)
  local name=$1 threads=$2; shift 2
  local t0=$SECONDS
  if OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads python -m anymoe parity run "$CFG" --steps "$STEPS" \
       --out "$OUT/$name.jsonl" "$@" >"$OUT/$name.log" 2>&1; then
    echo "run  $name: ok ($((SECONDS - t0)) s)" | tee -a "$SUMMARY"
  else
    echo "run  $name: FAILED ($((SECONDS - t0)) s); tail of $OUT/$name.log:" | tee -a "$SUMMARY"
    tail -n 30 "$OUT/$name.log" | tee -a "$SUMMARY"
    status=2
  fi
}

pair() {  # pair NAME RTOL GATE CURVES...: compare table/JSON/plot; GATE=gate makes it count for the exit code
  local name=$1 rtol=$2 gate=$3; shift 3
  for f in "$@"; do
    [ -f "$f" ] || { echo "pair $name: skipped ($f missing)" | tee -a "$SUMMARY"; return; }
  done
  python -m anymoe parity compare "$@" --rtol "$rtol" --plot "$OUT/$name.png" --json "$OUT/$name.json" \
    >"$OUT/$name.txt" 2>&1
  local rc=$?
  local verdict="within rtol $rtol"
  [ $rc -eq 0 ] || verdict="OVER rtol $rtol (exit $rc)"
  echo "pair $name [$gate]: $verdict" | tee -a "$SUMMARY"
  grep -v -e '^---' -e '^tolerance' "$OUT/$name.txt" | tee -a "$SUMMARY"
  if [ "$gate" = gate ] && [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=1; fi
}

# One device: CPU and the backend under test, fp32 and bf16.
run cpu_fp32 1 --backend cpu
run cpu_bf16 1 --backend cpu --precision bf16
run ${NAME}_fp32 4 --backend "$DEV"
run ${NAME}_bf16 4 --backend "$DEV" --precision bf16
run ${NAME}_fp32_resume 4 --backend "$DEV" --resume-at $((STEPS / 2))
run ${NAME}_fp32_pow2 4 --backend "$DEV" --sizing pow2
if [ "$NGPU" -ge 2 ]; then
  run ${NAME}_fp32_ep2 4 --backend "$DEV" --ep 2
  run ${NAME}_bf16_ep2 4 --backend "$DEV" --ep 2 --precision bf16
fi

pair cpu_vs_${NAME}_fp32 1e-3 gate "$OUT/cpu_fp32.jsonl" "$OUT/${NAME}_fp32.jsonl"
if [ "$STEPS" = 200 ]; then  # the committed reference has 200 steps
  pair ref_vs_${NAME}_fp32 1e-3 gate "$REF/cpu_fp32.jsonl" "$OUT/${NAME}_fp32.jsonl"
  pair ref_vs_this_cpu_fp32 1e-5 info "$REF/cpu_fp32.jsonl" "$OUT/cpu_fp32.jsonl"
  pair ref_vs_${NAME}_bf16 5e-2 info "$REF/cpu_bf16.jsonl" "$OUT/${NAME}_bf16.jsonl"
fi
pair cpu_vs_${NAME}_bf16 5e-2 info "$OUT/cpu_bf16.jsonl" "$OUT/${NAME}_bf16.jsonl"
pair ${NAME}_fp32_vs_bf16 5e-2 info "$OUT/${NAME}_fp32.jsonl" "$OUT/${NAME}_bf16.jsonl"
pair ${NAME}_straight_vs_resume 1e-5 info "$OUT/${NAME}_fp32.jsonl" "$OUT/${NAME}_fp32_resume.jsonl"
pair ${NAME}_default_vs_pow2 1e-5 info "$OUT/${NAME}_fp32.jsonl" "$OUT/${NAME}_fp32_pow2.jsonl"
if [ "$NGPU" -ge 2 ]; then
  pair ${NAME}_fp32_ep1_vs_ep2 1e-3 gate "$OUT/${NAME}_fp32.jsonl" "$OUT/${NAME}_fp32_ep2.jsonl"
  pair ${NAME}_bf16_ep1_vs_ep2 5e-2 info "$OUT/${NAME}_bf16.jsonl" "$OUT/${NAME}_bf16_ep2.jsonl"
fi
echo "exit status: $status" | tee -a "$SUMMARY"
exit $status
