#!/usr/bin/env python3
"""What the pre-alignment sees on each pair: the first dense result's verdict about a global
homography, the share of its reliable matches that the fitted homography holds (support),
the homography's departure from a shift and its perspective (largest over smallest corner
weight), for the held-out synthetic set, the HPatches pair and the Middlebury rings.

    python scripts/prealign_support.py [WEIGHTS] [METHOD]   (default: shipped, neuflow-fast)
"""
import sys

import cv2
import numpy as np
import torch

from dense_match_ros.core.geometry import prealign
from dense_match_ros.core.registry import load_matcher
from dense_match_ros.data import shared_sets, synthetic
from dense_match_ros.evaluation.cli import SYNTHETIC_SEED, SYNTHETIC_SIZE

torch.set_num_threads(1)
cv2.setNumThreads(1)


def main() -> None:
    weights = sys.argv[1] if len(sys.argv) > 1 else None
    method = sys.argv[2] if len(sys.argv) > 2 else 'neuflow-fast'
    matcher = load_matcher(method, weights=weights, prealign=False)
    pairs = [(f'synthetic/{i:03d}-{p.kind}', p) for i, p in
             enumerate(synthetic.heldout_pairs(50, size=SYNTHETIC_SIZE, seed=SYNTHETIC_SEED))]
    pairs += [(p.name, p) for p in shared_sets.load_flow_set('hpatches240')]
    pairs += [(p.name, p) for p in shared_sets.load_pose_set('middlebury')]
    fit = cv2.findHomography
    for name, pair in pairs:
        h, w = pair.source.shape[:2]
        flow, matchability = matcher.match(pair.source, pair.target)
        seen = {}

        def spy(src, dst, *args, **kwargs):
            homography, inliers = fit(src, dst, *args, **kwargs)
            seen['support'] = None if inliers is None else float(inliers.mean())
            seen['homography'] = homography
            return homography, inliers

        prealign.cv2.findHomography = spy
        try:
            verdict, _ = prealign.homography_from_flow(pair.source, flow, matchability)
        finally:
            prealign.cv2.findHomography = fit
        line = f'{name[-40:]:40s} {verdict:8s}'
        homography = seen.get('homography')
        if homography is not None and seen.get('support') is not None:
            corners = np.float64([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1], ])
            weights_ = (homography @ np.c_[corners, np.ones(4)].T)[2]
            line += (f' support {seen["support"]:.3f}  departure '
                     f'{prealign.departure_from_shift(homography, (w, h)):.3f}  perspective '
                     f'{weights_.max() / weights_.min():.2f}')
        print(line, flush=True)


if __name__ == '__main__':
    main()
