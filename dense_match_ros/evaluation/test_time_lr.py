"""Fit a test-time-optimised matcher's learning rate on held-out pairs and store it with its
weights.

``dmp`` optimises its network on every pair with Adam; how large a step improves a prior most
depends on the prior (a sharper one wants a smaller step: stage 2 fitted 1e-4, stage 3c 5e-5),
so the step is a property of the checkpoint. This runs each candidate on the calibration pairs
(held-out photos, seed 7, half with moving objects: never an evaluation set) at a fixed number
of iterations without the time budget, so that the machine's load does not move the figures,
and keeps the lowest mean AEPE. ``--write`` stores it as ``test_time.lr`` in the checkpoint's
JSON record, which the matcher reads when no ``lr`` option is given.

Example::

    python -m dense_match_ros.evaluation.test_time_lr --weights out/s29/dmp_s3c.pt \\
        --lr 2.5e-5 --lr 5e-5 --lr 1e-4 --lr 2e-4 --write
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np
import torch

from dense_match_ros.core import load_matcher
from dense_match_ros.core.checkpoint import read_record, write_record
from dense_match_ros.evaluation import metrics
from dense_match_ros.evaluation.calibrate import CALIBRATION_SEED, calibration_pairs

METHODS = ('dmp', 'dmp-scratch')
"""Matchers with a test-time ``lr`` option (``dmp`` reads a fitted one from its record)."""


def mean_aepe(matcher, pairs: Sequence, progress: bool = False, desc: str = '') -> float:
    """Mean AEPE of ``matcher`` over ``pairs``."""
    from tqdm import tqdm
    errors = [metrics.aepe(matcher.match(p.source, p.target).flow, p.flow, p.valid)
              for p in tqdm(pairs, desc=desc, unit='pair', leave=False, disable=not progress)]
    return float(np.mean(errors))


def fit_lr(method: str, weights: str | None, lrs: Sequence[float], pairs: Sequence,
           iterations: int, options: dict | None = None, progress: bool = False) -> dict:
    """Mean AEPE per candidate learning rate and the best of them (ties: the first given)."""
    if not lrs:
        raise ValueError('give at least one candidate learning rate')
    if any(not lr > 0 for lr in lrs):
        raise ValueError(f'learning rates must be positive, got {list(lrs)}')
    scores = {}
    for lr in lrs:
        matcher = load_matcher(method, device='cpu', weights=weights, lr=float(lr),
                               iterations=int(iterations), time_budget_s=0, **(options or {}))
        scores[float(lr)] = mean_aepe(matcher, pairs, progress, f'lr {lr:g}')
    best = min(scores, key=scores.get)
    return {'lr': best, 'mean_aepe': {f'{k:g}': v for k, v in scores.items()},
            'weights': str(matcher.weights)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m dense_match_ros.evaluation.test_time_lr',
                                description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', default='dmp', choices=METHODS)
    p.add_argument('--weights', default=None, help='default: the shipped checkpoint')
    p.add_argument('--lr', action='append', type=float, required=True,
                   help='a candidate learning rate; repeat for each')
    p.add_argument('--pairs', type=int, default=16)
    p.add_argument('--size', default='240x240', metavar='HxW')
    p.add_argument('--iterations', type=int, default=20,
                   help='fixed per pair, no time budget (what the 2 s budget buys on this CPU)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--write', action='store_true',
                   help="store the best as test_time.lr in the checkpoint's JSON record")
    p.add_argument('--no-progress', action='store_true')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.write and args.method != 'dmp':
        raise SystemExit(f'--write stores the step with pre-trained weights; {args.method} has '
                         'none of its own (its --weights is the trunk of another method)')
    torch.set_num_threads(max(1, args.threads))
    size = tuple(int(x) for x in args.size.lower().split('x'))
    if len(size) != 2:
        raise SystemExit(f'--size must be HxW, got {args.size!r}')
    pairs = calibration_pairs(args.pairs, size=size)
    started = time.perf_counter()
    fit = fit_lr(args.method, args.weights, args.lr, pairs, args.iterations,
                 progress=not args.no_progress)
    for lr, aepe in fit['mean_aepe'].items():
        print(f'lr {lr:>8s}  mean AEPE {aepe:.3f}' + ('  <- best' if float(lr) == fit['lr'] else ''))
    if args.write:
        record = read_record(fit['weights'])
        if not record:
            raise SystemExit(f"{fit['weights']}: no JSON record to write into (a run's last.pt "
                             'has none: export it first)')
        record['test_time'] = {
            'lr': fit['lr'], 'mean_aepe': fit['mean_aepe'], 'pairs': args.pairs,
            'size': list(size), 'seed': CALIBRATION_SEED, 'iterations': args.iterations,
            'seconds': round(time.perf_counter() - started, 1),
            'command': 'python -m dense_match_ros.evaluation.test_time_lr ' + ' '.join(argv)}
        print(f"wrote test_time.lr = {fit['lr']:g} into {write_record(fit['weights'], record)}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
