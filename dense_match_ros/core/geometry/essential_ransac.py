"""Robust essential-matrix estimators behind one signature, so they can be swapped by name
and benchmarked on identical correspondences.

Each takes calibrated correspondences (Nx2, ``K^-1 [u, v, 1]``), an inlier threshold in
the same calibrated units, and returns an essential matrix (``x_target^T E x_source = 0``)
or None. They do NOT choose (R, t): the caller decomposes every E the same way
(:mod:`dense_match_ros.core.geometry.essential`), which keeps the comparison about the robust
search alone.

* ``opencv-ransac``: OpenCV's five-point RANSAC.
* ``opencv-magsac``: OpenCV's USAC with MAGSAC++ scoring.
* ``poselib``: PoseLib's LO-RANSAC with a final bundle polish (Cauchy loss).
* ``kornia``: a batched RANSAC in torch around kornia's five-point solver: thousands of
  minimal samples solved and scored at once, on CUDA when there is one.
* ``dgc-5x1000``: the protocol of DGC-Net's pose evaluation (OpenCV RANSAC, five runs of
  1000 iterations, the run with most inliers kept), for numbers comparable with that paper.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import cv2
import numpy as np

from dense_match_ros.core.geometry.essential import essential_from_pose, homogeneous, sampson_error


@dataclasses.dataclass
class RobustSettings:
    """What every robust estimator is told; the units are calibrated coordinates."""

    threshold: float
    """Inlier threshold on the Sampson distance, calibrated units (pixels / focal)."""
    confidence: float = 0.9999
    max_iterations: int = 10000
    device: str = 'auto'
    """For the torch estimator: 'auto', 'cpu', 'cuda' or 'cuda:N'."""


Estimator = Callable[[np.ndarray, np.ndarray, RobustSettings, np.random.Generator],
                     'np.ndarray | None']


def _count_inliers(E: np.ndarray, x1: np.ndarray, x2: np.ndarray, threshold: float) -> int:
    return int(np.count_nonzero(np.abs(sampson_error(E, x1, x2)) < threshold))


def _best_of_stack(E_stack: np.ndarray | None, x1, x2, threshold) -> np.ndarray | None:
    """OpenCV may stack several 3x3 solutions; keep the one with most inliers."""
    if E_stack is None or E_stack.size < 9:
        return None
    candidates = E_stack.reshape(-1, 3, 3)
    if len(candidates) == 1:
        return candidates[0]
    counts = [_count_inliers(E, x1, x2, threshold) for E in candidates]
    return candidates[int(np.argmax(counts))]


def _opencv(method: int, x1, x2, settings: RobustSettings, rng, max_iterations=None):
    # OpenCV's RANSAC seeds its generator with a constant; shuffling the points is what
    # makes runs with different ``rng`` draw different samples.
    order = rng.permutation(len(x1))
    E, _ = cv2.findEssentialMat(x1[order], x2[order], np.eye(3), method=method,
                                prob=settings.confidence, threshold=settings.threshold,
                                maxIters=int(max_iterations or settings.max_iterations))
    return _best_of_stack(E, x1, x2, settings.threshold)


def opencv_ransac(x1, x2, settings: RobustSettings, rng) -> np.ndarray | None:
    return _opencv(cv2.RANSAC, x1, x2, settings, rng)


def opencv_magsac(x1, x2, settings: RobustSettings, rng) -> np.ndarray | None:
    return _opencv(cv2.USAC_MAGSAC, x1, x2, settings, rng)


def dgc_protocol(x1, x2, settings: RobustSettings, rng, runs: int = 5,
                 iterations: int = 1000) -> np.ndarray | None:
    """Five independent OpenCV RANSAC runs of 1000 iterations; most inliers wins."""
    best, best_count = None, -1
    for _ in range(runs):
        E = _opencv(cv2.RANSAC, x1, x2, settings, rng, max_iterations=iterations)
        if E is None:
            continue
        count = _count_inliers(E, x1, x2, settings.threshold)
        if count > best_count:
            best, best_count = E, count
    return best


def poselib_ransac(x1, x2, settings: RobustSettings, rng) -> np.ndarray | None:
    import poselib

    # Identity cameras: the points are already calibrated, so thresholds pass unscaled.
    camera = {'model': 'PINHOLE', 'width': 2, 'height': 2, 'params': [1.0, 1.0, 0.0, 0.0]}
    ransac = {'max_epipolar_error': float(settings.threshold),
              'success_prob': float(settings.confidence),
              'max_iterations': int(settings.max_iterations),
              'min_iterations': int(min(100, settings.max_iterations)),
              'seed': int(rng.integers(0, 2**31 - 1))}
    bundle = {'loss_scale': float(settings.threshold)}
    pose, info = poselib.estimate_relative_pose(np.ascontiguousarray(x1), np.ascontiguousarray(x2),
                                                camera, camera, ransac, bundle)
    if info.get('num_inliers', 0) < 5:
        return None
    t = np.asarray(pose.t, dtype=np.float64)
    if not np.all(np.isfinite(t)) or np.linalg.norm(t) == 0:
        return None
    return essential_from_pose(np.asarray(pose.R), t / np.linalg.norm(t))


def _torch_device(device: str):
    import torch

    from dense_match_ros.core.device import resolve_device
    return torch.device(resolve_device(device))


def torch_batched_ransac(x1, x2, settings: RobustSettings, rng, batch: int = 1024
                         ) -> np.ndarray | None:
    """RANSAC with MSAC scoring where each round solves and scores up to ``batch`` samples
    at once.

    kornia's five-point solver returns up to ten candidates per sample (NaN slots for
    complex roots); all are scored on all points in one tensor operation. Rounds stop when
    the usual confidence bound on the best inlier ratio is met. The winner is then
    re-estimated on its inliers with the least-squares (N > 5) variant of the same solver,
    a cheap local optimisation that the shared Gauss-Newton polish completes.
    """
    import torch
    from kornia.geometry.epipolar import find_essential

    n = len(x1)
    if n < 5:
        return None
    device = _torch_device(settings.device)
    dtype = torch.float64
    p1 = torch.as_tensor(x1, dtype=dtype, device=device)
    p2 = torch.as_tensor(x2, dtype=dtype, device=device)
    h1 = torch.cat([p1, torch.ones_like(p1[:, :1])], 1)
    h2 = torch.cat([p2, torch.ones_like(p2[:, :1])], 1)
    thr2 = float(settings.threshold) ** 2
    generator = torch.Generator(device=device)
    generator.manual_seed(int(rng.integers(0, 2**63 - 1)))

    # Design rows vec(x_t x_s^T): x_t^T E x_s is then a plain matrix product with vec(E).
    design = (h2[:, :, None] * h1[:, None, :]).reshape(n, 9)

    def msac_cost(E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # E: (M, 3, 3) -> truncated squared Sampson cost (M,) and inlier counts (M,).
        num = E.reshape(-1, 9) @ design.T
        ex1 = E[:, :2, :] @ h1.T
        etx2 = E[:, :, :2].mT @ h2.T
        den = (ex1 ** 2).sum(1) + (etx2 ** 2).sum(1)
        err2 = torch.nan_to_num(num ** 2 / den.clamp_min(1e-300), nan=float('inf'))
        return err2.clamp_max(thr2).sum(1), (err2 < thr2).sum(1)

    best_E, best_cost, best_inliers = None, float('inf'), 0
    done, needed = 0, settings.max_iterations
    # Score in chunks so that each (candidates x points) tensor stays near 16 MB of float64.
    chunk = max(1, int(2e6 // max(n, 1)))
    with torch.no_grad():
        while done < min(needed, settings.max_iterations):
            # A first batch of a quarter, then only what the confidence bound still asks
            # for (at least 64, so tiny batches do not waste the parallelism).
            b = batch // 4 if done == 0 else int(np.clip(needed - done, 64, batch))
            b = max(1, min(b, settings.max_iterations - done))
            # Five distinct indices per sample: random keys, take the five smallest.
            if n <= 64:
                keys = torch.rand((b, n), generator=generator, device=device, dtype=dtype)
                idx = keys.topk(5, dim=1, largest=False).indices
            else:
                idx = torch.randint(0, n, (b, 5), generator=generator, device=device)
            candidates = find_essential(p1[idx], p2[idx]).reshape(-1, 3, 3)
            ok = torch.isfinite(candidates).flatten(1).all(1)
            candidates = candidates[ok]
            done += b
            for start in range(0, len(candidates), chunk):
                part = candidates[start:start + chunk]
                cost, inliers = msac_cost(part)
                k = int(torch.argmin(cost))
                if float(cost[k]) < best_cost:
                    best_cost, best_E = float(cost[k]), part[k]
                    best_inliers = int(inliers[k])
            if best_E is not None and best_inliers >= 5:
                w = best_inliers / n
                denom = np.log(max(1e-12, 1.0 - w ** 5))
                needed = int(np.ceil(np.log(1.0 - settings.confidence) / denom)) if denom < 0 else 0
        if best_E is None:
            return None
        # Local optimisation: least-squares five-point fit on the inliers, kept if better.
        for _ in range(2):
            err = sampson_error(best_E.cpu().numpy(), x1, x2)
            mask = np.abs(err) < settings.threshold
            if mask.sum() <= 8:
                break
            sel = torch.as_tensor(np.flatnonzero(mask), device=device)
            refit = find_essential(p1[sel][None], p2[sel][None]).reshape(-1, 3, 3)
            refit = refit[torch.isfinite(refit).flatten(1).all(1)]
            if len(refit) == 0:
                break
            cost, _ = msac_cost(refit)
            k = int(torch.argmin(cost))
            if float(cost[k]) >= best_cost:
                break
            best_cost, best_E = float(cost[k]), refit[k]
    return best_E.cpu().numpy()


_REQUIRES = {'poselib': 'poselib', 'kornia': 'kornia'}
"""Estimators backed by an optional package (pip only: no rosdep key for poselib)."""
FALLBACK = 'opencv-magsac'
"""The estimator to use when the chosen one's package is missing (OpenCV is always there)."""


