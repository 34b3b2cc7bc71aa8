#!/bin/bash
# Compare dmp checkpoints under the same load, one after another (README, "Stage 2"):
#   scripts/dmp_stage_compare.sh NAME=WEIGHTS [NAME=WEIGHTS ...]
# Per checkpoint: the optimised flow on the flow sets (the viewpoint set too: stage 3 lost
# there alone) and the pose sets (20 RANSAC seeds), and the pre-trained output alone
# (iterations=0). Uncalibrated by default, since a new stage has no calibration table yet;
# CALIBRATED=true compares each stage with its own table, as it would ship. Each stage runs
# at the test-time lr its record holds (test_time.lr), else 1e-4. Writes $OUT/cmp_NAME.json
# and $OUT/cmp_NAME_it0.json (OUT: default out/s27, the session that made it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/s27}
CALIBRATED=${CALIBRATED:-false}
mkdir -p "$OUT"
for spec in "$@"; do
  name=${spec%%=*}; weights=${spec#*=}
  .venv/bin/python -m dense_match_ros.evaluation.cli --method dmp --weights "$weights" \
    --sets sintel,hpatches240,hpatches,hpatches_viewpoint,synthetic,tum,middlebury --synthetic-n 20 \
    --option calibrated=$CALIBRATED --pose-seeds 20 --no-progress --json "$OUT/cmp_$name.json" \
    > "$OUT/cmp_$name.log" 2>&1
  .venv/bin/python -m dense_match_ros.evaluation.cli --method dmp --weights "$weights" \
    --sets sintel,hpatches240,hpatches,synthetic --synthetic-n 20 --option iterations=0 \
    --option calibrated=false --no-progress --json "$OUT/cmp_${name}_it0.json" \
    > "$OUT/cmp_${name}_it0.log" 2>&1
done
