"""Direct alignment of a thin-plate spline: Gauss-Newton on the pixels of both images.

Why it exists: CNNGeo regresses its transform from a correlation of 16 px cells, so its
spline is right to a few pixels and no closer. The spline is linear in its nine control
points (``T(x) = B(x) Q``, :func:`.parametric.tps_basis`), so the remaining error is a
least-squares problem in 18 unknowns over every source pixel: the source should look like
the target sampled at ``T(x)``. A few Gauss-Newton steps, coarse to fine, solve it
(Lucas-Kanade with a spline as the warp).

What keeps it from locking on to the wrong thing:

* **band-pass images.** Smooth shading (a sky's gradient) and the jitter's gamma and
  brightness would otherwise dominate the residual; a difference of Gaussians keeps edges
  and texture, the structure that pins the warp down.
* **gain and bias**, refitted in closed form at every step (the two images' contrast
  differs), and Huber weights on the residual (occluders, noise).
* **a trust region.** A correction whose mean length exceeds ``max_shift`` of the image
  side is a different alignment, not a refinement of the network's: on a repetitive facade
  the steps walk one period along. It is refused and the input returned.

Coordinates are those of :mod:`.parametric`: normalised per image, so both images are
resized to one square working grid per level whatever their sizes or aspects, as the
network's input is.
"""
from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np

from dense_match_ros.core.geometry import parametric


@dataclasses.dataclass(frozen=True)
class AlignmentSettings:
    """How the spline is refined; defaults measured in the README ("direct alignment")."""

    levels: tuple[tuple[int, int], ...] = ((40, 6), (60, 8), (120, 6))
    """(working side in px, Gauss-Newton steps) per level, coarse to fine."""
    blur: float = 1.0
    """Gaussian sigma (px of each level) against noise before the band-pass."""
    band: float = 2.0
    """Sigma of the subtracted low-pass, in px of a 60 px level (scaled with the level)."""
    huber: float = 1.345
    """Huber threshold in robust standard deviations of the residual."""
    damping: float = 1e-3
    """Levenberg-Marquardt damping (relative to the normal matrix's diagonal)."""
    max_shift: float = 0.1
    """Largest accepted mean correction, as a fraction of the working side."""
    min_pixels: int = 64
    """Fewest overlapping pixels a step needs (a smaller overlap is no evidence)."""
    tolerance_px: float = 0.02
    """A level stops when no control point moved more than this (px of that level)."""

    def __post_init__(self) -> None:
        if not self.levels or any(int(side) < 8 or int(steps) < 0 for side, steps in self.levels):
            raise ValueError(f'levels must be (side >= 8, steps >= 0) pairs, got {self.levels}')
        for name in ('huber', 'max_shift'):
            if not getattr(self, name) > 0:
                raise ValueError(f'{name} must be > 0, got {getattr(self, name)}')
        if self.blur < 0 or self.band < 0 or self.damping < 0 or self.tolerance_px < 0:
            raise ValueError('blur, band, damping and tolerance_px must be >= 0')


@dataclasses.dataclass
class AlignmentResult:
    """The refined parameters and why they are what they are."""

    theta: np.ndarray
    """(18,) float32 TPS parameters (the input's when ``accepted`` is False)."""
    accepted: bool
    shift_px: float
    """Mean length of the correction, in px of the finest working level."""
    steps: int


def refine_tps(source: np.ndarray, target: np.ndarray, theta: np.ndarray,
               settings: AlignmentSettings = AlignmentSettings()) -> AlignmentResult:
    """``theta`` (18,) refined so that ``source(x) ~ gain * target(T(x)) + bias``.

    ``source`` and ``target`` are RGB uint8 of any sizes; ``theta`` maps normalised source
    points to normalised target points (:mod:`.parametric`).
    """
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    if theta.size != parametric.TPS_PARAMS or not np.all(np.isfinite(theta)):
        raise ValueError(f'theta must be {parametric.TPS_PARAMS} finite TPS parameters')
    start = np.stack([theta[:9], theta[9:]], axis=1)                  # (9, 2) control points
    q = start.copy()
    grey_s, grey_t = _grey(source), _grey(target)
    steps = 0
    for side, count in settings.levels:
        level = _Level(grey_s, grey_t, int(side), settings)
        q, done = level.solve(q, int(count))
        steps += done
    side = int(settings.levels[-1][0])
    basis = _basis(side)
    shift = float(np.linalg.norm(basis @ (q - start), axis=1).mean() * side / 2.0)
    accepted = bool(np.all(np.isfinite(q)) and shift <= settings.max_shift * side)
    out = q if accepted else start
    return AlignmentResult(np.concatenate([out[:, 0], out[:, 1]]).astype(np.float32),
                           accepted, shift, steps)


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _basis(side: int) -> np.ndarray:
    """(side*side, 9) spline basis at the pixel centres of a square working grid."""
    axis = (2.0 * np.arange(side) + 1.0) / side - 1.0
    gx, gy = np.meshgrid(axis, axis)
    points = np.stack([gx.ravel(), gy.ravel()], axis=1)
    return parametric.tps_basis(points).astype(np.float32)


