"""Ground-truth flow and validity masks from known geometry.

Every function here returns ``(flow, valid)`` in the convention of :mod:`core.geometry.grid`: flow is
float32 HxWx2 on the *source* grid, in pixels, source (x, y) <-> target (x + u, y + v);
``valid`` is bool HxW and says where that correspondence exists (lands inside the target,
in front of the camera, not occluded, ...). Flow values where ``valid`` is False are finite
but meaningless (zero where nothing sensible could be computed), so callers can always
mask with ``valid`` without first hunting for NaNs.

All geometry is computed in float64 and rounded to float32 once at the end, so that the
ground truth is not the weakest link when sub-pixel errors are measured.

Sizes are ``(width, height)`` throughout, like ``cv2.resize`` and :func:`grid.in_bounds`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from dense_match_ros.core.geometry import grid, transforms
from dense_match_ros.core.geometry.transforms import apply_homography  # noqa: F401  (re-exported)

Size = tuple[int, int]
PointTransform = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------
# Helpers shared by every flow builder
# --------------------------------------------------------------------------------------

def _source_points(source_size: Size) -> np.ndarray:
    """(H*W, 2) float64 pixel centres of the source grid, row-major."""
    w, h = source_size
    return grid.pixel_coords(h, w).reshape(-1, 2).astype(np.float64)


def _finish(target_points: np.ndarray, ok: np.ndarray, source_size: Size,
            target_size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Turn mapped points (+ a pre-mask) into (flow, valid), zeroing unusable vectors."""
    w, h = source_size
    tw, th = target_size
    src = _source_points(source_size)
    target_points = np.asarray(target_points, dtype=np.float64).reshape(-1, 2)
    ok = np.asarray(ok, dtype=bool).reshape(-1) & np.all(np.isfinite(target_points), axis=1)
    # The same inclusive half-pixel border as grid.in_bounds, decided in float64.
    tx, ty = target_points[:, 0], target_points[:, 1]
    with np.errstate(invalid='ignore'):
        ok &= (tx >= -0.5) & (tx <= tw - 0.5) & (ty >= -0.5) & (ty <= th - 0.5)
    flow = np.where(np.isfinite(target_points), target_points - src, 0.0)
    return flow.reshape(h, w, 2).astype(np.float32), ok.reshape(h, w)


def resize_matrix(from_size: Size, to_size: Size) -> np.ndarray:
    """3x3 matrix taking pixel coordinates of an image to those of its resized copy.

    Pixel centres scale, not corners: x' = (x + .5) s - .5 (see :func:`grid.rescale_points`).
    """
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    return np.array([[sx, 0.0, 0.5 * sx - 0.5],
                     [0.0, sy, 0.5 * sy - 0.5],
                     [0.0, 0.0, 1.0]], dtype=np.float64)


def scale_intrinsics(K: np.ndarray, from_size: Size, to_size: Size) -> np.ndarray:
    """Intrinsics of the same camera after resizing its images from ``from_size`` to ``to_size``.

    K uses the pixel-centre convention of :mod:`core.geometry.grid` (the principal point is in the
    same coordinates as pixel centres), so the principal point moves by the half-pixel
    term as well: cx' = (cx + .5) sx - .5, fx' = fx sx.
    """
    return resize_matrix(from_size, to_size) @ np.asarray(K, dtype=np.float64)


def scale_homography(H: np.ndarray, source_from_to: tuple[Size, Size],
                     target_from_to: tuple[Size, Size]) -> np.ndarray:
    """Re-express a pixel homography (x_t ~ H x_s) after resizing source and/or target.

    ``source_from_to = (old_source_size, new_source_size)``, likewise for the target.
    Returns H' = S_t H S_s^-1, normalised so that H'[2, 2] = 1 when that entry is non-zero.
    """
    s_src = resize_matrix(*source_from_to)
    s_tgt = resize_matrix(*target_from_to)
    out = s_tgt @ np.asarray(H, dtype=np.float64) @ np.linalg.inv(s_src)
    if abs(out[2, 2]) > 1e-12:
        out = out / out[2, 2]
    return out


# --------------------------------------------------------------------------------------
# Generic and homography flow
# --------------------------------------------------------------------------------------

