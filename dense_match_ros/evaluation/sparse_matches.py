"""Quasi-dense matches judged on their own, and the interpolator judged on perfect matches.

``python -m dense_match_ros.evaluation.sparse_matches --method deepmatching --sets sintel``

For a matcher with ``match_sparse`` (DeepMatching) and every pair of the flow sets:

* ``match_acc@10``: DeepMatching's accuracy@10 of the matches themselves (Revaud et al.):
  every pixel takes its nearest match's displacement, then the share of valid pixels
  within 10 px of the truth (:func:`metrics.accuracy_at`);
* ``match_precision@10``: the share of matches (at valid pixels) within 10 px;
* ``aepe``, ``acc@10``: of the dense ``match()`` flow (after interpolation);
* ``jaccard``: of the dense matchability (> 0.5) against the truly matchable pixels (valid
  and landing inside the target);
* ``gt_interp_aepe``: the ground-truth flow sampled at every atomic patch centre (valid
  ones) run through the same EpicFlow interpolator at the same working size: the error
  interpolation alone adds, which splits matching error from interpolation error.

Sets: those of ``dense-match-eval`` plus ``objects``: held-out moving-object pairs (held-out
photos, every pair with 2-6 independently moving objects, the evaluation seed, 240x240).

Why a module of its own: ``dense-match-eval`` judges any dense flow; these numbers need the
matches before densification, which only sparse-then-dense methods have.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from dense_match_ros.core.geometry import grid
from dense_match_ros.core.methods.epicflow import nearest_match_flow
from dense_match_ros.evaluation import metrics


def evaluate_pair(matcher, pair) -> dict:
    gt = np.asarray(pair.flow, np.float32)
    valid = np.asarray(pair.valid, bool) & np.isfinite(gt).all(-1)
    h, w = pair.source.shape[:2]
    if not hasattr(matcher, 'match_sparse'):     # a dense method, for comparison
        t0 = time.perf_counter()
        dense = matcher.match(pair.source, pair.target)
        return {'aepe': metrics.aepe(dense.flow, gt, valid),
                'acc@10': metrics.accuracy_at(dense.flow, gt, valid, 10.0),
                'jaccard': metrics.matchability_jaccard(
                    dense.matchability, valid & grid.in_bounds(gt, pair.target.shape[1::-1]), 0.5),
                'match_time_s': time.perf_counter() - t0}
    t0 = time.perf_counter()
    sparse = matcher.match_sparse(pair.source, pair.target)
    t1 = time.perf_counter()
    dense = matcher.match(pair.source, pair.target)
    t2 = time.perf_counter()
    nn = nearest_match_flow(sparse.source, sparse.target, (h, w))
    ij = np.clip(np.rint(sparse.source).astype(int), 0, [w - 1, h - 1])
    at = valid[ij[:, 1], ij[:, 0]]
    err = np.linalg.norm(sparse.target - sparse.source - np.nan_to_num(gt[ij[:, 1], ij[:, 0]]), axis=1)
    return {
        'matches': int(len(sparse.source)),
        'match_acc@10': metrics.accuracy_at(nn, gt, valid, 10.0),
        'match_precision@10': float(np.mean(err[at] < 10.0)) if at.any() else float('nan'),
        'aepe': metrics.aepe(dense.flow, gt, valid),
        'acc@10': metrics.accuracy_at(dense.flow, gt, valid, 10.0),
        'jaccard': metrics.matchability_jaccard(
            dense.matchability, valid & grid.in_bounds(gt, pair.target.shape[1::-1]), 0.5),
        'gt_interp_aepe': gt_through_interpolator(matcher, pair),
        'sparse_time_s': t1 - t0,
        'match_time_s': t2 - t1,
        'mean_gt_px': float(np.linalg.norm(gt, axis=-1)[valid].mean()) if valid.any() else 0.0,
    }


def object_pairs(n: int) -> list:
    """Held-out moving-object pairs: the held-out photos, objects in every pair."""
    from dense_match_ros.data.photos import PhotoSource
    from dense_match_ros.data.synthetic import SyntheticPairGenerator
    from dense_match_ros.evaluation.cli import SYNTHETIC_SEED, SYNTHETIC_SIZE
    gen = SyntheticPairGenerator(PhotoSource(split='heldout'), size=SYNTHETIC_SIZE, objects=1.0)
    return [gen.pair(SYNTHETIC_SEED, i) for i in range(n)]


def gt_through_interpolator(matcher, pair) -> float:
    """AEPE of the dense flow EpicFlow makes from ground-truth matches at the atomic patch
    centres (valid ones), at the matcher's working size."""
    from dense_match_ros.core.networks.deepmatching import ATOMIC, patch_centres
    gt = np.asarray(pair.flow, np.float32)
    valid = np.asarray(pair.valid, bool) & np.isfinite(gt).all(-1)
    h, w = pair.source.shape[:2]
    th, tw = pair.target.shape[:2]
    src, tgt = matcher.working_images(pair.source, pair.target)
    (sh, sw), (twh, tww) = src.shape[:2], tgt.shape[:2]
    stride = matcher.net.stride
    gy, gx = sh // stride // ATOMIC, sw // stride // ATOMIC
    pts = patch_centres((gy, gx), stride).numpy()
    native = (pts + 0.5) * [w / sw, h / sh] - 0.5
    ij = np.clip(np.rint(native).astype(int), 0, [w - 1, h - 1])
    ok = valid[ij[:, 1], ij[:, 0]]
    there = native[ok] + gt[ij[ok, 1], ij[ok, 0]]
    there_w = (there + 0.5) * [tww / tw, twh / th] - 0.5
    flow = matcher._interp.densify(src, pts[ok], tgt, there_w.astype(np.float32))
    flow, _ = grid.to_source_grid(flow, None, (w, h), (tww, twh), (tw, th))
    return metrics.aepe(flow, gt, valid)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m dense_match_ros.evaluation.sparse_matches',
                                description=__doc__.split('\n\n')[0])
    p.add_argument('--method', default='deepmatching')
    p.add_argument('--weights', default=None)
    p.add_argument('--sets', default='sintel')
    p.add_argument('--data-root', default=None)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--n', type=int, default=20, help='pairs of the synthetic sets')
    p.add_argument('--option', action='append', default=[], metavar='KEY=VALUE')
    p.add_argument('--json', type=Path, default=None)
    args = p.parse_args(argv)
    from dense_match_ros.core.device import set_threads
    from dense_match_ros.core.registry import load_matcher
    from dense_match_ros.evaluation.cli import _flow_pairs, _pair_name, parse_options
    from dense_match_ros.data import shared_sets
    set_threads(args.threads)
    options = parse_options(args.option)
    matcher = load_matcher(args.method, device='cpu', weights=args.weights, **options)
    root = Path(args.data_root) if args.data_root else shared_sets.data_root()
    record = {'method': args.method, 'weights': args.weights, 'options': options,
              'command': 'python -m dense_match_ros.evaluation.sparse_matches '
                         + ' '.join(argv if argv is not None else sys.argv[1:]), 'sets': {}}
    for name in args.sets.split(','):
        pairs = object_pairs(args.n) if name == 'objects' else _flow_pairs(name, root, args.n)
        rows = []
        for i, pair in enumerate(pairs):
            row = {'pair': _pair_name(pair, i, name), **evaluate_pair(matcher, pair)}
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                  flush=True)
        keys = [k for k in rows[0] if k != 'pair']
        summary = {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
        record['sets'][name] = {**summary, 'rows': rows}
        print(name, json.dumps({k: round(v, 4) for k, v in summary.items()}), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