class _Level:
    """One working size: the band-passed images, the target's gradients and the steps."""

    def __init__(self, grey_s: np.ndarray, grey_t: np.ndarray, side: int,
                 settings: AlignmentSettings) -> None:
        self.side, self.settings = side, settings
        self.basis = _basis(side)
        s = self._filtered(grey_s)
        t = self._filtered(grey_t)
        self.source = s.ravel()
        gx = cv2.Sobel(t, cv2.CV_32F, 1, 0, ksize=3) / 8.0
        gy = cv2.Sobel(t, cv2.CV_32F, 0, 1, ksize=3) / 8.0
        self.stack = np.ascontiguousarray(np.stack([t, gx, gy], axis=-1))  # one remap for all three

    def _filtered(self, grey: np.ndarray) -> np.ndarray:
        size = (self.side, self.side)
        shrink = grey.shape[0] > self.side or grey.shape[1] > self.side
        image = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        if self.settings.blur > 0:
            image = cv2.GaussianBlur(image, (0, 0), self.settings.blur)
        if self.settings.band > 0:
            image = image - cv2.GaussianBlur(image, (0, 0), self.settings.band * self.side / 60.0)
        return image

    def _sample(self, q: np.ndarray):
        """Target intensity and gradients at T(x) of every working pixel, and which land inside."""
        side = self.side
        pos = self.basis @ q.astype(np.float32)
        px = ((pos[:, 0] + 1.0) * side - 1.0) / 2.0
        py = ((pos[:, 1] + 1.0) * side - 1.0) / 2.0
        inside = (px > 0.5) & (px < side - 1.5) & (py > 0.5) & (py < side - 1.5)
        sampled = cv2.remap(self.stack, px.reshape(side, side), py.reshape(side, side),
                            cv2.INTER_LINEAR).reshape(-1, 3)
        return sampled, inside

    def solve(self, q: np.ndarray, count: int) -> tuple[np.ndarray, int]:
        """``count`` damped Gauss-Newton steps from control points ``q`` (9, 2).

        Pixels outside the target weigh zero rather than being cut out (no copies), and the
        normal matrix comes from the cached products of basis columns
        (:func:`_basis_products`): two small matrix products a step.
        """
        settings, half = self.settings, self.side / 2.0
        products = _basis_products(self.side)
        done = 0
        for _ in range(count):
            sampled, inside = self._sample(q)
            count_in = float(inside.sum())
            if count_in < settings.min_pixels:
                break
            mask = inside.astype(np.float32)
            t, gx, gy = sampled[:, 0], sampled[:, 1], sampled[:, 2]
            t_c = (t - float(t @ mask) / count_in) * mask
            s_c = (self.source - float(self.source @ mask) / count_in) * mask
            var = float(t_c @ t_c) / count_in
            if not var > 1e-6:
                break
            gain = float(t_c @ s_c) / count_in / var
            residual = s_c - gain * t_c                                # zero outside
            size = np.abs(residual)
            # A robust scale: for Gaussian noise sigma = sqrt(pi / 2) * mean |r|.
            limit = settings.huber * 1.2533 * float(size.sum()) / count_in + 1e-6
            weights = mask * np.minimum(1.0, limit / np.maximum(size, 1e-12))
            jx, jy = gain * half * gx, gain * half * gy                # d sample / d position
            wx, wy = weights * jx, weights * jy
            blocks = (np.stack([wx * jx, wx * jy, wy * jy]) @ products).astype(np.float64)
            xx, xy, yy = (b.reshape(9, 9) for b in blocks)
            normal = np.block([[xx, xy], [xy, yy]])
            grad = (np.stack([wx * residual, wy * residual]) @ self.basis).astype(np.float64).ravel()
            normal += settings.damping * np.diag(np.diag(normal)) + 1e-9 * np.eye(len(grad))
            try:
                delta = np.linalg.solve(normal, grad)
            except np.linalg.LinAlgError:
                break
            if not np.all(np.isfinite(delta)):
                break
            q = q + np.stack([delta[:9], delta[9:]], axis=1)
            done += 1
            if float(np.abs(delta).max()) * half < settings.tolerance_px:
                break
        return q, done


@functools.lru_cache(maxsize=8)
def _basis_products(side: int) -> np.ndarray:
    """(side*side, 81) products of every pair of basis columns at each pixel: the normal
    matrix of a step is then one (3, N) x (N, 81) product (about 5 MB at 120 px)."""
    basis = _basis(side)
    return (basis[:, :, None] * basis[:, None, :]).reshape(len(basis), 81)
