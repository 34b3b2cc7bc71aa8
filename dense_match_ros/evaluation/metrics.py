"""Accuracy measures for dense flow, matchability and relative pose.

Every function takes plain numpy arrays, so the evaluation CLI, the benchmarks, the
training loop's validation and the tests share one definition of each number.

Flow metrics are computed on a boolean ``valid`` mask (pixels with ground truth); an
empty mask gives NaN rather than a misleading 0 or 1.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

PCK_THRESHOLDS: tuple[float, ...] = (1.0, 3.0, 5.0, 10.0)
"""End-point-error thresholds (pixels) reported as pck@T by :func:`flow_metrics`."""


# --------------------------------------------------------------------------- pose


def rotation_error_deg(R_est: np.ndarray, R_gt: np.ndarray) -> float:
    """Geodesic angle in degrees (0..180) of the rotation taking R_est to R_gt.

    The trace formula is clipped because rounding pushes (tr - 1) / 2 slightly outside
    [-1, 1] for near-identical rotations, which would make arccos return NaN.
    """
    R_est = np.asarray(R_est, dtype=np.float64).reshape(3, 3)
    R_gt = np.asarray(R_gt, dtype=np.float64).reshape(3, 3)
    cos = (np.trace(R_est.T @ R_gt) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def translation_direction_error_deg(t_est: np.ndarray, t_gt: np.ndarray) -> float:
    """Angle in degrees (0..180) between two translation directions.

    An essential matrix fixes translation only up to scale, so only the direction is
    compared. The sign is *not* folded (no ``min(e, 180 - e)``): the pose estimator
    resolves it through cheirality, and a flipped baseline is a real error.
    NaN when either vector is (numerically) zero, where no direction exists.
    """
    t_est = np.asarray(t_est, dtype=np.float64).reshape(3)
    t_gt = np.asarray(t_gt, dtype=np.float64).reshape(3)
    n_est, n_gt = np.linalg.norm(t_est), np.linalg.norm(t_gt)
    if n_est < 1e-12 or n_gt < 1e-12:
        return float('nan')
    cos = float(np.dot(t_est, t_gt) / (n_est * n_gt))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def pose_error_deg(rotation_error: float | None, translation_error: float | None) -> float:
    """The single per-pair error that pose AUC ranks: max(rotation, translation) error.

    A missing or non-finite component (failed estimate) makes the pair a failure: inf.
    """
    parts = [rotation_error, translation_error]
    if any(p is None or not np.isfinite(p) for p in parts):
        return float('inf')
    return float(max(parts))


def pose_auc(errors_deg: Iterable[float | None],
             thresholds: Sequence[float] = (5, 10, 20)) -> dict[str, float]:
    """Area under the cumulative pose-error curve up to each threshold, over the threshold.

    Follows the definition used by SuperGlue (Sarlin et al. 2020): sort the per-pair
    errors (each max(rotation, translation) error, see :func:`pose_error_deg`); the
    recall curve goes linearly from (0, 0) through (e_i, i / N) and stays flat after
    the last error below the threshold; its integral over [0, T] is divided by T, so a
    method with every error 0 scores 1. Failures (None / NaN / inf) count as infinite
    error: they stay in N and never add recall.

    Returns ``{'auc@5': ..., 'auc@10': ..., 'auc@20': ...}`` (keys follow the thresholds;
    NaN for every threshold when there are no pairs).
    """
    errs = np.array([np.inf if e is None or not np.isfinite(e) else float(e)
                     for e in errors_deg], dtype=np.float64)
    out: dict[str, float] = {}
    n = errs.size
    for t in thresholds:
        key = f'auc@{t:g}'
        if n == 0:
            out[key] = float('nan')
            continue
        errs_sorted = np.sort(errs)
        below = errs_sorted[errs_sorted < t]
        # Curve points: origin, one per pair below T, then flat to T.
        xs = np.concatenate([[0.0], below, [float(t)]])
        recall = np.arange(below.size + 1, dtype=np.float64) / n
        ys = np.concatenate([recall, recall[-1:]])
        area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
        out[key] = area / float(t)
    return out


# --------------------------------------------------------------------------- flow


def end_point_error(flow: np.ndarray, gt_flow: np.ndarray) -> np.ndarray:
    """HxW Euclidean distance between estimated and true flow vectors (pixels)."""
    flow = np.asarray(flow, dtype=np.float64)
    gt_flow = np.asarray(gt_flow, dtype=np.float64)
    if flow.shape != gt_flow.shape or flow.shape[-1] != 2:
        raise ValueError(f'flow {flow.shape} and ground truth {gt_flow.shape} differ')
    return np.linalg.norm(flow - gt_flow, axis=-1)


def _valid_epe(flow: np.ndarray, gt_flow: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """EPE at valid pixels; a non-finite estimate is an infinite error, not a skipped pixel."""
    epe = end_point_error(flow, gt_flow)
    mask = np.ones(epe.shape, bool) if valid is None else np.asarray(valid, bool)
    if mask.shape != epe.shape:
        raise ValueError(f'valid mask {mask.shape} does not match flow {epe.shape}')
    mask = mask & np.all(np.isfinite(gt_flow), axis=-1)
    epe = epe[mask]
    return np.where(np.isfinite(epe), epe, np.inf)


def aepe(flow: np.ndarray, gt_flow: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Average end-point error over valid pixels (NaN when none are valid)."""
    epe = _valid_epe(flow, gt_flow, valid)
    return float(epe.mean()) if epe.size else float('nan')


