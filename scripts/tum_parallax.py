#!/usr/bin/env python3
"""The TUM pairs' median rotation-compensated parallax, from the ground-truth flow (depth and
poses) and from a matcher's flow, against the pose's degenerate-motion gate (0.5 deg).

The pose evaluation refuses a pair whose median parallax is below the gate, so a pair near it
counts in one run and not in the next: this says how far each pair is from it.

    PYTHONPATH=. python scripts/tum_parallax.py [--method dmp] [--weights W ...]
"""
import argparse

import numpy as np
import torch

from dense_match_ros.core.geometry.essential import normalize_points, rotation_compensated_parallax
from dense_match_ros.core.geometry.gt_flow import flow_from_depth
from dense_match_ros.core.registry import load_matcher
from dense_match_ros.data.shared_sets import tum_pairs


def median_parallax_deg(flow: np.ndarray, ok: np.ndarray, K_s, K_t, R) -> float:
    h, w = flow.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    src = np.stack([x[ok], y[ok]], -1)
    tgt = src + flow[ok].astype(np.float64)
    parallax = rotation_compensated_parallax(R, normalize_points(src, K_s), normalize_points(tgt, K_t))
    return float(np.degrees(np.median(parallax)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--method', default='dmp')
    p.add_argument('--weights', nargs='*', default=[None])
    args = p.parse_args()
    torch.set_num_threads(1)
    pairs = tum_pairs()
    matchers = {w or 'shipped': load_matcher(args.method, device='cpu', weights=w) for w in args.weights}
    for pair in pairs:
        th, tw = pair.target.shape[:2]
        R = pair.T_target_source[:3, :3]
        gt, valid = flow_from_depth(pair.depth_source, pair.K_source, pair.T_target_source,
                                    pair.K_target, (tw, th), pair.depth_target)
        line = f'{pair.name:18s} ground truth {median_parallax_deg(np.nan_to_num(gt), valid, pair.K_source, pair.K_target, R):.3f} deg'
        for name, m in matchers.items():
            flow = m.match(pair.source, pair.target).flow
            line += f'  {name}: {median_parallax_deg(flow, valid, pair.K_source, pair.K_target, R):.3f}'
        print(line, flush=True)


if __name__ == '__main__':
    main()
