"""Relative-pose evaluation: a matcher's flow through the pose estimator, against ground truth.

Errors are angles in degrees: the geodesic rotation error and the angle between the
estimated and true translation directions (sign not folded: cheirality decides it). They
are measured whenever the estimator produced a model, whatever the validity verdict
(reported as ``valid`` / ``status``); a pair without a model gets NaN, which the AUC
counts as a failure. ``evaluate_gt_upper_bound`` puts the true correspondences (depth and
pose) through the same selection and estimator: what the estimator does when the matcher
is perfect, the ceiling any matcher is judged against.

Also here, for the tests and ``dense-match-bench-pose``: :func:`random_scene`, synthetic
correspondences with a known pose, pixel noise and outliers.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from dense_match_ros.evaluation import metrics
from dense_match_ros.core.geometry.pose import PoseConfig, PoseEstimate, estimate_relative_pose


def _errors(estimate: PoseEstimate, T_target_source: np.ndarray) -> tuple[float, float]:
    # Scored whenever a model exists, valid or not: the verdict is reported beside it, so
    # that e.g. a 'degenerate_motion' pair still shows how wrong its translation is.
    if estimate.num_inliers == 0 or not np.linalg.norm(estimate.t) > 0:
        return float('nan'), float('nan')
    T = np.asarray(T_target_source, dtype=np.float64)
    return (metrics.rotation_error_deg(estimate.R, T[:3, :3]),
            metrics.translation_direction_error_deg(estimate.t, T[:3, 3]))


def _record(estimate: PoseEstimate, T_target_source: np.ndarray, match_time_s: float
            ) -> dict[str, Any]:
    rotation_error, translation_error = _errors(estimate, T_target_source)
    return {
        'rotation_error_deg': rotation_error,
        'translation_error_deg': translation_error,
        'num_correspondences': int(estimate.num_correspondences),
        'num_inliers': int(estimate.num_inliers),
        'valid': bool(estimate.valid),
        'status': estimate.status,
        'estimate_time_s': float(estimate.time_s),
        'match_time_s': float(match_time_s),
    }


def evaluate_pose_pair(matcher, pair, config: PoseConfig | None = None,
                       rng: np.random.Generator | int | None = 0, seeds: int = 1
                       ) -> dict[str, Any]:
    """Match ``pair.source`` -> ``pair.target`` and score the pose from the flow.

    ``pair`` is a :class:`dense_match_ros.data.shared_sets.PosePair` (or anything with its
    fields). Keys: rotation_error_deg, translation_error_deg (NaN when there is no model),
    num_correspondences, num_inliers, valid, status, estimate_time_s, match_time_s.

    ``seeds`` > 1 (``rng`` an int): the same flow also goes through the robust estimator
    with the seeds ``rng + 1 ..``, and ``seed_errors_deg`` lists every seed's pose error
    (:func:`seed_pose_error`, the first being this record's). On a few dozen pairs one
    seed's AUC moves by about 0.015 (Middlebury, 20 seeds), more than many changes to a
    matcher do; the spread over seeds tells the two apart.
    """
    start = time.perf_counter()
    flow, matchability = matcher.match(pair.source, pair.target)
    match_time = time.perf_counter() - start
    estimate = estimate_relative_pose(flow, matchability, pair.K_source, pair.K_target,
                                      config=config, rng=rng)
    record = _record(estimate, pair.T_target_source, match_time)
    if seeds > 1:
        if not isinstance(rng, (int, np.integer)):
            raise ValueError('several seeds need an integer rng (the first seed)')
        errors = [seed_pose_error(record)]
        for seed in range(int(rng) + 1, int(rng) + int(seeds)):
            other = estimate_relative_pose(flow, matchability, pair.K_source, pair.K_target,
                                           config=config, rng=seed)
            errors.append(seed_pose_error(_record(other, pair.T_target_source, match_time)))
        record['seed_errors_deg'] = errors
    return record


def seed_pose_error(record: dict[str, Any]) -> float:
    """The error a pose AUC ranks for one estimate: max(R, t), infinite when the estimate
    is not valid (as ``dense-match-eval`` counts it)."""
    if not record.get('valid', True):
        return float('inf')
    return metrics.pose_error_deg(record.get('rotation_error_deg'),
                                  record.get('translation_error_deg'))


def gt_correspondence_flow(pair) -> tuple[np.ndarray, np.ndarray]:
    """(flow, matchability) from the pair's source depth and true pose, occlusion-checked
    against the target depth when there is one; matchability is 1 where valid, else 0."""
    from dense_match_ros.core.geometry.gt_flow import flow_from_depth

    if getattr(pair, 'depth_source', None) is None:
        raise ValueError(f'{pair.name}: no source depth, so no ground-truth correspondences')
    th, tw = pair.target.shape[:2]
    flow, valid = flow_from_depth(pair.depth_source, pair.K_source, pair.T_target_source,
                                  pair.K_target, (tw, th), depth_target=pair.depth_target)
    flow = np.where(valid[..., None], flow, 0.0).astype(np.float32)
    return flow, valid.astype(np.float32)


def evaluate_gt_upper_bound(pair, config: PoseConfig | None = None,
                            rng: np.random.Generator | int | None = 0) -> dict[str, Any]:
    """The same keys as :func:`evaluate_pose_pair`, from ground-truth correspondences
    (TUM depth + pose) through the same selection and estimator; match_time_s is 0."""
    flow, matchability = gt_correspondence_flow(pair)
    estimate = estimate_relative_pose(flow, matchability, pair.K_source, pair.K_target,
                                      config=config, rng=rng)
    return _record(estimate, pair.T_target_source, 0.0)


def summarize(records: list[dict[str, Any]], thresholds=(5, 10, 20)) -> dict[str, float]:
    """Median errors (over valid pairs), AUC@thresholds (failures count), valid fraction,
    median estimate time."""
    rot = np.array([r['rotation_error_deg'] for r in records], dtype=np.float64)
    tra = np.array([r['translation_error_deg'] for r in records], dtype=np.float64)
    pose_errors = [metrics.pose_error_deg(a, b) for a, b in zip(rot, tra)]
    out = {
        'pairs': len(records),
        'valid_fraction': float(np.mean([r['valid'] for r in records])) if records else float('nan'),
        'median_rotation_error_deg': float(np.nanmedian(rot)) if np.isfinite(rot).any() else float('nan'),
        'median_translation_error_deg': float(np.nanmedian(tra)) if np.isfinite(tra).any() else float('nan'),
        'median_estimate_time_s': float(np.median([r['estimate_time_s'] for r in records]))
        if records else float('nan'),
    }
    out.update(metrics.pose_auc(pose_errors, thresholds))
    return out


# --------------------------------------------------------------------------- synthetic


@dataclasses.dataclass
class SyntheticScene:
    """Correspondences with a known pose: X_target = R X_source + t (t unit)."""

    points_source: np.ndarray
    points_target: np.ndarray
    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    is_outlier: np.ndarray
    size: tuple[int, int]
    """(width, height) of both images."""


def random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    """A rotation about a uniformly random axis by an angle uniform in [0, max_angle_deg]."""
    import cv2

    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(0.0, max_angle_deg))
    return cv2.Rodrigues(axis * angle)[0]


def random_scene(rng: np.random.Generator | int, n: int = 2000, noise_px: float = 1.0,
                 outlier_ratio: float = 0.3, max_rotation_deg: float = 15.0,
                 baseline: float = 0.5, depth_range: tuple[float, float] = (2.0, 8.0),
                 size: tuple[int, int] = (640, 480), focal: float = 500.0,
                 translation: np.ndarray | None = None) -> SyntheticScene:
    """Random points seen by two pinhole cameras, with Gaussian pixel noise and outliers.

    Points are drawn uniformly over the source image at depths uniform in
    ``depth_range`` (metres, same unit as ``baseline``), kept where they project inside the
    target; both images get ``noise_px`` of Gaussian noise per axis, and a fraction
    ``outlier_ratio`` of target points is replaced by uniform random pixels.
    """
    rng = np.random.default_rng(rng)
    w, h = size
    K = np.array([[focal, 0, (w - 1) / 2], [0, focal, (h - 1) / 2], [0, 0, 1.0]])
    R = random_rotation(rng, max_rotation_deg)
    if translation is None:
        t = rng.normal(size=3)
        t = t / np.linalg.norm(t) * baseline
    else:
        t = np.asarray(translation, dtype=np.float64)
    src, tgt = [], []
    while sum(len(s) for s in src) < n:
        m = 2 * n
        px = np.stack([rng.uniform(-0.5, w - 0.5, m), rng.uniform(-0.5, h - 0.5, m)], axis=1)
        depth = rng.uniform(*depth_range, m)
        X = np.concatenate([px, np.ones((m, 1))], axis=1) @ np.linalg.inv(K).T * depth[:, None]
        Xt = X @ R.T + t
        proj = Xt @ K.T
        with np.errstate(divide='ignore', invalid='ignore'):
            pt = proj[:, :2] / proj[:, 2:3]
        ok = (Xt[:, 2] > 0.1) & (pt[:, 0] >= -0.5) & (pt[:, 0] <= w - 0.5) \
            & (pt[:, 1] >= -0.5) & (pt[:, 1] <= h - 0.5)
        src.append(px[ok])
        tgt.append(pt[ok])
    ps = np.concatenate(src)[:n]
    pt = np.concatenate(tgt)[:n]
    ps = ps + rng.normal(scale=noise_px, size=ps.shape)
    pt = pt + rng.normal(scale=noise_px, size=pt.shape)
    outlier = rng.random(n) < outlier_ratio
    pt[outlier] = np.stack([rng.uniform(-0.5, w - 0.5, outlier.sum()),
                            rng.uniform(-0.5, h - 0.5, outlier.sum())], axis=1)
    norm = np.linalg.norm(t)
    return SyntheticScene(ps, pt, K, R, t / norm if norm > 0 else t, outlier, (w, h))
