#!/usr/bin/env bash
# Train dgc (DGC+M-Net), or the method METHOD names (neuflow: config/train_neuflow_gpu.yaml), on the
# lent GPU machine; see docs/GPU_TRAINING.md for the whole procedure.
#
# HERE (before the first device call):
#   scripts/gpu_train_dgc.sh prepare            # copy ../shared/train_pack to gpu_carry/ (git-ignored)
# ON THE DEVICE (run tool, carry ["gpu_carry"]), from the repository root:
#   scripts/gpu_train_dgc.sh run 8 [WAIT_S]     # start an 8-minute run detached, wait, snapshot to $OUT
#   scripts/gpu_train_dgc.sh report [WAIT_S]    # later calls: wait up to WAIT_S s, snapshot to $OUT
#   scripts/gpu_train_dgc.sh bench              # inference times (batch 1, median of 100) -> $OUT
# HERE (after a call, with the files it brought back):
#   scripts/gpu_train_dgc.sh assemble FILES_AT  # -> runs/dgc_gpu_fetched/dgc_gpu.pt + .json + log
#
# Every snapshot puts into $OUT: the fp16 weights with their JSON record (split into parts under
# 16 MiB), log.jsonl, config.json and the trainer's output, so a lost machine loses nothing.
# A fresh machine resumes from those weights:  INIT=gpu_carry/dgc_gpu.pt scripts/gpu_train_dgc.sh run M
# (passed as --set model.init_weights=INIT; the optimiser and the schedule restart).
# The trainer:  python3 -m dense_match_ros.training.cli dgc --config CONFIG --out RUN
#   --set data.photos=PHOTOS --minutes M   (needs only torch, numpy, OpenCV, tqdm; no PyYAML)
# Environment: METHOD (dgc), PHOTOS (default gpu_carry/train_pack), RUN (runs/${METHOD}_gpu),
# CONFIG (config/train_${METHOD}_gpu.yaml), PY (python3), INIT (weights to start from).
# Files are named after METHOD: ${METHOD}_gpu.pt parts, ${METHOD}_gpu.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PY:-}" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
METHOD="${METHOD:-dgc}"
PHOTOS="${PHOTOS:-gpu_carry/train_pack}"
RUN="${RUN:-runs/${METHOD}_gpu}"
CONFIG="${CONFIG:-config/train_${METHOD}_gpu.yaml}"
OUT="${OUT:-/tmp/dgc_out}"
PART_BYTES=$((15 * 1024 * 1024))
log() { printf '[gpu_train_dgc %4ss] %s\n' "$SECONDS" "$*"; }

running() { [ -f "$RUN/train.pid" ] && kill -0 "$(cat "$RUN/train.pid")" 2>/dev/null; }

snapshot() {
  mkdir -p "$OUT"
  for f in log.jsonl config.json; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
  [ -f "$RUN/train.out" ] && tail -c 20000 "$RUN/train.out" > "$OUT/train.out.tail"
  if [ -f "$RUN/last.pt" ]; then
    # fp16 model weights + JSON record (sha256) from the latest training state.
    "$PY" - "$RUN/last.pt" "$OUT/${METHOD}_gpu.pt" <<'EOF'
import sys, time
from dense_match_ros.training import checkpoint as ckpt
state = ckpt.load_training_state(sys.argv[1])
extra = state.get('extra') or {}
rec = ckpt.export_weights(state, sys.argv[2], {
    'command': extra.get('command'), 'config': state['config'], 'data': state['config'].get('data'),
    'wall_time_s': state['wall_time_s'], 'device': extra.get('device'), 'world_size': 1,
    'exported_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'evaluation': [],
    'note': 'snapshot of a GPU run (scripts/gpu_train_dgc.sh); not evaluated yet'}, half=True)
print('snapshot', rec['steps'], 'steps', rec['bytes'], 'bytes')
EOF
    (cd "$OUT" && split -b "$PART_BYTES" -d -a 1 "${METHOD}_gpu.pt" "${METHOD}_gpu.pt.part" && rm "${METHOD}_gpu.pt")
  fi
  if [ -f "$RUN/log.jsonl" ]; then
    "$PY" - "$RUN/log.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in rows[-3:]:
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
           if k in ('step', 'loss', 'epe', 'epe_global', 'bce', 'epe_pool4', 'epe_conv3', 'epe_conv1', 'loss_bce', 'pairs_per_s', 'wall_time_s')})
