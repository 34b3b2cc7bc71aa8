#!/bin/bash
# Calibrate and evaluate a neuflow checkpoint as the README's tables do (one thread):
#   scripts/eval_neuflow.sh DIR METHOD...   (DIR holds neuflow_cpu.pt and its .json)
# writes DIR/cal_M.log, DIR/M_a.json (Sintel, HPatches, viewpoint set) and DIR/M_b.json
# (synthetic, TUM, Middlebury with 20 pose seeds) for each METHOD (neuflow, neuflow-fast).
# OPTS adds matcher options to every command, e.g. OPTS="--option max_side=224".
set -e
D=$1; shift
for M in "$@"; do
  dense-match-calibrate --method "$M" --weights "$D/neuflow_cpu.pt" --pairs 60 --size 640x480 --write $OPTS > "$D/cal_$M.log" 2>&1
  dense-match-eval --method "$M" --weights "$D/neuflow_cpu.pt" --sets sintel,hpatches240,hpatches,hpatches_viewpoint --threads 1 --no-progress $OPTS --json "$D/${M}_a.json" > "$D/${M}_a.log" 2>&1
  dense-match-eval --method "$M" --weights "$D/neuflow_cpu.pt" --sets synthetic,tum,middlebury --pose-seeds 20 --threads 1 --no-progress $OPTS --json "$D/${M}_b.json" > "$D/${M}_b.log" 2>&1
done
echo "done $D $*"
