#!/usr/bin/env python3
"""Choose `cnngeo`'s direct-alignment settings on held-out photos at the calibration seed 7
(pairs no evaluation uses), one line per setting (README, "cnngeo: direct alignment"):

    PYTHONPATH=. python scripts/cnngeo_align_sweep.py [--pairs 100] [--tps-passes 2] \
        'levels=((60,6),(120,5))' 'levels=((60,4),(120,3)),band=1.5' ...

Each argument is one setting: comma-separated KEY=VALUE fields of
`direct_alignment.AlignmentSettings` (values are Python literals; an empty string is the
defaults). The network's transform is computed once per pair, so the sweep times only the
alignment.
"""
import argparse
import ast
import json
import re
import time

import numpy as np
import torch

from dense_match_ros.core.geometry import direct_alignment, parametric
from dense_match_ros.core.registry import load_matcher
from dense_match_ros.data.synthetic import heldout_pairs
from dense_match_ros.evaluation.calibrate import CALIBRATION_SEED, calibration_pairs


def parse_setting(text: str) -> dict:
    """'a=1,b=((1,2),(3,4))' -> {'a': 1, 'b': ((1, 2), (3, 4))}: split on commas outside brackets."""
    fields, depth, start = [], 0, 0
    for i, ch in enumerate(text + ','):
        depth += ch in '([' and 1 or (ch in ')]' and -1 or 0)
        if ch == ',' and depth == 0:
            if text[start:i].strip():
                fields.append(text[start:i])
            start = i + 1
    out = {}
    for field in fields:
        key, value = re.split(r'\s*=\s*', field.strip(), maxsplit=1)
        out[key] = ast.literal_eval(value)
    return out


def aepe(theta: np.ndarray, pair) -> float:
    h, w = pair.source.shape[:2]
    th, tw = pair.target.shape[:2]
    flow = parametric.dense_flow('tps', torch.from_numpy(theta[None]).float(), (w, h), (tw, th))[0]
    return float(np.linalg.norm(flow.numpy() - pair.flow, axis=-1)[pair.valid].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--pairs', type=int, default=100)
    p.add_argument('--tps-passes', type=int, default=None)
    p.add_argument('--recipe', choices=('heldout', 'calibration'), default='heldout',
                   help="heldout: the evaluation set's recipe (affine, TPS, homography) at seed 7; "
                        "calibration: every kind, half with moving objects")
    p.add_argument('--json', default=None)
    p.add_argument('settings', nargs='*', default=[''])
    args = p.parse_args()
    torch.set_num_threads(1)
    matcher = load_matcher('cnngeo', align='none', **({} if args.tps_passes is None
                                                    else {'tps_passes': args.tps_passes}))
    pairs = (heldout_pairs(args.pairs, seed=CALIBRATION_SEED) if args.recipe == 'heldout'
             else calibration_pairs(args.pairs))
    thetas = [matcher.predict(pair.source, pair.target)[1][0].numpy() for pair in pairs]
    base = np.array([aepe(theta, pair) for theta, pair in zip(thetas, pairs)])
    kinds = np.array([pair.kind for pair in pairs])
    rows = [{'setting': 'network alone', 'aepe': round(float(base.mean()), 3)}]
    print(f'{len(pairs)} pairs ({args.recipe} recipe, seed {CALIBRATION_SEED}), tps_passes {matcher.tps_passes}: network alone '
          f'{base.mean():.3f} px')
    for text in args.settings:
        settings = direct_alignment.AlignmentSettings(**parse_setting(text))
        errors, refused, times = [], 0, []
        for theta, pair in zip(thetas, pairs):
            start = time.perf_counter()
            result = direct_alignment.refine_tps(pair.source, pair.target, theta, settings)
            times.append(time.perf_counter() - start)
            refused += not result.accepted
            errors.append(aepe(result.theta, pair))
        errors = np.array(errors)
        row = {'setting': text or 'defaults', 'aepe': round(float(errors.mean()), 3),
               'median': round(float(np.median(errors)), 3),
               'worse': int((errors > base + 0.01).sum()), 'refused': refused,
               'ms': round(1000 * float(np.median(times)), 1),
               'by_kind': {k: round(float(errors[kinds == k].mean()), 3) for k in sorted(set(kinds))}}
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'pairs': len(pairs), 'recipe': args.recipe, 'tps_passes': matcher.tps_passes, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
