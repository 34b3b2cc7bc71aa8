#!/usr/bin/env python3
"""DMP time per pair with early stopping against the 300-iteration result (issue 16):
HPatches pair at 240x240, the Sintel pairs, N held-out synthetic pairs; 1 thread.

    PYTHONPATH=. python scripts/dmp_timing.py N OUT.json [KEY=VALUE ...]   (matcher options, both runs)"""
import json, sys, time, numpy as np, torch
torch.set_num_threads(1)
import cv2; cv2.setNumThreads(1)
from dense_match_ros.core.registry import load_matcher
from dense_match_ros.data.shared_sets import hpatches_pair, sintel_pairs
from dense_match_ros.data.synthetic import heldout_pairs
from dense_match_ros.evaluation.cli import parse_options
n = int(sys.argv[1]); out = sys.argv[2]; options = parse_options(sys.argv[3:])
pairs = [hpatches_pair(size=(240, 240))] + sintel_pairs() + heldout_pairs(n)
early = load_matcher('dmp', device='cpu', **options)
full = load_matcher('dmp', device='cpu', **{**options, 'iterations': 300, 'patience': 0, 'min_update_px': 0, 'time_budget_s': 0})
early.match(pairs[0].source, pairs[0].target)  # warm-up (oneDNN kernels), not timed
rows = []
def aepe(f, p):
    return float(np.linalg.norm(f - np.nan_to_num(p.flow), axis=-1)[p.valid].mean())
for p in pairs:
    t = time.perf_counter(); fe, _ = early.match(p.source, p.target); te = time.perf_counter() - t
    re = dict(early.last_run)
    t = time.perf_counter(); ff, _ = full.match(p.source, p.target); tf = time.perf_counter() - t
    rows.append({'pair': getattr(p, 'name', None) or f'synthetic/{len(rows)}', 'early_s': te, 'early_aepe': aepe(fe, p), 'early_iterations': re['iterations'],
                 'reason': re['reason'], 'full_s': tf, 'full_aepe': aepe(ff, p),
                 'full_best_iteration': full.last_run['best_iteration']})
    print(json.dumps(rows[-1]), flush=True)
summary = {'median_early_s': float(np.median([r['early_s'] for r in rows])),
           'mean_early_aepe': float(np.mean([r['early_aepe'] for r in rows])),
           'mean_full_aepe': float(np.mean([r['full_aepe'] for r in rows])),
           'median_early_iterations': float(np.median([r['early_iterations'] for r in rows])),
           'pairs': len(rows)}
print(json.dumps(summary))
json.dump({'rows': rows, 'summary': summary, 'command': ' '.join(sys.argv)}, open(out, 'w'), indent=1)
