#!/bin/bash
# The network alone (no DIS fusion, residual or pre-alignment), as neuflow-fast runs it,
# on the Sintel subset and the held-out synthetic set: how far a training run has come,
# comparable between architectures.
#   scripts/neuflow_raw.sh OUT_JSON [WEIGHTS [iterations]]   (no WEIGHTS: the shipped file)
set -e
OUT=$1; W=${2:+--weights $2}; IT=${3:+--option iterations=$3}
dense-match-eval --method neuflow-fast $W $IT --option fuse=none --option refine=none \
  --option prealign=false --option settled_share=0 --sets sintel,synthetic --threads 1 \
  --no-progress --json "$OUT" | grep -E "^(sintel|synthetic) "