def missing_package(name: str) -> str | None:
    """The package estimator ``name`` needs and cannot import, or None when it can run."""
    package = _REQUIRES.get(name)
    if package is None:
        return None
    import importlib
    try:  # importing, not just finding: a broken install fails here, not at the first pose
        importlib.import_module(package)
    except ImportError:
        return package
    return None


ESTIMATORS: dict[str, Estimator] = {
    'opencv-ransac': opencv_ransac,
    'opencv-magsac': opencv_magsac,
    'poselib': poselib_ransac,
    'kornia': torch_batched_ransac,
    'dgc-5x1000': dgc_protocol,
}


def run(name: str, x_source: np.ndarray, x_target: np.ndarray, settings: RobustSettings,
        rng: np.random.Generator) -> np.ndarray | None:
    """Run the estimator called ``name`` on calibrated Nx2 correspondences."""
    if name not in ESTIMATORS:
        raise KeyError(f'unknown pose estimator {name!r}; available: {", ".join(ESTIMATORS)}')
    x1 = np.ascontiguousarray(homogeneous(x_source)[:, :2], dtype=np.float64)
    x2 = np.ascontiguousarray(homogeneous(x_target)[:, :2], dtype=np.float64)
    if len(x1) < 5:
        return None
    E = ESTIMATORS[name](x1, x2, settings, rng)
    if E is None or not np.all(np.isfinite(E)):
        return None
    return np.asarray(E, dtype=np.float64)
