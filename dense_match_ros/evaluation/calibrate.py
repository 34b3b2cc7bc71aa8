"""``dense-match-calibrate``: fit a learned matcher's matchability calibration on held-out
synthetic pairs and store it in its checkpoint's JSON record.

The pairs come from the held-out photos (never trained on) with a seed other than the
evaluation set's, with independently moving objects on half of them so that occlusions are
represented. What the table predicts (``--truth``): ``right``, that the pixel's match is
right (end-point error below :data:`evaluation.metrics.CORRECT_PX`, ground truth visible in the
target), what pose selection wants of a precise flow; or ``visible``, that the pixel has a
visible match at all (DGC+M-Net's matchability, what the matchability Jaccard scores), for a
matcher whose flow is too coarse for the first to ever pass one half.

Example::

    dense-match-calibrate --method neuflow --pairs 60 --write
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from dense_match_ros.core import calibration, load_matcher
from dense_match_ros.core.checkpoint import read_record, write_record
from dense_match_ros.data.photos import PhotoSource
from dense_match_ros.data.synthetic import KINDS, SyntheticPairGenerator
from dense_match_ros.evaluation import metrics

CALIBRATION_SEED = 7  # not the evaluation set's (2026)


def calibration_pairs(n: int, size: tuple[int, int] = (240, 240), seed: int = CALIBRATION_SEED):
    """``n`` held-out pairs of ``size`` (H, W)."""
    gen = SyntheticPairGenerator(PhotoSource(split='heldout'), size=size, kinds=KINDS,
                                 objects=0.5)
    return [gen.pair(seed, i) for i in range(n)]


TRUTHS = ('right', 'visible')


def reliability_of(matcher, pairs, truth: str = 'right') -> dict:
    if truth not in TRUTHS:
        raise ValueError(f'truth must be one of {TRUTHS}, got {truth!r}')
    parts = []
    for pair in pairs:
        flow, matchability = matcher.match(pair.source, pair.target)
        hit = pair.valid.copy()
        if truth == 'right':
            hit &= np.linalg.norm(flow - pair.flow, axis=-1) < metrics.CORRECT_PX
        parts.append(metrics.reliability_counts(matchability, hit))
    return metrics.merge_reliability(parts)


def store_table(record: dict, method: str, entry: dict) -> str:
    """Put ``method``'s calibration ``entry`` into a checkpoint ``record``; returns where.

    The record's own method gets ``calibration``. A variant sharing the checkpoint
    (``neuflow-fast`` on ``neuflow``'s weights) scores on its own scale, so its table goes
    to ``calibrations[method]``, beside the method's and never over it."""
    if record.get('method', method) == method:
        record['calibration'] = entry
        return 'calibration'
    record.setdefault('calibrations', {})[method] = entry
    return f'calibrations.{method}'


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--method', default='neuflow')
    p.add_argument('--weights', default=None, help='checkpoint (default: the shipped one)')
    p.add_argument('--option', action='append', default=[], metavar='KEY=VALUE',
                   help='matcher option (YAML value), as in dense-match-eval')
    p.add_argument('--pairs', type=int, default=60)
    p.add_argument('--seed', type=int, default=CALIBRATION_SEED)
    p.add_argument('--size', default='240x240', metavar='WxH',
                   help='pair size: calibrate at the size the matcher will see (a camera\'s '
                        '640x480), since a matcher may take another path on smaller inputs')
    p.add_argument('--truth', choices=TRUTHS, default='right',
                   help="what matchability predicts: a right match (within a pixel; default) "
                        "or a visible one")
    p.add_argument('--write', action='store_true',
                   help="store the table as 'calibration' in the checkpoint's JSON record")
    args = p.parse_args(argv)
    from dense_match_ros.evaluation.cli import parse_options
    options = {**parse_options(args.option), 'calibrated': False}
    matcher = load_matcher(args.method, device='cpu', weights=args.weights, **options)
    from dense_match_ros.evaluation.bench_match import parse_size
    pairs = calibration_pairs(args.pairs, size=parse_size(args.size), seed=args.seed)
    counts = reliability_of(matcher, pairs, args.truth)
    table = calibration.fit_table(counts)
    before = metrics.calibration_error(counts)
    # In-sample check of the fitted map (the evaluation's reliability is the held-out one).
    calibrated = dict(counts)
    calibrated['sum_matchability'] = [
        float(c * calibration.apply_table(np.array([s / c]), table)[0]) if c else 0.0
        for s, c in zip(counts['sum_matchability'], counts['count'])]
    print(f'{args.method}: {len(pairs)} held-out pairs (seed {args.seed}), truth {args.truth}; '
          f'calibration error {before:.3f} -> {metrics.calibration_error(calibrated):.3f}')
    print('table: ' + '  '.join(f'{x:.2f}->{y:.2f}' for x, y in
                                zip(table['matchability'], table['probability'])))
    if args.write:
        if not matcher.weights:
            print('--write: this matcher has no checkpoint file', file=sys.stderr)
            return 2
        record = read_record(matcher.weights)
        entry = {**table, 'pairs': len(pairs), 'seed': args.seed, 'size': args.size,
                 'truth': args.truth, 'options': options, 'error_before': before,
                 **({'correct_px': metrics.CORRECT_PX} if args.truth == 'right' else {}),
                 'command': 'dense-match-calibrate ' + ' '.join(argv or sys.argv[1:])}
        where = store_table(record, args.method, entry)
        print(f'wrote the calibration into {write_record(matcher.weights, record)} ({where})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
