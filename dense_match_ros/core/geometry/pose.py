"""Relative camera pose from dense correspondences: selection, robust essential matrix,
cheirality, polish, covariance and a validity verdict.

Direction and units, everywhere in this module:

* The result is ``T_target_source``: a point expressed in the SOURCE camera's optical frame
  (x right, y down, z forward) maps to the TARGET camera's frame as
  ``X_target = R @ X_source + t``.
* ``t`` is a unit vector: two views fix the translation direction only, never its length.
* Pixels follow :mod:`dense_match_ros.core.geometry.grid` (pixel centres at integers); the flow is on
  the source grid and source (x, y) corresponds to target (x + u, y + v).
* ``E = [t]_x R`` in calibrated coordinates, so ``x_target^T E x_source = 0``.
* The covariance is 6x6 over (tx, ty, tz, rx, ry, rz): the unit translation, then a rotation
  vector in radians about the target frame axes (``R' = exp([r]_x) R``); see
  :func:`dense_match_ros.core.geometry.essential.refine_pose` for how it is obtained.

Flow is dense, so thousands of nearly redundant matches are available; the selection
keeps the confident ones, spreads them over the image (a cluster of matches pins the pose
down far worse than the same number spread out) and caps their number so that the cost of
the robust search stays bounded whatever the image size.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from dense_match_ros.core.geometry import essential, essential_ransac

# The strings of msg/RelativePose.msg (STATUS_*), so the node can copy them verbatim.
STATUS_OK = 'ok'
STATUS_TOO_FEW_CORRESPONDENCES = 'too_few_correspondences'
STATUS_TOO_FEW_INLIERS = 'too_few_inliers'
STATUS_DEGENERATE_MOTION = 'degenerate_motion'
STATUS_DEGENERATE_SPREAD = 'degenerate_spread'
STATUS_NO_CAMERA_INFO = 'no_camera_info'
STATUS_ESTIMATION_FAILED = 'estimation_failed'

# From dense-match-bench-pose: the most accurate on synthetic scenes (largest translation
# error over 20 seeds 0.41 deg, the others 0.42-0.66) and on the Middlebury rings with dis
# flow (AUC@20 0.77 against 0.58-0.69, every pair valid), at about the cost of OpenCV's
# MAGSAC++ and under a third of OpenCV RANSAC's. See the project README for the tables.
DEFAULT_ESTIMATOR = 'poselib'
# Correspondences within this many thresholds of E take part in the robust polish.
REFINE_BAND = 3.0
# Scale of the polish's Cauchy loss, in thresholds: a threshold is usually set near the
# noise level, and a loss that tight would down-weight good matches.
REFINE_LOSS = 2.0


@dataclasses.dataclass
class PoseConfig:
    """Parameters of the pose pipeline (the ROS node exposes each one as a parameter).

    The default estimator and thresholds were chosen from ``dense-match-bench-pose`` runs:
    see that module for the measurements.
    """

    estimator: str = DEFAULT_ESTIMATOR
    """One of :meth:`estimators`."""
    matchability_threshold: float = 0.9
    """Flow pixels with a lower matchability are never used. Strict, because a dense flow
    offers far more candidates than the estimator needs and the ones it should see are the
    surely right ones: on the Middlebury rings (``dense-match-eval --sets middlebury
    --pose-option matchability_threshold=T``) AUC@10 rose from 0.5 to 0.9 for ``dis``
    0.620 -> 0.682 and for ``neuflow`` 0.581 -> 0.691, with TUM AUC@20 within 0.005."""
    max_correspondences: int = 2000
    """Cap on the correspondences given to the estimator (the RANSAC cost grows with it)."""
    spread_grid: tuple[int, int] = (16, 12)
    """(columns, rows) of the cells the selection draws from in turn, to spread matches."""
    ransac_threshold_px: float = 1.0
    """Inlier threshold on the Sampson distance, in pixels (mean focal length of the two)."""
    confidence: float = 0.9999
    """Probability that the robust search has drawn one outlier-free sample."""
    max_iterations: int = 10000
    """Upper bound on RANSAC iterations (dgc-5x1000 ignores it: 5 x 1000 by definition)."""
    min_correspondences: int = 30
    """Fewer selected correspondences: 'too_few_correspondences', nothing is estimated."""
    min_inliers: int = 30
    """Fewer inliers: 'too_few_inliers'."""
    min_parallax_deg: float = 0.5
    """Median rotation-compensated angle between matched rays below this: the translation
    is unobservable (pure rotation or tiny baseline) -> 'degenerate_motion'."""
    min_spread: float = 0.04
    """Standard deviation of the inliers' source pixels along their narrowest axis, as a
    fraction of the image's shorter side, below this -> 'degenerate_spread' (matches spread
    uniformly over the image score about 0.29)."""
    rank_by_matchability: bool = False
    """Within each spread cell take the most matchable pixels first instead of random ones.
    Pays where matchability is calibrated (a probability of being right, e.g. ``neuflow``'s):
    the estimator then sees the likeliest-right matches of every region."""
    refine: bool = True
    """Polish (R, t) on the inliers by Gauss-Newton on the Sampson error."""
    device: str = 'auto'
    """Device of the torch ('kornia') estimator."""

    @staticmethod
    def estimators() -> list[str]:
        """Names accepted by :attr:`estimator`."""
        return list(essential_ransac.ESTIMATORS)

    def __post_init__(self) -> None:
        if self.estimator not in essential_ransac.ESTIMATORS:
            raise ValueError(f'unknown pose estimator {self.estimator!r}; '
                             f'available: {", ".join(self.estimators())}')
        self.spread_grid = (int(self.spread_grid[0]), int(self.spread_grid[1]))
        if min(self.spread_grid) < 1 or self.max_correspondences < 5:
            raise ValueError('spread_grid cells and max_correspondences (>= 5) must be positive')
        if self.ransac_threshold_px <= 0 or not 0 < self.confidence < 1:
            raise ValueError('ransac_threshold_px must be > 0 and confidence in (0, 1)')


def config_fields() -> dict[str, Any]:
    """Name -> default of every :class:`PoseConfig` field (the node's ``pose.*`` parameters)."""
    out = {}
    for field in dataclasses.fields(PoseConfig):
        if field.default is not dataclasses.MISSING:
            out[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[field.name] = field.default_factory()  # type: ignore[misc]
    return out


def config_from_dict(options: dict) -> PoseConfig:
    """:class:`PoseConfig` from a dict; unknown keys raise ValueError (typos in YAML)."""
    unknown = sorted(set(options) - set(config_fields()))
    if unknown:
        raise ValueError(f'unknown pose options {unknown}; known: {sorted(config_fields())}')
    return PoseConfig(**options)


@dataclasses.dataclass
class PoseEstimate:
    """Relative pose T_target_source: X_target = R @ X_source + t, t a unit vector.

    When ``valid`` is false, R, t and E hold whatever was estimated before the check that
    failed (identity / zero when nothing was), for diagnosis only.
    """

    R: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    t: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))
    E: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((3, 3)))
    """x_target^T E x_source = 0 in calibrated coordinates; E = [t]_x R."""
    inlier_mask: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, bool))
    """Over points_source / points_target: Sampson distance below the threshold."""
    points_source: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2)))
    points_target: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2)))
    """Nx2 pixel coordinates of the correspondences used (each in its own image)."""
    covariance: np.ndarray = dataclasses.field(default_factory=lambda: np.full((6, 6), np.nan))
    """6x6 over (tx, ty, tz, rx, ry, rz); rotation vector in rad about target axes."""
    valid: bool = False
    status: str = STATUS_ESTIMATION_FAILED
    num_correspondences: int = 0
    num_inliers: int = 0
    time_s: float = 0.0
    median_parallax_deg: float = float('nan')
    """Median rotation-compensated ray angle over the inliers (what min_parallax_deg tests)."""
    spread: float = float('nan')
    """Inlier spread along the narrow axis, fraction of the shorter image side (what
    min_spread tests)."""