def flow_from_point_transform(fn: PointTransform, source_size: Size,
                              target_size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Flow of any pixel-space point map ``fn``: (N, 2) source pixels -> (N, 2) target pixels.

    ``fn`` may return NaN/inf for points with no image (e.g. behind a camera); those, and
    points landing outside the target, are invalid. This is the reference the specialised
    builders are tested against.
    """
    src = _source_points(source_size)
    mapped = np.asarray(fn(src.copy()), dtype=np.float64)
    if mapped.shape != src.shape:
        raise ValueError(f'point transform returned shape {mapped.shape}, expected {src.shape}')
    return _finish(mapped, np.ones(len(src), dtype=bool), source_size, target_size)


def flow_from_homography(H: np.ndarray, source_size: Size,
                         target_size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Flow of a pixel homography x_t ~ H x_s (pixel centres as in core/geometry/grid.py).

    Valid where the point lands inside the target and is in front (w > 0). The sign of w is
    only meaningful up to the overall sign of H, so H is first normalised to make w > 0 at
    the source image centre when it is non-zero there (HPatches-style matrices already are).
    """
    H = np.asarray(H, dtype=np.float64)
    w, h = source_size
    centre_w = H[2, 0] * (w - 1) / 2 + H[2, 1] * (h - 1) / 2 + H[2, 2]
    if centre_w < 0:
        H = -H
    mapped, hw = apply_homography(H, _source_points(source_size))
    return _finish(mapped, hw > 1e-12, source_size, target_size)


# --------------------------------------------------------------------------------------
# Depth + pose flow
# --------------------------------------------------------------------------------------

def flow_from_depth(depth_source: np.ndarray, K_source: np.ndarray,
                    T_target_source: np.ndarray, K_target: np.ndarray, target_size: Size,
                    depth_target: np.ndarray | None = None,
                    occlusion_tolerance: float = 0.05,
                    min_depth: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Flow induced by a depth map and a rigid motion between two pinhole cameras.

    ``depth_source`` HxW in metres (z along the optical axis; 0 or non-finite = unknown),
    ``T_target_source`` 4x4 maps points in the source camera frame to the target camera
    frame, ``K_*`` are 3x3 pixel-centre intrinsics.

    Valid = known source depth, in front of the target camera (z_t > ``min_depth``), lands
    inside the target, and, when ``depth_target`` is given, not occluded: the target depth
    at the (nearest) landing pixel is known and agrees with the projected depth within
    ``occlusion_tolerance`` relative error. Unknown target depth counts as *not* verified
    (invalid): a ground truth that we cannot check is not ground truth. Nearest-pixel
    lookup is deliberate: bilinear depth would blend foreground and background across
    the very edges where occlusion is decided.
    """
    depth = np.asarray(depth_source, dtype=np.float64)
    h, w = depth.shape[:2]
    tw, th = target_size
    K_s = np.asarray(K_source, dtype=np.float64)
    K_t = np.asarray(K_target, dtype=np.float64)
    T = np.asarray(T_target_source, dtype=np.float64)

    z = depth.reshape(-1)
    known = np.isfinite(z) & (z > 0)
    z = np.where(known, z, 0.0)
    src = _source_points((w, h))
    rays = np.concatenate([src, np.ones((len(src), 1))], axis=1) @ np.linalg.inv(K_s).T
    pts_s = rays * z[:, None]
    pts_t = pts_s @ T[:3, :3].T + T[:3, 3]
    z_t = pts_t[:, 2]
    front = known & (z_t > min_depth)
    proj = pts_t @ K_t.T
    with np.errstate(divide='ignore', invalid='ignore'):
        mapped = proj[:, :2] / proj[:, 2:3]
    mapped[~front] = np.nan
    flow, valid = _finish(mapped, front, (w, h), target_size)

    if depth_target is not None:
        d_t = np.asarray(depth_target, dtype=np.float64)
        if d_t.shape[:2] != (th, tw):
            raise ValueError(f'depth_target is {d_t.shape[1]}x{d_t.shape[0]}, '
                             f'target_size says {tw}x{th}')
        flat_valid = valid.reshape(-1)
        idx = np.flatnonzero(flat_valid)
        cols = np.clip(np.rint(mapped[idx, 0]).astype(np.int64), 0, tw - 1)
        rows = np.clip(np.rint(mapped[idx, 1]).astype(np.int64), 0, th - 1)
        observed = d_t[rows, cols]
        expected = z_t[idx]
        with np.errstate(divide='ignore', invalid='ignore'):
            rel = np.abs(observed - expected) / observed
        visible = np.isfinite(observed) & (observed > 0) & (rel <= occlusion_tolerance)
        flat_valid[idx[~visible]] = False
        valid = flat_valid.reshape(h, w)
    return flow, valid


# --------------------------------------------------------------------------------------
# Flow of the normalised-coordinate transforms of core/geometry/transforms.py
# --------------------------------------------------------------------------------------

def flow_from_normalized_transform(fn: PointTransform, source_size: Size,
                                   target_size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Flow of a map between *normalised* coordinates (each image normalised by its own size).

    ``fn`` takes (N, 2) normalised source points to (N, 2) normalised target points, in
    the rendered -> sampled direction of :mod:`core.geometry.transforms`.
    """
    def in_pixels(points: np.ndarray) -> np.ndarray:
        mapped = fn(transforms.to_normalized(points, source_size))
        return transforms.to_pixels(mapped, target_size)
    return flow_from_point_transform(in_pixels, source_size, target_size)


def flow_from_affine(theta: np.ndarray, source_size: Size,
                     target_size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Flow of CNNGeo affine parameters (6, normalised coords, source -> target points)."""
    return flow_from_normalized_transform(lambda p: transforms.apply_affine(theta, p),
                                          source_size, target_size)


def flow_from_tps(theta: np.ndarray, source_size: Size, target_size: Size,
                  grid_size: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Flow of CNNGeo TPS parameters (displaced 3x3 control points, source -> target points)."""
    return flow_from_normalized_transform(
        lambda p: transforms.apply_tps(theta, p, grid_size), source_size, target_size)


def flow_from_normalized_homography(H_norm: np.ndarray, source_size: Size,
                                    target_size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Flow of a homography given in normalised coordinates (as the synthetic generator uses)."""
    return flow_from_homography(transforms.homography_to_pixels(H_norm, source_size, target_size),
                                source_size, target_size)
