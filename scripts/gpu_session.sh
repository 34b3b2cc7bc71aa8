#!/usr/bin/env bash
# What a session lent a GPU does with its 15 device minutes, in two calls (docs/GPU_TRAINING.md,
# "A session lent a GPU"). Both write into $OUT what the run tool brings back.
#
#   scripts/gpu_session.sh train [MINUTES]   # call 1 (carry gpu_carry): a neuflow stage from the
#                                            # shipped GPU stage, detached, waited for, snapshot
#   scripts/gpu_session.sh bench             # call 2, at once (the machine stays warm 30 s): the
#                                            # GPU timings issues 12, 15, 16 and 17 ask for
#
# bench times, batch 1 (dense-match-bench, median of N): cnngeo at 240x240 with its network in
# fp32, bf16 and bf16 + CUDA graphs (torch.compile 'reduce-overhead'; target 2.5 ms on an
# H100); dmp per pair with its defaults and with 100 iterations and no time budget (time per
# iteration = that / 100; targets 5 ms and 0.5 s per pair); deepmatching per 1024x436 pair
# (target 50 ms); neuflow-fast at 640x480. Each entry has its own time limit, so one that
# fails or hangs costs only its share; the output names it.
# DEVICE=cpu N=2 runs the bench entries here as a dry run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-python3}"
OUT="${OUT:-/tmp/gpu_session_out}"
DEVICE="${DEVICE:-cuda}"
N="${N:-30}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

entry() {  # entry LIMIT_S ARGS...: one dense-match-bench run, its table appended to bench.txt
  local limit=$1; shift
  echo "## dense-match-bench $*" >> "$OUT/bench.txt"
  timeout "$limit" "$PY" -m dense_match_ros.evaluation.bench_match --device "$DEVICE" \
    --threads 2 "$@" >> "$OUT/bench.txt" 2>&1 || echo "(exit $? within ${limit} s)" >> "$OUT/bench.txt"
}

case "${1:-}" in
  train)
    # INIT= (empty): no whole-network start (config/train_neuflow_lite_gpu.yaml takes only
    # the shipped encoder, by model.encoder_init);
    # CONFIG and RUN pass through to gpu_train_dgc.sh.
    METHOD=neuflow INIT="${INIT-dense_match_ros/weights/neuflow_gpu.pt}" OUT="$OUT" \
      scripts/gpu_train_dgc.sh run "${2:-6.5}" "${WAIT_S:-430}"
    ;;
  bench)
    : > "$OUT/bench.txt"
    entry 150 --method cnngeo --sizes 240x240 --n "$N" --network
    entry 60 --method dmp --sizes 240x240 --n 3 --network --no-compile
    entry 60 --method dmp --sizes 240x240 --n 3 --no-compile --option iterations=100 \
      --option time_budget_s=0
    entry 60 --method deepmatching --sizes 1024x436 --n 10 --network --no-compile
    entry 60 --method neuflow-fast --sizes 640x480 --n "$N" --network --no-compile
    grep -E '^(##|\|)|exit' "$OUT/bench.txt"
    ;;
  *)
    sed -n '2,18p' "$0"; exit 2
    ;;
esac
