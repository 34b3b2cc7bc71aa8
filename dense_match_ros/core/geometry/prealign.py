"""Global pre-alignment: a homography from sparse SIFT matches, so that a dense matcher only
has to find what is left.

Why: a CNN trained on a 2-core CPU is not rotation or zoom invariant (the HPatches pair
turned by 30 degrees costs ``neuflow`` 7x its error), while SIFT is, by construction. When
the sparse matches agree on a homography that is more than a shift (rotation, zoom,
perspective), the target is warped onto the source's grid by it, the dense matcher runs on
that nearly aligned pair, and its flow is composed with the homography. Where the matches
do not agree (non-rigid scenes, too little texture) or the homography is nearly a shift,
nothing changes: the dense matcher already handles translation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from dense_match_ros.core.geometry import grid


@dataclass(frozen=True)
class PrealignConfig:
    """When to trust and when to use a sparse homography.

    ``min_departure``: how far (fraction of the source diagonal) the homography must move
    some image corner beyond the shift of the image centre before it is used; below it
    the dense matcher is left alone. ``min_inliers`` and ``min_inlier_ratio`` are the
    evidence that one homography explains the scene. SIFT runs on images brought to
    longest side ``max_side``.
    """

    max_side: int = 480
    ratio: float = 0.8
    ransac_px: float = 3.0
    min_inliers: int = 40
    min_inlier_ratio: float = 0.5
    min_departure: float = 0.05


def _grey(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Grey image at the working size for ``max_side`` (:func:`grid.working_size`, never
    enlarged) and its scale factor."""
    h, w = image.shape[:2]
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    size = grid.working_size((w, h), max_side)
    if size != (w, h):
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    return grey, min(1.0, max_side / max(h, w))


def estimate_homography(source: np.ndarray, target: np.ndarray,
                        config: PrealignConfig = PrealignConfig()) -> np.ndarray | None:
    """The homography (3x3, source pixels -> target pixels) that SIFT matches with Lowe's
    ratio test and MAGSAC++ agree on, or None when the evidence is short of ``config``."""
    sift = cv2.SIFT_create()
    keypoints, descriptors, scales = [], [], []
    for image in (source, target):
        grey, scale = _grey(image, config.max_side)
        kp, desc = sift.detectAndCompute(grey, None)
        if desc is None or len(kp) < config.min_inliers:
            return None
        keypoints.append(kp)
        descriptors.append(desc)
        scales.append(scale)
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(descriptors[0], descriptors[1], k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < config.ratio * p[1].distance]
    if len(good) < config.min_inliers:
        return None
    src = np.float32([keypoints[0][m.queryIdx].pt for m in good]) / scales[0]
    dst = np.float32([keypoints[1][m.trainIdx].pt for m in good]) / scales[1]
    # Keypoint positions are at the SIFT scale; the RANSAC tolerance is in full pixels.
    tolerance = config.ransac_px / min(scales)
    homography, inliers = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, tolerance)
    if homography is None or inliers is None:
        return None
    count = int(inliers.sum())
    if count < config.min_inliers or count < config.min_inlier_ratio * len(good):
        return None
    return homography.astype(np.float64)


def departure_from_shift(homography: np.ndarray, size: tuple[int, int]) -> float:
    """How far the homography moves the source's corners beyond the shift it gives the
    centre, as a fraction of the source diagonal (``size`` = (W, H)): 0 for a translation,
    about 0.26 for a 30 degree rotation, 0.15-0.2 for a 0.7x or 1.4x zoom."""
    w, h = size
    corners = np.float64([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])
    centre = np.float64([[(w - 1) / 2, (h - 1) / 2]])
    mapped = cv2.perspectiveTransform(np.vstack([corners, centre])[None], homography)[0]
    shift = mapped[4] - centre[0]
    return float(np.linalg.norm(mapped[:4] - corners - shift, axis=1).max() / np.hypot(w, h))


def warp_target(target: np.ndarray, homography: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The target resampled on the source's grid (``size`` = (W, H)): pixel x of the result
    shows target point H(x). Outside the target the image is mirrored: a black band drew
    the dense flow off next to it (the HPatches pair zoomed 1.4x: 1.66 px with black, 0.78
    mirrored; its flow there is replaced by :func:`compose` anyway)."""
    return cv2.warpPerspective(target, homography, tuple(size),
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REFLECT)


def compose(flow: np.ndarray, matchability: np.ndarray, homography: np.ndarray,
            target_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Flow to the warped target, followed by the homography: the flow to the real target
    (source x -> H(x + flow(x))), with zero matchability where that leaves the target.

    Where H(x) itself is outside the target, the warped target is black there and the dense
    flow has nothing to follow: the homography alone is the better guess (the HPatches pair
    zoomed 1.4x, where half the source leaves the view)."""
    h, w = flow.shape[:2]
    coords = grid.pixel_coords(h, w).astype(np.float64)
    by_h = cv2.perspectiveTransform(coords.reshape(1, -1, 2), homography).reshape(h, w, 2)
    outside = ~grid.in_bounds((by_h - coords).astype(np.float32), target_size)
    points = coords + np.where(outside[..., None], 0.0, flow)
    mapped = cv2.perspectiveTransform(points.reshape(1, -1, 2), homography).reshape(h, w, 2)
    composed = (mapped - coords).astype(np.float32)
    matchability = np.where(grid.in_bounds(composed, target_size), matchability, 0.0)
    return composed, matchability.astype(np.float32)


MatchFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def match_prealigned(match: MatchFn, source: np.ndarray, target: np.ndarray,
                     config: PrealignConfig = PrealignConfig()) -> tuple[np.ndarray, np.ndarray]:
    """``match(source, target)`` -> (flow, matchability), run on the pre-aligned pair when a
    homography is found and departs from a shift by ``config.min_departure``; else as is."""
    h, w = source.shape[:2]
    homography = estimate_homography(source, target, config)
    if homography is None or departure_from_shift(homography, (w, h)) < config.min_departure:
        return match(source, target)
    flow, matchability = match(source, warp_target(target, homography, (w, h)))
    return compose(flow, matchability, homography, target.shape[1::-1])
