#!/usr/bin/env python3
"""Where `dmp`'s full-resolution HPatches error lies: AEPE inside and within a border band
(5 % of the short side), and error percentiles, with and without the DIS residual and polish
(20 iterations, no budget, so the load does not move the figures).

    PYTHONPATH=. python scripts/dmp_border_error.py [--weights W] [--band 0.05] [--size 240x240] [--pad 0.05]
"""
import argparse

import cv2
import numpy as np
import torch

from dense_match_ros.core.registry import load_matcher
from dense_match_ros.data.shared_sets import hpatches_pair

VARIANTS = {'default': {}, 'no residual, no polish': {'refine': 'none', 'polish': 0},
            'residual without its limit': {'refine_max_cells': 0}, 'no polish': {'polish': 0}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--weights', default=None)
    p.add_argument('--band', type=float, default=0.05)
    p.add_argument('--size', default=None, metavar='HxW', help='the pair resized (default: native)')
    p.add_argument('--pad', type=float, default=0.0,
                   help='reflect-pad both images by this fraction of the short side before '
                        'matching and crop the flow back (a probe of the border effect)')
    args = p.parse_args()
    torch.set_num_threads(1)
    pair = hpatches_pair(size=tuple(int(x) for x in args.size.split('x')) if args.size else None)
    valid = np.asarray(pair.valid, bool)
    h, w = valid.shape
    b = max(1, int(args.band * min(h, w)))
    border = np.zeros_like(valid)
    border[:b], border[-b:], border[:, :b], border[:, -b:] = True, True, True, True
    print(f'HPatches pair {w}x{h}, border band {b} px: {np.count_nonzero(valid & border) / np.count_nonzero(valid):.3f} of the valid pixels')
    for name, options in VARIANTS.items():
        m = load_matcher('dmp', device='cpu', weights=args.weights, iterations=20, time_budget_s=0, **options)
        pad = int(round(args.pad * min(h, w)))
        if pad:
            source, target = (cv2.copyMakeBorder(i, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
                              for i in (pair.source, pair.target))
            flow = m.match(source, target).flow[pad:-pad, pad:-pad]   # both shifted alike
        else:
            flow, _ = m.match(pair.source, pair.target)
        e = np.linalg.norm(flow - np.nan_to_num(pair.flow), axis=-1)
        q = np.percentile(e[valid], [50, 90, 99])
        print(f'{name:28s} AEPE {e[valid].mean():6.3f}  inside {e[valid & ~border].mean():6.3f}  '
              f'border {e[valid & border].mean():6.3f}  p50/p90/p99 {q[0]:.2f}/{q[1]:.2f}/{q[2]:.2f}')


if __name__ == '__main__':
    main()
