"""Global pre-alignment: a homography taken out before dense matching, so that the dense
matcher only has to find what is left.

Why: a CNN trained on a 2-core CPU is not rotation or zoom invariant (the HPatches pair
turned by 30 degrees costs ``neuflow`` 7x its error), while a homography fitted to good
matches is. When one departs from a shift (rotation, zoom, perspective), the target is
warped onto the source's grid by it, the dense matcher runs again on that nearly aligned
pair, and its flow is composed with the homography. Where the matches do not agree
(non-rigid scenes, parallax, too little texture) or the homography is nearly a shift,
nothing changes: the dense matcher already handles translation.

Where the homography comes from: first the dense matcher's own reliable matches on
textured pixels (free, and the usual answer for a camera stream: a near-shift, so one run);
sparse features (SIFT, or ORB at a twentieth of the time) only when those cannot tell, as
when the first run failed on a half turn.
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
    evidence that one homography explains the scene. A homography fitted to the dense
    matcher's own reliable matches (nearly all right) is held by 88-100 % of them where one
    plane explains the scene (the HPatches pair, held-out affine and homography pairs); one
    held by fewer than ``full_support`` of them describes a part of the scene (the object
    of a Middlebury ring pair, a region of a deformed image) and is used only while it
    warps gently (``max_partial_departure``): beyond its inliers nothing constrains it
    (held-out pair 21, thin-plate spline: 56 % support, departure 1.32, a corner thrown
    495 px out, 5.7 -> 63 px), while the gentle partial fits on the Middlebury rings
    (51-67 % support, departure 0.05-0.17) help its pose (20-seed AUC@10 0.695 without
    them, 0.715 with). The features (``features``: SIFT or
    ORB) are found on images brought to longest side ``max_side``. ``from_flow``: ask the
    dense matcher's own first result before any features (:func:`match_prealigned`).

    ``max_extrapolation``: how far outside the target (a fraction of its longest side) the
    homography may send a source pixel and still speak for it. Further out, the aligned run
    saw only the mirrored border and the homography alone is an extrapolation beyond every
    match it was fitted to; the first result keeps such pixels. Where the homography is
    right they are out of view anyway; where it describes only the matched part of a
    deformed image, the first result is the sane one (held-out pair 21 with the lite
    network's third stage: a full-support fit departing 1.28 from a shift, 7.4 px first,
    61.5 aligned, 14.5 with this rule).
    """

    features: str = 'sift'
    max_side: int = 480
    ratio: float = 0.8
    ransac_px: float = 3.0
    min_inliers: int = 40
    min_inlier_ratio: float = 0.5
    full_support: float = 0.75
    max_partial_departure: float = 0.25
    min_departure: float = 0.05
    from_flow: bool = True
    max_extrapolation: float = 0.1

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f'prealign features must be one of {FEATURES}, got {self.features!r}')
        if int(self.max_side) < 32:
            raise ValueError(f'prealign max_side must be at least 32 px, got {self.max_side}')
        if not (0 < self.min_inlier_ratio <= 1 and 0 < self.full_support <= 1):
            raise ValueError('prealign inlier ratios must be in (0, 1]')
        if not self.max_partial_departure >= 0:
            raise ValueError('prealign max_partial_departure must be >= 0')
        if not self.max_extrapolation >= 0:
            raise ValueError('prealign max_extrapolation must be >= 0')


FEATURES = ('sift', 'orb')
"""SIFT: the precise homography (about 95 ms at 480 px on one core); ORB: a twentieth of the
time (FAST corners and binary descriptors over an 8-level pyramid), still rotation and scale
invariant, with a coarser homography that the dense matcher corrects."""
_ORB_FEATURES = 1500


def _detector(features: str) -> tuple[cv2.Feature2D, int]:
    """The detector-descriptor of ``features`` and the norm its descriptors compare by."""
    if features == 'orb':
        return cv2.ORB_create(_ORB_FEATURES), cv2.NORM_HAMMING
    return cv2.SIFT_create(), cv2.NORM_L2


