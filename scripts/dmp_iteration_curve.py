#!/usr/bin/env python3
"""AEPE of `dmp` on the HPatches pair at 240x240 (or a shared flow set's pairs, `--set`)
after a fixed number of iterations, no time budget, so the figure does not move with the
machine's load (README, "A faster test-time iteration"):

    PYTHONPATH=. python scripts/dmp_iteration_curve.py [--iterations 10,15,20,25,30] \
        [--set sintel] [KEY=VALUE ...]
"""
import argparse
import json

import numpy as np
import torch

from dense_match_ros.core.registry import load_matcher
from dense_match_ros.data.shared_sets import hpatches_pair, load_flow_set
from dense_match_ros.evaluation.cli import parse_options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--iterations', default='10,15,20,25,30')
    p.add_argument('--set', default=None, help='a shared flow set (default: the HPatches pair at 240)')
    p.add_argument('options', nargs='*', help='matcher options, KEY=VALUE')
    args = p.parse_args()
    torch.set_num_threads(1)
    pairs = load_flow_set(args.set) if args.set else [hpatches_pair(size=(240, 240))]
    curve = {}
    for n in (int(v) for v in args.iterations.split(',')):
        matcher = load_matcher('dmp', device='cpu', **{**parse_options(args.options),
                                                       'iterations': n, 'time_budget_s': 0})
        errors = []
        for pair in pairs:
            flow, _ = matcher.match(pair.source, pair.target)
            errors.append(float(np.linalg.norm(flow - pair.flow, axis=-1)[pair.valid].mean()))
        curve[n] = round(float(np.mean(errors)), 3)
        if len(pairs) > 1:
            curve[f'{n}_pairs'] = [round(e, 3) for e in errors]
    print(json.dumps(curve))


if __name__ == '__main__':
    main()