def _valid_intrinsics(K) -> bool:
    if K is None:
        return False
    K = np.asarray(K, dtype=np.float64)
    return (K.shape == (3, 3) and bool(np.all(np.isfinite(K))) and K[0, 0] > 0 and K[1, 1] > 0
            and abs(K[2, 2] - 1.0) < 1e-9)


def spread_sample(points: np.ndarray, count: int, cells: tuple[int, int],
                  bounds: tuple[float, float, float, float], rng: np.random.Generator,
                  priority: np.ndarray | None = None) -> np.ndarray:
    """Indices of at most ``count`` points, drawn in turn from the cells of a grid.

    Every occupied cell gives its first point, then every cell its second, and so on, so
    that sparse regions are not drowned by dense ones and the cap is still filled when some
    cells are empty. Within a cell the order is random, or by decreasing ``priority``
    (ties random) when given. ``bounds`` = (x0, y0, x1, y1) of the grid.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = len(points)
    if n <= count:
        return np.arange(n)
    cols, rows = cells
    x0, y0, x1, y1 = bounds
    cx = np.clip(((points[:, 0] - x0) / max(x1 - x0, 1e-12) * cols).astype(int), 0, cols - 1)
    cy = np.clip(((points[:, 1] - y0) / max(y1 - y0, 1e-12) * rows).astype(int), 0, rows - 1)
    cell = cy * cols + cx
    order = rng.permutation(n)
    if priority is not None:
        order = order[np.argsort(-np.asarray(priority, np.float64)[order], kind='stable')]
    cell_sorted = order[np.argsort(cell[order], kind='stable')]
    sorted_cells = cell[cell_sorted]
    first = np.searchsorted(sorted_cells, sorted_cells, side='left')
    rank = np.arange(n) - first
    # Ties in rank broken randomly, so the last partial round does not favour low cells.
    pick = np.lexsort((rng.random(n), rank))[:count]
    return np.sort(cell_sorted[pick])


def select_correspondences(flow: np.ndarray, matchability: np.ndarray,
                           config: PoseConfig, rng: np.random.Generator
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(points_source, points_target) Nx2 pixels from a dense flow: confident, spread, capped."""
    flow = np.asarray(flow, dtype=np.float32)
    h, w = flow.shape[:2]
    # Neighbouring pixels of a dense flow carry nearly the same information: thin the grid
    # to a lattice of ~16 candidates per correspondence kept (random phase) before the spread
    # sampling, whose sort would otherwise dominate the cost (160 ms at 640x480); only the
    # lattice's coordinates are ever made.
    stride = max(1, int(np.sqrt(h * w / (16.0 * max(1, config.max_correspondences)))))
    oy = ox = 0
    if stride > 1:
        oy, ox = (int(v) for v in rng.integers(0, stride, size=2))
    xs = np.arange(ox, w, stride, dtype=np.float32)
    ys = np.arange(oy, h, stride, dtype=np.float32)
    source = np.stack(np.meshgrid(xs, ys), axis=-1)
    target_map = source + flow[oy::stride, ox::stride]
    conf = np.asarray(matchability, dtype=np.float32)[oy::stride, ox::stride]
    target_map, source, conf = target_map.reshape(-1, 2), source.reshape(-1, 2), conf.reshape(-1)
    ok = np.isfinite(target_map).all(axis=1) & (conf >= config.matchability_threshold)
    idx = np.flatnonzero(ok)
    keep = spread_sample(source[idx], config.max_correspondences, config.spread_grid,
                         (-0.5, -0.5, w - 0.5, h - 0.5), rng,
                         priority=conf[idx] if config.rank_by_matchability else None)
    idx = idx[keep]
    return source[idx].astype(np.float64), target_map[idx].astype(np.float64)