def _as_grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image


def _grey(image: np.ndarray, max_side: int, upscale: bool = False) -> tuple[np.ndarray, float]:
    """Grey image at the working size for ``max_side`` (:func:`grid.working_size`; smaller
    images are enlarged only with ``upscale``) and its scale factor."""
    h, w = image.shape[:2]
    grey = _as_grey(image)
    size = grid.working_size((w, h), max_side, upscale=upscale)
    if size != (w, h):
        interp = cv2.INTER_AREA if size[0] < w else cv2.INTER_LINEAR
        grey = cv2.resize(grey, size, interpolation=interp)
    return grey, size[0] / w


def estimate_homography(source: np.ndarray, target: np.ndarray,
                        config: PrealignConfig = PrealignConfig()) -> np.ndarray | None:
    """The homography (3x3, source pixels -> target pixels) that feature matches with Lowe's
    ratio test and MAGSAC++ agree on, or None when the evidence is short of ``config``."""
    detector, norm = _detector(config.features)
    keypoints, descriptors, scales = [], [], []
    for image in (source, target):
        grey, scale = _grey(image, config.max_side, upscale=config.features == 'orb')
        kp, desc = detector.detectAndCompute(grey, None)
        if desc is None or len(kp) < config.min_inliers:
            return None
        keypoints.append(kp)
        descriptors.append(desc)
        scales.append(scale)
    pairs = cv2.BFMatcher(norm).knnMatch(descriptors[0], descriptors[1], k=2)
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
    outside = ~grid.in_bounds((_through(homography, (w, h)) - coords).astype(np.float32),
                              target_size)
    points = coords + np.where(outside[..., None], 0.0, flow)
    mapped = cv2.perspectiveTransform(points.reshape(1, -1, 2), homography).reshape(h, w, 2)
    composed = (mapped - coords).astype(np.float32)
    matchability = np.where(grid.in_bounds(composed, target_size), matchability, 0.0)
    return composed, matchability.astype(np.float32)


MatchFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def homography_from_flow(source: np.ndarray, flow: np.ndarray, matchability: np.ndarray,
                         config: PrealignConfig = PrealignConfig()) -> tuple[str, np.ndarray | None]:
    """What a dense result says about a global homography: ``('unknown', None)`` when too
    few textured pixels have a reliable match to tell (the matcher failed, e.g. a half turn:
    ask the features), ``('none', None)`` when the reliable matches do not agree on one
    homography (parallax, non-rigid motion: nothing to pre-align), else ``('found', H)``.

    Why textured pixels only: on flat areas a near-zero flow is consistent both ways whatever
    the real motion, so it would vouch for a shift that is not there.
    """
    h, w = flow.shape[:2]
    step = max(1, int(round(max(h, w) / _FLOW_SAMPLES_PER_SIDE)))
    grey = _as_grey(source)
    ys, xs = np.mgrid[step // 2:h:step, step // 2:w:step]
    small = cv2.resize(grey, (xs.shape[1], xs.shape[0]), interpolation=cv2.INTER_AREA)
    texture = cv2.cornerMinEigenVal(small.astype(np.float32) / 255.0, 3) >= _MIN_TEXTURE
    reliable = texture & (matchability[ys, xs] >= _RELIABLE)
    n_reliable = int(reliable.sum())
    if n_reliable < _MIN_RELIABLE or n_reliable < _MIN_RELIABLE_SHARE * int(texture.sum()):
        return 'unknown', None
    src = np.stack([xs[reliable], ys[reliable]], -1).astype(np.float32)
    dst = src + flow[ys[reliable], xs[reliable]]
    if len(src) > _MAX_FIT_POINTS:   # a fixed subsample: the same pair gives the same answer
        pick = np.random.default_rng(0).choice(len(src), _MAX_FIT_POINTS, replace=False)
        src, dst = src[pick], dst[pick]
    homography, inliers = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, config.ransac_px)
    if homography is None or inliers is None or inliers.sum() < config.min_inlier_ratio * len(src):
        return 'none', None
    if (inliers.sum() < config.full_support * len(src)
            and departure_from_shift(homography, (w, h)) > config.max_partial_departure):
        return 'none', None    # a partial fit that would warp strongly: see PrealignConfig
    return 'found', homography.astype(np.float64)


