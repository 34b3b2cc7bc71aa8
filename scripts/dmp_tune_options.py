#!/usr/bin/env python3
"""``dmp`` under several option sets on held-out calibration pairs (held-out photos, seed 7: no
evaluation set), one line of mean AEPE per set; options as the matcher takes them.

    python scripts/dmp_tune_options.py --size 436x1024 --pairs 16 mode=resize mode=adaptive,max_side=384
    python scripts/dmp_tune_options.py --pairs 16 iterations=0 iterations=20,lr=5e-5,time_budget_s=0

Without ``time_budget_s=0`` a set runs under the default 2 s budget, so its figures move with
the machine's load: compare sets run in one call.
"""
import argparse
import json
import time

import numpy as np
import torch

from dense_match_ros.core.registry import load_matcher
from dense_match_ros.evaluation import metrics
from dense_match_ros.evaluation.calibrate import calibration_pairs
from dense_match_ros.evaluation.cli import parse_options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('sets', nargs='+', metavar='KEY=VALUE[,KEY=VALUE...]')
    p.add_argument('--size', default='240x240', metavar='HxW')
    p.add_argument('--pairs', type=int, default=16)
    p.add_argument('--json', default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    size = tuple(int(x) for x in args.size.split('x'))
    pairs = calibration_pairs(args.pairs, size=size)
    results = {}
    for spec in args.sets:
        matcher = load_matcher('dmp', device='cpu', **parse_options(spec.split(',')))
        errors, iterations, seconds = [], [], []
        for pair in pairs:
            started = time.perf_counter()
            flow, _ = matcher.match(pair.source, pair.target)
            seconds.append(time.perf_counter() - started)
            errors.append(metrics.aepe(flow, pair.flow, pair.valid))
            iterations.append(matcher.last_run['iterations'])
        results[spec] = {'aepe': errors, 'iterations': iterations, 'seconds': seconds}
        print(f'{spec:44s} mean AEPE {np.mean(errors):7.3f}  median {np.median(errors):6.3f}  '
              f'iterations {np.median(iterations):4.1f}  {np.median(seconds):.2f} s', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