def _spread(points: np.ndarray, shorter_side: float) -> float:
    """Pixel standard deviation along the narrowest axis, over the image's shorter side."""
    if len(points) < 3:
        return 0.0
    eigenvalues = np.linalg.eigvalsh(np.cov(points[:, :2].T))
    return float(np.sqrt(max(eigenvalues[0], 0.0)) / shorter_side)


def estimate_from_correspondences(points_source: np.ndarray, points_target: np.ndarray,
                                  K_source: np.ndarray, K_target: np.ndarray, *,
                                  dist_source: np.ndarray | None = None,
                                  dist_target: np.ndarray | None = None,
                                  config: PoseConfig | None = None,
                                  rng: np.random.Generator | int | None = None,
                                  image_size: tuple[int, int] | None = None) -> PoseEstimate:
    """Relative pose T_target_source from Nx2 pixel correspondences of two cameras.

    ``image_size`` (width, height) of the source image scales the spread check; when it
    is not given it is taken as twice the principal point.

    More than ``config.max_correspondences`` points are thinned by :func:`spread_sample`
    over their bounding box. ``rng`` (a Generator or a seed; None means seed 0, so
    repeated calls agree) drives every random choice.
    """
    start = time.perf_counter()
    config = config or PoseConfig()
    rng = np.random.default_rng(0 if rng is None else rng)
    ps = np.asarray(points_source, dtype=np.float64).reshape(-1, 2)
    pt = np.asarray(points_target, dtype=np.float64).reshape(-1, 2)
    if ps.shape != pt.shape:
        raise ValueError(f'points_source {ps.shape} and points_target {pt.shape} differ')
    result = PoseEstimate(points_source=ps, points_target=pt,
                          inlier_mask=np.zeros(len(ps), bool), num_correspondences=len(ps))

    def finish(status: str, detail: str = '') -> PoseEstimate:
        result.status = status + (f': {detail}' if detail else '')
        result.valid = status == STATUS_OK
        result.time_s = time.perf_counter() - start
        return result

    if not (_valid_intrinsics(K_source) and _valid_intrinsics(K_target)):
        return finish(STATUS_NO_CAMERA_INFO, 'K must be a finite 3x3 with positive focals')
    finite = np.isfinite(ps).all(axis=1) & np.isfinite(pt).all(axis=1)
    ps, pt = ps[finite], pt[finite]
    if len(ps) > config.max_correspondences:
        keep = spread_sample(ps, config.max_correspondences, config.spread_grid,
                             (*ps.min(axis=0), *(ps.max(axis=0) + 1e-9)), rng)
        ps, pt = ps[keep], pt[keep]
    result.points_source, result.points_target = ps, pt
    result.num_correspondences = len(ps)
    result.inlier_mask = np.zeros(len(ps), bool)
    if len(ps) < max(config.min_correspondences, 5):
        return finish(STATUS_TOO_FEW_CORRESPONDENCES,
                      f'{len(ps)} < {max(config.min_correspondences, 5)}')

    K_source = np.asarray(K_source, dtype=np.float64)
    K_target = np.asarray(K_target, dtype=np.float64)
    x1 = essential.normalize_points(ps, K_source, dist_source)
    x2 = essential.normalize_points(pt, K_target, dist_target)
    # One focal length converts pixel thresholds and residuals to calibrated units.
    focal = float(np.mean([K_source[0, 0], K_source[1, 1], K_target[0, 0], K_target[1, 1]]))
    threshold = config.ransac_threshold_px / focal
    settings = essential_ransac.RobustSettings(threshold=threshold, confidence=config.confidence,
                                               max_iterations=config.max_iterations,
                                               device=config.device)
    try:
        E = essential_ransac.run(config.estimator, x1, x2, settings, rng)
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as error:  # solver breakdowns
        return finish(STATUS_ESTIMATION_FAILED, f'{config.estimator}: {error}')
    if E is None:
        return finish(STATUS_ESTIMATION_FAILED, f'{config.estimator} returned no model')

    mask = np.abs(essential.sampson_error(E, x1, x2)) < threshold
    if mask.sum() < 5:
        result.inlier_mask, result.num_inliers = mask, int(mask.sum())
        return finish(STATUS_TOO_FEW_INLIERS, f'{int(mask.sum())} < {config.min_inliers}')
    R, t, _ = essential.choose_pose(E, x1[mask], x2[mask])
    # The polish sees a wider band than the inliers, with a robust loss of the threshold's
    # scale: with pixel noise near the threshold a hard cut keeps only part of the good
    # matches. The covariance comes from the same fit.
    wide = np.abs(essential.sampson_error(E, x1, x2)) < REFINE_BAND * threshold
    # Also leave out matches that this pose puts behind a camera although their rays
    # diverge clearly enough for the depth sign to mean something: such matches lie near
    # an epipolar line by chance (outliers), and near the epipole they weigh heavily.
    d_source, d_target = essential.triangulate_depths(R, t, x1, x2)
    behind = ~((d_source > 0) & (d_target > 0))
    clear = essential.rotation_compensated_parallax(R, x1, x2) > REFINE_BAND * threshold
    wide &= ~(behind & clear)
    R, t, covariance = essential.refine_pose(R, t, x1[wide], x2[wide], scale=focal,
                                             iterations=10 if config.refine else 0,
                                             loss_scale=REFINE_LOSS * config.ransac_threshold_px)
    E = essential.essential_from_pose(R, t)
    mask = np.abs(essential.sampson_error(E, x1, x2)) < threshold
    result.R, result.t, result.E, result.covariance = R, t, E, covariance
    result.inlier_mask, result.num_inliers = mask, int(mask.sum())
    if result.num_inliers < config.min_inliers:
        return finish(STATUS_TOO_FEW_INLIERS, f'{result.num_inliers} < {config.min_inliers}')
    if image_size is None:  # the principal point is near the image centre
        image_size = (2.0 * K_source[0, 2] + 1.0, 2.0 * K_source[1, 2] + 1.0)
    result.spread = _spread(ps[mask], float(min(image_size)))
    if result.spread < config.min_spread:
        return finish(STATUS_DEGENERATE_SPREAD,
                      f'inlier spread {result.spread:.3f} < {config.min_spread}')
    parallax = essential.rotation_compensated_parallax(R, x1[mask], x2[mask])
    result.median_parallax_deg = float(np.degrees(np.median(parallax)))
    if result.median_parallax_deg < config.min_parallax_deg:
        return finish(STATUS_DEGENERATE_MOTION,
                      f'median parallax {result.median_parallax_deg:.3f} deg '
                      f'< {config.min_parallax_deg}')
    return finish(STATUS_OK)