def pck(flow: np.ndarray, gt_flow: np.ndarray, valid: np.ndarray | None = None,
        threshold: float = 1.0) -> float:
    """Percentage of correct keypoints at ``threshold`` px, as a fraction in [0, 1].

    A valid pixel counts as correct when its end-point error is strictly below the
    threshold.
    """
    epe = _valid_epe(flow, gt_flow, valid)
    return float(np.mean(epe < threshold)) if epe.size else float('nan')


def pck_curve(flow: np.ndarray, gt_flow: np.ndarray, valid: np.ndarray | None,
              thresholds: Sequence[float]) -> np.ndarray:
    """PCK at each threshold (one EPE computation for the whole curve, for plots)."""
    epe = _valid_epe(flow, gt_flow, valid)
    if not epe.size:
        return np.full(len(thresholds), np.nan)
    return np.array([np.mean(epe < t) for t in thresholds], dtype=np.float64)


def accuracy_at(flow: np.ndarray, gt_flow: np.ndarray, valid: np.ndarray | None = None,
                threshold: float = 10.0) -> float:
    """DeepMatching's accuracy@T (Revaud et al., IJCV 2016).

    They define it as the proportion of pixels of the first image (among those with a
    ground-truth match) whose estimated match in the second image lies closer than T
    pixels to the true one; a quasi-dense method is first densified, every pixel
    taking the correspondence of its nearest match, so every pixel is judged. A dense
    flow field already assigns one match to every pixel, so on flow accuracy@T is the
    fraction of valid pixels with EPE < T, i.e. the same number as ``pck@T``; it is
    reported under its own name (``acc@10``) so that tables line up with that
    literature. Matchability plays no part: low-confidence pixels are still judged.
    """
    return pck(flow, gt_flow, valid, threshold)


def kitti_outlier_rate(flow: np.ndarray, gt_flow: np.ndarray,
                       valid: np.ndarray | None = None, abs_px: float = 3.0,
                       rel: float = 0.05) -> float:
    """KITTI 2015 'Fl': fraction of valid pixels with EPE > 3 px AND EPE > 5 % of |gt|.

    The relative clause keeps large, roughly right motions from counting as outliers.
    """
    epe = end_point_error(flow, gt_flow)
    mag = np.linalg.norm(np.asarray(gt_flow, dtype=np.float64), axis=-1)
    mask = np.ones(epe.shape, bool) if valid is None else np.asarray(valid, bool)
    mask = mask & np.isfinite(mag)
    if not mask.any():
        return float('nan')
    e = np.where(np.isfinite(epe[mask]), epe[mask], np.inf)
    outlier = (e > abs_px) & (e > rel * mag[mask])
    return float(np.mean(outlier))


