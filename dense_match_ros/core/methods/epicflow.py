"""EpicFlow densification: sparse matches -> dense flow by edge-aware interpolation.

Shared by the sparse-then-dense methods (``hilm``, ``deepmatching``): OpenCV's
``ximgproc`` EdgeAwareInterpolator fits each pixel from its K geodesic neighbours among the
matches (locally-weighted affine fits), so the flow follows image edges between matches.
"""
from __future__ import annotations

import cv2
import numpy as np

from dense_match_ros.core.geometry import grid

MAX_MATCHES = 30000
"""The interpolator indexes matches with 16-bit integers."""
EPIC_K = 128
"""Its default neighbour count."""
MIN_EPIC_MATCHES = 16


class EpicInterpolator:
    """Edge-aware interpolation with fallbacks for too few matches or non-finite output."""

    def __init__(self, postprocess: bool = False) -> None:
        self._interp = cv2.ximgproc.createEdgeAwareInterpolator()
        # EpicFlow's fast-global-smoother pass is off by default: smoothing with one-sided
        # support at the image edges bends smooth (e.g. zoom) flows there by pixels.
        self._interp.setUsePostProcessing(bool(postprocess))

    def densify(self, img_a: np.ndarray, pts_a: np.ndarray, img_b: np.ndarray,
                pts_b: np.ndarray) -> np.ndarray:
        """Dense flow on ``img_a``'s grid from matches ``pts_a`` -> ``pts_b`` (pixels).

        With fewer matches than K the interpolator can crash or return NaN, so K is capped
        by the match count, very few matches use nearest-match interpolation instead, and
        any non-finite output pixel is filled from the nearest match.
        """
        h, w = img_a.shape[:2]
        if len(pts_a) == 0:
            return np.zeros((h, w, 2), np.float32)
        pts_a = np.ascontiguousarray(pts_a, dtype=np.float32)
        pts_b = np.ascontiguousarray(pts_b, dtype=np.float32)
        flow = None
        if len(pts_a) >= MIN_EPIC_MATCHES:
            self._interp.setK(int(min(EPIC_K, len(pts_a) - 1)))
            flow = np.asarray(self._interp.interpolate(img_a, pts_a.reshape(-1, 1, 2), img_b,
                                                       pts_b.reshape(-1, 1, 2)),
                              dtype=np.float32).reshape(h, w, 2)
            if np.isfinite(flow).all():
                return flow
        nearest = nearest_match_flow(pts_a, pts_b, (h, w))
        if flow is None:
            return nearest
        bad = ~np.isfinite(flow).all(axis=-1)
        flow[bad] = nearest[bad]
        return flow


def nearest_match_flow(pts_a: np.ndarray, pts_b: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Every pixel takes the displacement of its nearest match (DeepMatching's own way of
    judging quasi-dense matches, and the fallback of :class:`EpicInterpolator`)."""
    from scipy.spatial import cKDTree
    h, w = shape
    if len(pts_a) == 0:
        return np.zeros((h, w, 2), np.float32)
    _, idx = cKDTree(pts_a).query(grid.pixel_coords(h, w).reshape(-1, 2))
    return (np.asarray(pts_b) - np.asarray(pts_a))[idx].reshape(h, w, 2).astype(np.float32)


def neighbour_consistent(pts_a: np.ndarray, pts_b: np.ndarray, limit_px: float,
                         neighbours: int = 8) -> np.ndarray:
    """bool (N,): matches whose displacement lies within ``limit_px`` of the median
    displacement of their ``neighbours`` nearest matches (in ``pts_a``).

    Why: the interpolator fits each pixel from its nearest matches, so one wrong match
    bends the flow of a whole patch around it; a match that disagrees with every neighbour
    is far more often wrong than the only right one among wrong neighbours. ``limit_px`` <= 0
    keeps everything.
    """
    n = len(pts_a)
    if limit_px <= 0 or n <= neighbours:
        return np.ones(n, bool)
    from scipy.spatial import cKDTree
    pts_a = np.asarray(pts_a, np.float32)
    moves = np.asarray(pts_b, np.float32) - pts_a
    _, idx = cKDTree(pts_a).query(pts_a, k=neighbours + 1)
    median = np.median(moves[idx[:, 1:]], axis=1)
    return np.linalg.norm(moves - median, axis=1) < float(limit_px)
