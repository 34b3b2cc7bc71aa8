"""Per-set summaries of ``dense-match-eval``'s per-pair rows: means of the flow metrics and
the PCK curve, pose AUCs (of seed 0 and, with several RANSAC seeds, their mean and spread)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from dense_match_ros.evaluation import metrics
from dense_match_ros.evaluation.pose_eval import seed_pose_error

PCK_CURVE_THRESHOLDS = tuple(float(t) for t in np.linspace(0.0, 20.0, 41))
POSE_AUC_THRESHOLDS = (5, 10, 20)


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values
            if isinstance(v, (int, float, np.generic)) and not isinstance(v, bool)
            and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def summarise_flow(rows: Sequence[dict]) -> dict:
    """Per-set means of every numeric metric (pairs weigh equally) and the mean PCK curve."""
    skip = ('set', 'pair', 'kind', 'pck_curve', 'aepe_levels', 'level_labels', 'reliability')
    keys = [k for k in rows[0] if k not in skip] if rows else []
    out: dict[str, Any] = {'num_pairs': len(rows)}
    for k in keys:
        out[k] = _mean(r.get(k) for r in rows)
    if rows and 'aepe_levels' in rows[0]:
        out['aepe_levels'] = [_mean(r['aepe_levels'][i] for r in rows)
                              for i in range(len(rows[0]['aepe_levels']))]
        out['level_labels'] = rows[0]['level_labels']
    if rows and 'reliability' in rows[0]:
        out['reliability'] = metrics.merge_reliability(r['reliability'] for r in rows)
        out['calibration_error'] = metrics.calibration_error(out['reliability'])
    curves = np.array([[np.nan if x is None else x for x in r['pck_curve']] for r in rows],
                      dtype=np.float64)
    if len(rows):
        out['pck_curve'] = {'thresholds_px': list(PCK_CURVE_THRESHOLDS),
                            'values': np.nanmean(curves, axis=0).tolist()}
    kinds = sorted({r['kind'] for r in rows if r.get('kind')})
    if kinds:
        out['by_kind'] = {kind: summarise_kind([r for r in rows if r.get('kind') == kind])
                          for kind in kinds}
    return out


KIND_KEYS = ('aepe', 'pck@1', 'pck@3', 'pck@5', 'fl', 'jaccard')


def summarise_kind(rows: Sequence[dict]) -> dict:
    """The headline means over the synthetic pairs of one warp kind: a parametric matcher is
    judged on the kinds its transform can express (CNNGeo: affine and TPS, not homography)."""
    return {'num_pairs': len(rows), **{k: _mean(r.get(k) for r in rows) for k in KIND_KEYS}}


def summarise_pose(rows: Sequence[dict]) -> dict:
    """AUC@5/10/20 of max(R, t) error (failures infinite), medians, and time."""
    errors = pose_errors(rows)
    out: dict[str, Any] = {'num_pairs': len(rows),
                           'num_valid': int(sum(math.isfinite(e) for e in errors))}
    out.update(metrics.pose_auc(errors, POSE_AUC_THRESHOLDS))
    valid_rows = [r for r in rows if r.get('valid', True)]
    for k in ('rotation_error_deg', 'translation_error_deg'):
        vals = [r.get(k) for r in valid_rows if r.get(k) is not None and math.isfinite(r.get(k))]
        out[f'median_{k}'] = float(np.median(vals)) if vals else None
    for k in ('num_correspondences', 'num_inliers', 'estimate_time_s', 'match_time_s'):
        out[k] = _mean(r.get(k) for r in rows)
    seeds = {len(r.get('seed_errors_deg') or ()) for r in rows}
    if len(seeds) == 1 and min(seeds) > 1:
        # One AUC per seed over the pairs, then their mean and spread.
        per_seed = [metrics.pose_auc([r['seed_errors_deg'][i] for r in rows],
                                     POSE_AUC_THRESHOLDS) for i in range(min(seeds))]
        out['num_seeds'] = min(seeds)
        for k in per_seed[0]:
            values = [a[k] for a in per_seed]
            out[f'{k}_seed_mean'] = float(np.mean(values))
            out[f'{k}_seed_std'] = float(np.std(values))
    return out


def seed_aucs(summary: dict) -> str:
    """' (20 seeds: AUC@10 0.693 +- 0.015 ...)' when the summary holds several seeds."""
    if not summary.get('num_seeds'):
        return ''
    parts = '  '.join(f'{k.upper()} {summary[f"{k}_seed_mean"]:.3f} +- '
                      f'{summary[f"{k}_seed_std"]:.3f}'
                      for k in summary if k.startswith('auc@') and '_seed_' not in k)
    return f'  ({summary["num_seeds"]} seeds: {parts})'


def pose_errors(rows: Sequence[dict]) -> list[float]:
    """max(R, t) error per pair; an invalid estimate is a failure (inf) whatever it says."""
    return [seed_pose_error(r) for r in rows]