def matchability_jaccard(matchability: np.ndarray, matchable: np.ndarray,
                         threshold: float = 0.5) -> float:
    """Intersection over union of (matchability > threshold) and the true matchable mask.

    Over the whole image, since predicting a pixel matchable that is not (occluded, out
    of view) is exactly the error this measures. Both sets empty counts as perfect (1).
    """
    pred = np.asarray(matchability, dtype=np.float64) > threshold
    truth = np.asarray(matchable, bool)
    if pred.shape != truth.shape:
        raise ValueError(f'matchability {pred.shape} and mask {truth.shape} differ')
    union = np.count_nonzero(pred | truth)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(pred & truth) / union)


RELIABILITY_BINS = 10
CORRECT_PX = 1.0
"""A match counts as right for the reliability diagram when its end-point error is below this."""


def reliability_counts(matchability: np.ndarray, correct: np.ndarray,
                       bins: int = RELIABILITY_BINS) -> dict[str, list[float]]:
    """Per matchability bin ([0, 1] in ``bins`` equal steps): pixel count, matchability sum
    and count of right matches. Counts, not fractions, so pairs and sets add up."""
    m = np.clip(np.asarray(matchability, np.float64).ravel(), 0.0, 1.0)
    ok = np.asarray(correct, bool).ravel()
    index = np.minimum((m * bins).astype(np.int64), bins - 1)
    return {'count': np.bincount(index, minlength=bins).astype(float).tolist(),
            'sum_matchability': np.bincount(index, weights=m, minlength=bins).tolist(),
            'correct': np.bincount(index, weights=ok.astype(float), minlength=bins).tolist()}


def merge_reliability(parts: Iterable[dict]) -> dict[str, list[float]]:
    parts = list(parts)
    return {k: np.sum([p[k] for p in parts], axis=0).tolist() for k in parts[0]} if parts else {}


def calibration_error(counts: dict) -> float | None:
    """Expected calibration error: the pixel-weighted mean |mean matchability - fraction right|
    over bins (0 = a matchability of p means a right match with probability p)."""
    n = np.asarray(counts.get('count', []), np.float64)
    if n.sum() == 0:
        return None
    used = n > 0
    conf = np.asarray(counts['sum_matchability'])[used] / n[used]
    acc = np.asarray(counts['correct'])[used] / n[used]
    return float(np.sum(n[used] * np.abs(conf - acc)) / n.sum())


def flow_metrics(flow: np.ndarray, gt_flow: np.ndarray, valid: np.ndarray | None = None,
                 matchability: np.ndarray | None = None,
                 matchable: np.ndarray | None = None,
                 matchability_threshold: float = 0.5,
                 pck_thresholds: Sequence[float] = PCK_THRESHOLDS) -> dict[str, float]:
    """All flow numbers for one pair, as a flat dict of floats (JSON-ready).

    Keys: ``aepe``, ``pck@1`` ``pck@3`` ``pck@5`` ``pck@10`` (by ``pck_thresholds``),
    ``acc@10``, ``fl`` (KITTI outlier fraction), ``n_valid``, and ``jaccard`` when
    matchability is given. ``matchable`` is the ground truth for the Jaccard index
    (default: ``valid``); for Sintel pass valid & ~occluded, since an occluded pixel has
    ground-truth flow but no visible match.
    """
    epe = _valid_epe(flow, gt_flow, valid)
    out: dict[str, float] = {}
    out['aepe'] = float(epe.mean()) if epe.size else float('nan')
    for t in pck_thresholds:
        out[f'pck@{t:g}'] = float(np.mean(epe < t)) if epe.size else float('nan')
    out['acc@10'] = float(np.mean(epe < 10.0)) if epe.size else float('nan')
    out['fl'] = kitti_outlier_rate(flow, gt_flow, valid)
    out['n_valid'] = float(epe.size)
    if matchability is not None:
        truth = (np.ones(np.shape(matchability), bool) if valid is None and matchable is None
                 else np.asarray(matchable if matchable is not None else valid, bool))
        out['jaccard'] = matchability_jaccard(matchability, truth, matchability_threshold)
    return out
