#!/usr/bin/env python3
"""A trial, not a shipped option: `dmp`'s flow (20 iterations, no time budget) re-densified by
EpicFlow from its confident matches on a grid, the border band left to the interpolation,
then the variational polish (issue 16's note of the session of 2026-12-06, later):

    PYTHONPATH=. python scripts/dmp_epic_trial.py [sets=hpatches240,hpatches,sintel] [cells=1]
        [step=PX] [thr=0.5] [border=0.05] [polish=5] [only_border=1]

`cells`: the grid step in cells of DMP's finest level (a 60x60 grid over the input);
`step=PX` instead: a square grid of PX pixels;
`only_border=1` keeps DMP's flow inside the band and interpolates only the band.
"""
import sys
import time

import numpy as np
import torch

from dense_match_ros.core.methods.epicflow import EpicInterpolator
from dense_match_ros.core.refine import variational_polish
from dense_match_ros.core.registry import load_matcher
from dense_match_ros.data import shared_sets
from dense_match_ros.evaluation import metrics


def redensified(source, target, flow, matchability, cells, thr, border, only_border, polish,
                interp, step=None):
    h, w = flow.shape[:2]
    sx, sy = (step, step) if step else (max(1.0, cells * w / 60), max(1.0, cells * h / 60))
    xs, ys = np.meshgrid(np.round(np.arange(sx / 2, w, sx)).astype(int).clip(0, w - 1),
                         np.round(np.arange(sy / 2, h, sy)).astype(int).clip(0, h - 1))
    b = border * min(h, w)
    keep = (matchability[ys, xs] > thr) & (xs >= b) & (xs < w - b) & (ys >= b) & (ys < h - b)
    pa = np.stack([xs[keep], ys[keep]], -1).astype(np.float32)
    dense = interp.densify(source, pa, target, pa + flow[ys[keep], xs[keep]])
    if only_border:
        yy, xx = np.mgrid[0:h, 0:w]
        band = (xx < b) | (xx >= w - b) | (yy < b) | (yy >= h - b)
        dense = np.where(band[..., None], dense, flow).astype(np.float32)
    return variational_polish(source, target, dense, iterations=polish) if polish else dense


def main() -> None:
    kw = dict(a.split('=', 1) for a in sys.argv[1:])
    torch.set_num_threads(1)
    matcher = load_matcher('dmp', iterations=20, time_budget_s=0)
    interp = EpicInterpolator()
    for name in kw.get('sets', 'hpatches240,hpatches,sintel').split(','):
        base, new, extra = [], [], []
        for p in shared_sets.load_flow_set(name):
            res = matcher.match(p.source, p.target)
            start = time.perf_counter()
            dense = redensified(p.source, p.target, res.flow, res.matchability,
                                float(kw.get('cells', 1.0)), float(kw.get('thr', 0.5)),
                                float(kw.get('border', 0.05)), kw.get('only_border') == '1',
                                int(kw.get('polish', 5)), interp,
                                float(kw['step']) if 'step' in kw else None)
            extra.append(time.perf_counter() - start)
            base.append(metrics.aepe(res.flow, p.flow, p.valid))
            new.append(metrics.aepe(dense, p.flow, p.valid))
        pairs = ', '.join(f'{a:.2f}->{b:.2f}' for a, b in zip(base, new))
        print(f'{name} {kw}: dmp {np.mean(base):.3f} -> re-densified {np.mean(new):.3f} '
              f'({pairs}); extra {np.mean(extra):.2f} s a pair')


if __name__ == '__main__':
    main()
