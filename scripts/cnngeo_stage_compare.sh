#!/bin/bash
# Compare cnngeo checkpoints set by set (README, "A matching loss for the trunk"):
#   OUT=out/s31 scripts/cnngeo_stage_compare.sh NAME=WEIGHTS [NAME=WEIGHTS ...]
# Per checkpoint: the round-trip sigma of each method fitted into its record (FIT=false keeps
# the record's), then `cnngeo` and `cnngeo-affine` on every shared set and 50
# held-out synthetic pairs, and `cnngeo` on 200. The networks run no time budget, so two
# invocations side by side measure the same as one alone. Writes $OUT/cg_NAME_{tps,affine,200}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/s31}
FIT=${FIT:-true}
mkdir -p "$OUT"
for spec in "$@"; do
  name=${spec%%=*}; weights=${spec#*=}
  if [ "$FIT" = true ]; then
    for method in cnngeo cnngeo-affine; do
      .venv/bin/python -m dense_match_ros.training.cnngeo_task sigma --method $method \
        --weights "$weights" --write > "$OUT/cg_${name}_sigma_$method.log" 2>&1
    done
  fi
  for method in cnngeo cnngeo-affine; do
    tag=$([ $method = cnngeo ] && echo tps || echo affine)
    .venv/bin/python -m dense_match_ros.evaluation.cli --method $method --weights "$weights" \
      --sets all --threads 1 --no-progress --json "$OUT/cg_${name}_$tag.json" \
      > "$OUT/cg_${name}_$tag.log" 2>&1
  done
  .venv/bin/python -m dense_match_ros.evaluation.cli --method cnngeo --weights "$weights" \
    --sets synthetic --synthetic-n 200 --threads 1 --no-progress --json "$OUT/cg_${name}_200.json" \
    > "$OUT/cg_${name}_200.log" 2>&1
done