def estimate_relative_pose(flow: np.ndarray, matchability: np.ndarray, K_source: np.ndarray,
                           K_target: np.ndarray, *, dist_source: np.ndarray | None = None,
                           dist_target: np.ndarray | None = None,
                           config: PoseConfig | None = None,
                           rng: np.random.Generator | int | None = None) -> PoseEstimate:
    """Relative pose T_target_source (X_target = R X_source + t, unit t) from a dense flow.

    ``flow`` float32 HxWx2 on the source grid in pixels, ``matchability`` HxW in [0, 1];
    ``K_source`` / ``K_target`` are the intrinsics of the images at the resolution the flow
    refers to; ``dist_*`` OpenCV distortion coefficients (the correspondences are
    undistorted when they are non-zero).
    """
    start = time.perf_counter()
    config = config or PoseConfig()
    rng = np.random.default_rng(0 if rng is None else rng)
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2 or np.shape(matchability) != flow.shape[:2]:
        raise ValueError(f'flow must be HxWx2 and matchability HxW, got {flow.shape} and '
                         f'{np.shape(matchability)}')
    if not (_valid_intrinsics(K_source) and _valid_intrinsics(K_target)):
        result = PoseEstimate(status=f'{STATUS_NO_CAMERA_INFO}: K must be a finite 3x3 '
                                     'with positive focals')
        result.time_s = time.perf_counter() - start
        return result
    ps, pt = select_correspondences(flow, matchability, config, rng)
    result = estimate_from_correspondences(ps, pt, K_source, K_target, dist_source=dist_source,
                                           dist_target=dist_target, config=config, rng=rng,
                                           image_size=(flow.shape[1], flow.shape[0]))
    result.time_s = time.perf_counter() - start
    return result