EOF
  fi
  ls -l "$OUT"
}

wait_for() {  # wait up to $1 seconds while the trainer runs
  local limit="${1:-0}" t=0
  while running && [ "$t" -lt "$limit" ]; do sleep 10; t=$((t + 10)); done
  running && log "still training" || log "trainer not running"
}

case "${1:-}" in
  prepare)
    mkdir -p gpu_carry
    grep -qx '/gpu_carry/' .git/info/exclude 2>/dev/null || echo '/gpu_carry/' >> .git/info/exclude
    rm -rf gpu_carry/train_pack && cp -r ../shared/train_pack gpu_carry/train_pack
    du -sh gpu_carry
    ;;
  run)
    minutes="${2:-8}"; wait_s="${3:-$(( ${minutes%.*} * 60 + 45 ))}"
    "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA"; print(torch.__version__, torch.cuda.get_device_name())'
    [ -d "$PHOTOS" ] || { echo "no photos at $PHOTOS (carry gpu_carry, see prepare)" >&2; exit 2; }
    mkdir -p "$RUN"
    extra=()
    [ -n "${INIT:-}" ] && extra=(--set "model.init_weights=$INIT")
    # The shared loop (training/loop.py) with pairs made on the GPU (data.sampler: device);
    # --minutes is the budget of the whole run (a resumed run counts the time already spent).
    setsid nohup "$PY" -m dense_match_ros.training.cli "$METHOD" --config "$CONFIG" --out "$RUN" \
      --set "data.photos=$PHOTOS" --minutes "$minutes" --no-progress ${extra[@]+"${extra[@]}"} \
      > "$RUN/train.out" 2>&1 < /dev/null &
    echo $! > "$RUN/train.pid"
    log "started pid $(cat "$RUN/train.pid"), $minutes min; waiting up to $wait_s s"
    wait_for "$wait_s"
    snapshot
    ;;
  report)
    wait_for "${2:-0}"
    snapshot
    ;;
  bench)
    # Timing does not depend on the weights: an untrained network of the run's architecture
    # (or of the defaults) when there is no checkpoint yet.
    mkdir -p "$OUT"
    ckpt=()
    [ -f "$RUN/last.pt" ] && ckpt=(--weights "$METHOD=$RUN/last.pt")
    "$PY" -m dense_match_ros.evaluation.bench_match --method "$METHOD" "${ckpt[@]}" --random-weights \
      --device "${BENCH_DEVICE:-cuda}" --n "${BENCH_N:-100}" --network --raft-small \
      --json "$OUT/bench.json" | tee "$OUT/bench.txt"
    ;;
  assemble)
    src="${2:?usage: assemble FILES_AT}"; dst="${3:-runs/${METHOD}_gpu_fetched}"
    mkdir -p "$dst"
    cat "$src"/"${METHOD}_gpu.pt.part"* > "$dst/${METHOD}_gpu.pt"
    for f in "${METHOD}_gpu.json" log.jsonl config.json train.out.tail bench.txt; do
      [ -f "$src/$f" ] && cp "$src/$f" "$dst/"
    done
    "$PY" -c "import sys; from dense_match_ros.training.checkpoint import load_weights; c, s, r = load_weights('$dst/${METHOD}_gpu.pt', '$METHOD'); print('ok', r['steps'], 'steps, sha256 verified')"
    ls -l "$dst"
    ;;
  *)
    sed -n '2,20p' "$0"; exit 2
    ;;
esac
