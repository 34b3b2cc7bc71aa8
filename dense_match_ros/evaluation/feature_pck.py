"""HiLM's Fig. 4 analysis: nearest-neighbour PCK of shallow, deep and hierarchical matching.

On the fixed held-out synthetic pairs (held-out photos, never trained on), source points on
a regular grid are matched into the target by plain nearest neighbour over the whole
target with the shallow descriptors, with the deep descriptors, and by HiLM's hierarchy
(deep NN, then shallow search within a radius). The PCK curves over pixel thresholds show
the trade-off the paper reports: deep features find the right region more often (better at
large thresholds), shallow ones localise better (better at small thresholds), and the
hierarchy should get both. No densification or consistency filter is involved.

Example::

    python -m dense_match_ros.evaluation.feature_pck --weights dense_match_ros/weights/hilm_cpu.pt \\
        --out reports/feature_pck.png --json reports/feature_pck.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dense_match_ros.core.methods.hilm_hierarchical import hierarchical_match, nearest_cells, sample_descriptors
from dense_match_ros.core.registry import HIERARCHICAL_FEATURES, Matcher, load_matcher
from dense_match_ros.data.synthetic import HELDOUT_SEED, heldout_pairs
from dense_match_ros.evaluation import report

THRESHOLDS = tuple(float(t) for t in np.arange(0, 20.5, 0.5))
STRATEGIES = ('shallow', 'deep', 'hierarchical', 'hierarchical_subpixel')


@torch.no_grad()
def match_errors(matcher: Matcher, pair, step: int = 8, radius: float | None = None
                 ) -> dict[str, np.ndarray]:
    """Per-point end-point errors (px) of each strategy on one synthetic pair."""
    sh_s, dp_s = matcher.features(pair.source)
    sh_t, dp_t = matcher.features(pair.target)
    h, w = pair.valid.shape
    ys, xs = np.mgrid[step // 2:h:step, step // 2:w:step]
    keep = pair.valid[ys, xs]
    xs, ys = xs[keep], ys[keep]
    pts_np = np.stack([xs, ys], -1).astype(np.float32)
    want = pts_np + pair.flow[ys, xs]
    pts = torch.from_numpy(pts_np).to(matcher.device)
    s_str, d_str = matcher.net.shallow_stride, matcher.net.deep_stride
    radius = matcher.search_radius((w, h)) if radius is None else radius
    found = {
        'shallow': nearest_cells(sample_descriptors(sh_s[None], pts[None], s_str)[0], sh_t, s_str)[0],
        'deep': nearest_cells(sample_descriptors(dp_s[None], pts[None], d_str)[0], dp_t, d_str)[0],
        'hierarchical': hierarchical_match(pts, sh_s, dp_s, sh_t, dp_t, s_str, d_str, radius,
                                           subpixel=False)[0],
        'hierarchical_subpixel': hierarchical_match(pts, sh_s, dp_s, sh_t, dp_t, s_str, d_str,
                                                    radius, subpixel=True)[0],
    }
    return {k: np.linalg.norm(v.cpu().numpy() - want, axis=-1) for k, v in found.items()}


def pck_curves(errors: dict[str, np.ndarray], thresholds: Sequence[float] = THRESHOLDS) -> dict:
    return {k: [float((e <= t).mean()) if e.size else float('nan') for t in thresholds]
            for k, e in errors.items()}


def plot(curves: dict, thresholds: Sequence[float], path: Path, title: str) -> None:
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    styles = {'shallow': ('tab:blue', '-'), 'deep': ('tab:orange', '-'),
              'hierarchical': ('tab:green', '--'), 'hierarchical_subpixel': ('tab:green', '-')}
    for name, ys in curves.items():
        color, ls = styles.get(name, (None, '-'))
        ax.plot(thresholds, ys, ls, color=color, label=name.replace('_', ' + '))
    ax.set_xlabel('threshold (px, 240x240 pairs)')
    ax.set_ylabel('PCK (nearest-neighbour matches)')
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right')
    ax.set_title(title, fontsize=9)
    report.save_figure(fig, path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--method', default='hilm',
                   help='a registered method with hierarchical features (default: hilm)')
    p.add_argument('--weights', default=None, help='checkpoint (default: the shipped one)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--pairs', type=int, default=20, help='held-out synthetic pairs (240x240)')
    p.add_argument('--step', type=int, default=8, help='grid spacing of the source points (px)')
    p.add_argument('--radius', type=float, default=None, help='refinement radius (px)')
    p.add_argument('--out', type=Path, default=None, help='PNG of the PCK curves')
    p.add_argument('--json', type=Path, default=None, help='write curves and figures here')
    args = p.parse_args(argv)
    matcher = load_matcher(args.method, device=args.device, weights=args.weights)
    if not matcher.supports(HIERARCHICAL_FEATURES):
        print(f'feature_pck: {args.method} has no shallow/deep features to compare', file=sys.stderr)
        return 2
    pairs = heldout_pairs(args.pairs, size=(240, 240), seed=HELDOUT_SEED)
    all_errors: dict[str, list] = {k: [] for k in STRATEGIES}
    for pair in pairs:
        for k, e in match_errors(matcher, pair, args.step, args.radius).items():
            all_errors[k].append(e)
    errors = {k: np.concatenate(v) for k, v in all_errors.items()}
    curves = pck_curves(errors)
    n_points = int(errors['deep'].size)
    print(f'{len(pairs)} held-out synthetic pairs, {n_points} points, weights {matcher.weights}')
    print(f'{"strategy":24s}' + ''.join(f'PCK@{t:<4g}' for t in (1, 2, 5, 10, 20)) + '  median px')
    for k in STRATEGIES:
        row = ''.join(f'{float((errors[k] <= t).mean()):<8.3f}' for t in (1, 2, 5, 10, 20))
        print(f'{k:24s}{row}  {float(np.median(errors[k])):.2f}')
    record = {'weights': matcher.weights, 'pairs': len(pairs), 'points': n_points,
              'step': args.step, 'radius': args.radius or matcher.search_radius((240, 240)),
              'thresholds': list(THRESHOLDS), 'pck': curves,
              'median_error_px': {k: float(np.median(e)) for k, e in errors.items()},
              'command': 'python -m dense_match_ros.evaluation.feature_pck ' + ' '.join(argv or sys.argv[1:])}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + '\n')
    if args.out:
        plot(curves, THRESHOLDS, args.out,
             f'HiLM Fig. 4 analysis: {len(pairs)} held-out synthetic pairs, {n_points} points')
    return 0


if __name__ == '__main__':
    sys.exit(main())
