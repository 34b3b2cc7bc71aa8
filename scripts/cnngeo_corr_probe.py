"""Is CNNGeo limited by its features or by its regressor? (probe, not a test)

On the held-out synthetic pairs at 240x240 this compares, per warp kind:
- the shipped regressors' AEPE (affine stage, composed TPS);
- how often a source cell's best correlation lands within one / two cells (16 / 32 px) of
  its true target position (the features' quality at pool4);
- a robust affine and homography fitted (cv2 RANSAC) to the correlation's mutual nearest
  neighbours, evaluated densely like the regressors.
If the fitted transforms beat the regressors, the correlation holds more than the
regressors read from it.

    PYTHONPATH=. python scripts/cnngeo_corr_probe.py [--n 50] [--weights W] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import cv2
import numpy as np
import torch

from dense_match_ros.core.checkpoint import checkpoint_method
from dense_match_ros.core.registry import load_matcher
from dense_match_ros.data.synthetic import heldout_pairs
from dense_match_ros.evaluation.metrics import aepe


def fitted_flow(kind: str, src: np.ndarray, dst: np.ndarray, size: int) -> np.ndarray | None:
    if len(src) < 4:
        return None
    if kind == 'affine':
        m, _ = cv2.estimateAffine2D(src, dst, ransacReprojThreshold=12.0, maxIters=2000)
        if m is None:
            return None
        m = np.vstack([m, [0, 0, 1]])
    else:
        m, _ = cv2.findHomography(src, dst, cv2.RANSAC, 12.0, maxIters=2000)
        if m is None:
            return None
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    pts = np.stack([xs, ys, np.ones_like(xs)], -1) @ m.T
    with np.errstate(divide='ignore', invalid='ignore'):
        there = pts[..., :2] / pts[..., 2:3]
    return np.nan_to_num((there - np.stack([xs, ys], -1)).astype(np.float32), nan=1e3)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument('--n', type=int, default=50)
    p.add_argument('--weights', default=None)
    p.add_argument('--json', default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    pairs = heldout_pairs(args.n, size=(240, 240))
    rows = defaultdict(lambda: defaultdict(list))
    aff = load_matcher('cnngeo-affine', weights=args.weights)
    affine_only = args.weights and checkpoint_method(args.weights) == 'cnngeo-affine'
    full = None if affine_only else load_matcher('cnngeo', weights=args.weights)
    net = aff.net
    for pair in pairs:
        truth, valid = pair.flow, pair.valid
        row = rows[pair.kind]
        if full is not None:
            row['cnngeo'].append(aepe(full.match(pair.source, pair.target).flow, truth, valid))
        row['cnngeo-affine'].append(aepe(aff.match(pair.source, pair.target).flow, truth, valid))
        with torch.no_grad(), aff._autocast():
            feats = net.features(torch.cat([aff._tensor(pair.source), aff._tensor(pair.target)]))
            corr = net.correlation(feats[:1], feats[1:])[0].float()  # (225, 15, 15)
        k, hs, ws = corr.shape
        scores = corr.reshape(k, hs * ws)                  # target index x source index
        best_t = scores.argmax(0).numpy()                  # per source cell
        best_s = scores.argmax(1).numpy()                  # per target cell
        cs = (np.stack(np.meshgrid(np.arange(ws), np.arange(hs)), -1).reshape(-1, 2) + 0.5) * 16
        ct = cs                                            # same 15x15 grid
        centre = cs.astype(int).clip(0, 239)
        true_there = cs + truth[centre[:, 1], centre[:, 0]]
        ok = valid[centre[:, 1], centre[:, 0]]
        err = np.linalg.norm(ct[best_t] - true_there, axis=1)[ok]
        row['nn_within_16px'].append(float((err <= 16).mean()) if len(err) else np.nan)
        row['nn_within_32px'].append(float((err <= 32).mean()) if len(err) else np.nan)
        mutual = best_s[best_t] == np.arange(hs * ws)
        row['mutual_count'].append(float(mutual.sum()))
        src, dst = cs[mutual].astype(np.float32), ct[best_t[mutual]].astype(np.float32)
        for fit in ('affine', 'homography'):
            flow = fitted_flow(fit, src, dst, 240)
            row[f'fit_{fit}'].append(aepe(flow, truth, valid) if flow is not None else np.nan)
    out = {kind: {k: float(np.nanmean(v)) for k, v in row.items()} | {'pairs': len(row['cnngeo-affine'])}
           for kind, row in rows.items()}
    allrows = defaultdict(list)
    for row in rows.values():
        for k, v in row.items():
            allrows[k] += v
    out['all'] = {k: float(np.nanmean(v)) for k, v in allrows.items()} | {'pairs': len(pairs)}
    for kind, row in out.items():
        print(kind, ' '.join(f'{k}={v:.3f}' for k, v in row.items()))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
