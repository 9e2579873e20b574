#!/usr/bin/env bash
# Regenerates the CPU reference curves, compare tables and plots in this folder
# (configs/parity.yaml, 200 steps; about 5 minutes on a loaded 2-core machine).
#   bash bench/results/parity/reproduce_cpu.sh          (keeps curves already here)
#   FORCE=1 bash bench/results/parity/reproduce_cpu.sh  (remakes every curve)
# One intra-op thread per process, as when the committed files were made.
set -uo pipefail
cd "$(dirname "$0")/../../.."
D=bench/results/parity
CFG=configs/parity.yaml
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

run() {  # run NAME ARGS...: one parity curve, its log beside it
  local name=$1; shift
  if [ -f "$D/$name.jsonl" ] && [ -z "${FORCE:-}" ]; then echo "kept $D/$name.jsonl"; return; fi
  python -m anymoe parity run "$CFG" --backend cpu --out "$D/$name.jsonl" "$@" >"$D/$name.log" 2>&1 \
    || { echo "parity run $name failed; see $D/$name.log" >&2; exit 1; }
  tail -n 1 "$D/$name.log"
}

pair() {  # pair NAME RTOL CURVES...: table (.txt), JSON and plot; exit code kept in the table
  local name=$1 rtol=$2; shift 2
  python -m anymoe parity compare "$@" --rtol "$rtol" --plot "$D/$name.png" --json "$D/$name.json" >"$D/$name.txt"
  echo "exit code: $?" >>"$D/$name.txt"
  cat "$D/$name.txt"
}

run cpu_fp32
run cpu_fp32_ep2 --ep 2
run cpu_fp32_pow2 --sizing pow2
run cpu_fp32_resume100 --resume-at 100
run cpu_bf16 --precision bf16

pair cpu_fp32_ep1_vs_ep2 1e-3 "$D/cpu_fp32.jsonl" "$D/cpu_fp32_ep2.jsonl"
pair cpu_fp32_default_vs_pow2 1e-6 "$D/cpu_fp32.jsonl" "$D/cpu_fp32_pow2.jsonl"
pair cpu_fp32_straight_vs_resume 0 "$D/cpu_fp32.jsonl" "$D/cpu_fp32_resume100.jsonl"
pair cpu_fp32_vs_bf16 2e-2 "$D/cpu_fp32.jsonl" "$D/cpu_bf16.jsonl"
rm -f "$D"/*.log  # progress bars; the curves' headers carry what matters