_FLOW_SAMPLES_PER_SIDE = 160  # a 640x480 frame is read every 4th pixel: 160 x 120 samples
_MIN_TEXTURE = 1e-3           # smaller structure-tensor eigenvalue (grey / 255, 3x3) of a sample
_RELIABLE = 0.5               # matchability of a match trusted for the fit
_MIN_RELIABLE = 100           # samples, and ...
_MIN_RELIABLE_SHARE = 0.2     # ... share of the textured ones, before the flow is believed
_MAX_FIT_POINTS = 2000


def match_prealigned(match: MatchFn, source: np.ndarray, target: np.ndarray,
                     config: PrealignConfig = PrealignConfig(), first: MatchFn | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``match(source, target)`` -> (flow, matchability), run a second time on the
    pre-aligned pair when a homography departs from a shift by ``config.min_departure``.

    The dense result comes first, and its reliable textured matches are asked for the
    homography (:func:`homography_from_flow`); features are matched
    (:func:`estimate_homography`) only when those matches cannot tell or do not agree on
    one. So a pair that needs no pre-alignment, the usual pair of a camera stream, costs one
    dense run and no feature matching. The second run replaces the first only if it has at
    least as many reliable matches (matchability >= 0.5): a homography fitted to part of a
    non-rigid or deformed scene can make the aligned pair harder, not easier. (Not the mean
    matchability: a calibrated matcher gives even hopeless pixels some, and the aligned run
    has none where the homography leaves the target.) ``first``: what runs on the pair as
    given, when it can reuse work done on it before (default ``match``).
    """
    h, w = source.shape[:2]
    flow, matchability = (first or match)(source, target)
    verdict, homography = 'unknown', None
    if config.from_flow:
        verdict, homography = homography_from_flow(source, flow, matchability, config)
    if verdict != 'found':
        homography = estimate_homography(source, target, config)
    if homography is None or departure_from_shift(homography, (w, h)) < config.min_departure:
        return flow, matchability
    aligned, aligned_m = compose(*match(source, warp_target(target, homography, (w, h))),
                                 homography, target.shape[1::-1])
    if np.count_nonzero(aligned_m >= _RELIABLE) < np.count_nonzero(matchability >= _RELIABLE):
        return flow, matchability
    beyond = _sent_beyond(homography, (w, h), target.shape[1::-1], config.max_extrapolation)
    if beyond.any():
        aligned = np.where(beyond[..., None], flow, aligned).astype(np.float32)
        aligned_m = np.where(beyond, matchability, aligned_m).astype(np.float32)
    return aligned, aligned_m


def _sent_beyond(homography: np.ndarray, size: tuple[int, int], target_size: tuple[int, int],
                 margin: float) -> np.ndarray:
    """Boolean HxW on the source grid of ``size`` (W, H): the homography sends the pixel
    more than ``margin`` x the target's longest side outside the target (size (W, H))."""
    tw, th = target_size
    pad = margin * max(tw, th)
    return cv2.inRange(_through(homography, size),
                       (-0.5 - pad, -0.5 - pad), (tw - 0.5 + pad, th - 0.5 + pad)) == 0


def _through(homography: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H(x) for every pixel x of a source grid of ``size`` (W, H): float64 HxWx2."""
    w, h = size
    coords = grid.pixel_coords(h, w).astype(np.float64).reshape(1, -1, 2)
    return cv2.perspectiveTransform(coords, homography).reshape(h, w, 2)
