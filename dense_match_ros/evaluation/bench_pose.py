"""``dense-match-bench-pose``: every pose estimator on the same correspondences.

Three measurements, each printed as a markdown table and written to one JSON file:

1. accuracy on synthetic random scenes (known pose, Gaussian pixel noise, outliers),
   one scene per seed, identical for every estimator;
2. time per estimate on one synthetic scene of ``--n`` correspondences, median over
   ``--runs`` runs: the whole :func:`estimate_from_correspondences` call (selection,
   robust search, cheirality, polish, checks) and the robust search alone;
3. accuracy on the shared real pose pairs (TUM fr3 office 0-5/10/15, Middlebury rings
   neighbours), flow from ``--method`` (``dis`` by default) computed once per pair and
   given to every estimator, plus the ground-truth-correspondence upper bound (TUM).

Run ``dense-match-bench-pose --help`` for the options; the default estimator of
:class:`dense_match_ros.core.geometry.pose.PoseConfig` was chosen from this benchmark's output.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dense_match_ros.core.geometry import essential, essential_ransac
from dense_match_ros.core.registry import DEFAULT_METHOD
from dense_match_ros.evaluation import metrics
from dense_match_ros.core.geometry.pose import PoseConfig, estimate_from_correspondences, estimate_relative_pose
from dense_match_ros.evaluation import pose_eval


def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return 'nan' if not np.isfinite(value) else f'{value:.{digits}f}'
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]], digits: int = 2) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(_fmt(v, digits) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def synthetic_accuracy(estimators: list[str], seeds: int, n: int, noise_px: float,
                       outlier_ratio: float, base: PoseConfig) -> dict[str, dict[str, Any]]:
    """Per estimator: rotation / translation errors (deg) over ``seeds`` random scenes."""
    out: dict[str, dict[str, Any]] = {}
    if seeds <= 0:
        return out
    scenes = [pose_eval.random_scene(seed, n=n, noise_px=noise_px, outlier_ratio=outlier_ratio)
              for seed in range(seeds)]
    for name in estimators:
        config = _with(base, estimator=name)
        rot, tra, times, valid, nees_r, nees_t = [], [], [], [], [], []
        for seed, scene in enumerate(scenes):
            est = estimate_from_correspondences(scene.points_source, scene.points_target,
                                                scene.K, scene.K, config=config, rng=seed)
            valid.append(est.valid)
            times.append(est.time_s)
            rot.append(metrics.rotation_error_deg(est.R, scene.R))
            tra.append(metrics.translation_direction_error_deg(est.t, scene.t))
            nees_r.append(_nees(_rotation_vector(est.R @ scene.R.T), est.covariance[3:, 3:]))
            nees_t.append(_nees(scene.t - est.t, est.covariance[:3, :3]))
        rot_a, tra_a = np.array(rot), np.nan_to_num(np.array(tra), nan=180.0)
        out[name] = {
            'rotation_error_deg': rot, 'translation_error_deg': tra,
            'median_rotation_error_deg': float(np.median(rot_a)),
            'max_rotation_error_deg': float(np.max(rot_a)),
            'median_translation_error_deg': float(np.median(tra_a)),
            'max_translation_error_deg': float(np.max(tra_a)),
            'pass_fraction': float(np.mean((rot_a < 0.5) & (tra_a < 2.0))),
            'valid_fraction': float(np.mean(valid)),
            'median_time_s': float(np.median(times)),
            # Covariance consistency: mean normalised estimation error squared, ideally the
            # number of degrees of freedom (3 for the rotation, 2 for the unit translation).
            'mean_nees_rotation': float(np.mean(nees_r)),
            'mean_nees_translation': float(np.mean(nees_t)),
        }
    return out


def _rotation_vector(R: np.ndarray) -> np.ndarray:
    import cv2
    return cv2.Rodrigues(np.asarray(R, dtype=np.float64))[0].ravel()


def _nees(error: np.ndarray, covariance: np.ndarray) -> float:
    if not np.all(np.isfinite(covariance)):
        return float('nan')
    return float(error @ np.linalg.pinv(covariance, rcond=1e-10, hermitian=True) @ error)


def timing(estimators: list[str], n: int, runs: int, base: PoseConfig) -> dict[str, dict[str, float]]:
    """Median seconds per estimate (whole pipeline, and robust search only) on ``n`` points."""
    scene = pose_eval.random_scene(12345, n=n, noise_px=1.0, outlier_ratio=0.3)
    x1 = essential.normalize_points(scene.points_source, scene.K)
    x2 = essential.normalize_points(scene.points_target, scene.K)
    out = {}
    for name in estimators:
        config = _with(base, estimator=name)
        settings = essential_ransac.RobustSettings(
            threshold=config.ransac_threshold_px / scene.K[0, 0], confidence=config.confidence,
            max_iterations=config.max_iterations, device=config.device)
        # One warm-up call each, so imports and first-call allocations are not timed.
        estimate_from_correspondences(scene.points_source, scene.points_target, scene.K, scene.K,
                                      config=config, rng=0)
        total, robust, cpu = [], [], []
        for run in range(runs):
            cpu_start = time.process_time()
            est = estimate_from_correspondences(scene.points_source, scene.points_target,
                                                scene.K, scene.K, config=config, rng=run)
            cpu.append(time.process_time() - cpu_start)
            total.append(est.time_s)
            rng = np.random.default_rng(run)
            start = time.perf_counter()
            essential_ransac.run(name, x1, x2, settings, rng)
            robust.append(time.perf_counter() - start)
        # Process CPU time (all threads) beside wall time: on a shared machine the wall
        # time also measures the neighbours' load.
        out[name] = {'median_total_s': float(np.median(total)),
                     'median_robust_s': float(np.median(robust)),
                     'median_total_cpu_s': float(np.median(cpu)),
                     'correspondences': n, 'runs': runs}
    return out


def real_pairs(estimators: list[str], method: str, base: PoseConfig, sets: list[str],
               root: str | None) -> dict[str, Any]:
    """Per set and estimator: the records of every pair and their summary."""
    from dense_match_ros.core.registry import load_matcher
    from dense_match_ros.data import shared_sets

    matcher = load_matcher(method, device='cpu')
    out: dict[str, Any] = {}
    for set_name in sets:
        try:
            pairs = shared_sets.load_pose_set(set_name, root)
        except FileNotFoundError as error:
            print(f'skipping {set_name}: {error}', file=sys.stderr)
            continue
        flows = []
        for pair in pairs:
            start = time.perf_counter()
            flows.append((*matcher.match(pair.source, pair.target), time.perf_counter() - start))
        per_set: dict[str, Any] = {}
        for name in estimators:
            config = _with(base, estimator=name)
            records = []
            for pair, (flow, matchability, match_time) in zip(pairs, flows):
                est = estimate_relative_pose(flow, matchability, pair.K_source, pair.K_target,
                                             config=config, rng=0)
                record = pose_eval._record(est, pair.T_target_source, match_time)
                record['pair'] = pair.name
                records.append(record)
            per_set[name] = {'records': records, 'summary': pose_eval.summarize(records)}
        if all(p.depth_source is not None for p in pairs):
            for name in estimators:
                records = []
                for pair in pairs:
                    record = pose_eval.evaluate_gt_upper_bound(pair, _with(base, estimator=name))
                    record['pair'] = pair.name
                    records.append(record)
                per_set[f'gt-upper-bound/{name}'] = {'records': records,
                                                     'summary': pose_eval.summarize(records)}
        out[set_name] = per_set
    return out


def _with(base: PoseConfig, **changes) -> PoseConfig:
    import dataclasses
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='dense-match-bench-pose', description=__doc__.split('\n')[0])
    parser.add_argument('--estimators', nargs='+', default=PoseConfig.estimators(),
                        choices=PoseConfig.estimators())
    parser.add_argument('--seeds', type=int, default=20, help='synthetic scenes (one per seed)')
    parser.add_argument('--n', type=int, default=2000, help='correspondences per synthetic scene')
    parser.add_argument('--noise-px', type=float, default=1.0)
    parser.add_argument('--outliers', type=float, default=0.3)
    parser.add_argument('--runs', type=int, default=100, help='timing runs per estimator')
    parser.add_argument('--method', default=DEFAULT_METHOD, help='matcher for the real pairs')
    parser.add_argument('--sets', nargs='*', default=['tum', 'middlebury'],
                        help='real pose sets (none: skip real data)')
    parser.add_argument('--data', default=None, help='shared data root (default ../shared/data)')
    parser.add_argument('--threshold-px', type=float, default=PoseConfig.ransac_threshold_px)
    parser.add_argument('--device', default='cpu', help="torch estimator device (default 'cpu': "
                        "times comparable with the CPU estimators; 'auto' uses CUDA)")
    parser.add_argument('--no-refine', action='store_true',
                        help='skip the shared Gauss-Newton polish (raw estimator accuracy)')
    parser.add_argument('--json', default='pose_bench.json', help='output JSON path')
    args = parser.parse_args(argv)

    base = PoseConfig(ransac_threshold_px=args.threshold_px, device=args.device,
                      refine=not args.no_refine)
    try:
        import torch
        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_threads = 0
    result: dict[str, Any] = {'args': vars(args), 'torch_threads': torch_threads}

    synth = synthetic_accuracy(args.estimators, args.seeds, args.n, args.noise_px, args.outliers, base)
    result['synthetic'] = synth
    if args.seeds > 0:
        print(f'\n### Synthetic scenes: {args.seeds} seeds, {args.n} correspondences, '
              f'{args.noise_px:g} px noise, {args.outliers:.0%} outliers, threshold '
              f'{args.threshold_px:g} px, polish {"off" if args.no_refine else "on"}\n')
        print(markdown_table(
            ['estimator', 'median rot err (deg)', 'max rot err', 'median t err (deg)', 'max t err',
             'pass (rot<0.5, t<2)', 'NEES rot (ideal 3)', 'NEES t (ideal 2)', 'median time (ms)'],
            [[k, v['median_rotation_error_deg'], v['max_rotation_error_deg'],
              v['median_translation_error_deg'], v['max_translation_error_deg'], v['pass_fraction'],
              v['mean_nees_rotation'], v['mean_nees_translation'], 1000 * v['median_time_s']]
             for k, v in synth.items()], digits=3))

    if args.runs > 0:
        times = timing(args.estimators, args.n, args.runs, base)
        result['timing'] = times
        print(f'\n### Time per estimate, {args.n} correspondences, median of {args.runs} runs, '
              f'CPU ({torch_threads} torch threads)\n')
        load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
        result['load_average_after_timing'] = load
        print(f'(1-min load average after timing: {load:.1f} on {os.cpu_count()} cores)\n')
        print(markdown_table(['estimator', 'whole estimate (ms)', 'robust search only (ms)',
                              'whole estimate, process CPU (ms)'],
                             [[k, 1000 * v['median_total_s'], 1000 * v['median_robust_s'],
                               1000 * v['median_total_cpu_s']] for k, v in times.items()],
                             digits=1))

    if args.sets:
        real = real_pairs(args.estimators, args.method, base, args.sets, args.data)
        result['real'] = real
        for set_name, per_set in real.items():
            print(f'\n### {set_name}: flow from `{args.method}`\n')
            rows = []
            for name, entry in per_set.items():
                s = entry['summary']
                rows.append([name, s['pairs'], s['valid_fraction'], s['median_rotation_error_deg'],
                             s['median_translation_error_deg'], s['auc@5'], s['auc@10'],
                             s['auc@20'], 1000 * s['median_estimate_time_s']])
            print(markdown_table(['estimator', 'pairs', 'valid', 'median rot err (deg)',
                                  'median t err (deg)', 'AUC@5', 'AUC@10', 'AUC@20',
                                  'median time (ms)'], rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    print(f'\nwrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
