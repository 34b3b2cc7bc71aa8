"""Parametric 2-D warps (affine, homography, thin-plate spline) in numpy and torch.

Direction (the same for every transform here, and the one thing to keep straight):
a transform ``T`` maps a point of the image that is *rendered* to the point of the image
that is *sampled*::

    rendered(x) = sampled(T(x))

This is the direction of ``torch.nn.functional.affine_grid`` / ``grid_sample`` and of the
parameters ``theta`` in CNNGeo (Rocco et al. 2017), so a network predicting theta can be
supervised with ``grid_sample(sampled, grid_of(theta))`` directly. In this package the
rendered image is the SOURCE and the sampled one the TARGET, so the flow on the source grid
is simply ``T(x) - x`` (see :mod:`core.geometry.gt_flow`) and no transform ever needs inverting.

Coordinates are normalised with ``align_corners=False`` as in :mod:`core.geometry.grid`: -1 and +1
are the outer image edges, each image normalised by its own width and height. Note that
this differs from the original CNNGeo code, which ran with the old ``align_corners=True``
behaviour (-1/+1 = the outer pixel *centres*); the parameter ranges carry over unchanged.

Parameter layouts (CNNGeo's):

* affine: 6 numbers ``[a11, a12, tx, a21, a22, ty]`` = the 2x3 matrix row-major,
  ``T(x) = A x + t``; identity ``[1, 0, 0, 0, 1, 0]``.
* homography: a 3x3 matrix, ``T(x) ~ H [x, 1]``.
* TPS: 18 numbers = the *displaced* positions of a 3x3 grid of control points on
  [-1, 1]^2: first the 9 x's, then the 9 y's, control points ordered x-major
  (x = -1, -1, -1, 0, 0, 0, 1, 1, 1; y = -1, 0, 1, -1, 0, 1, -1, 0, 1). ``T`` is the
  thin-plate spline with ``T(P_i) = Q_i`` and kernel ``U(r) = r^2 log r^2``.

numpy functions work in float64 (ground truth should not be limited by float32 rounding);
torch functions are batched, keep the input dtype/device, and are differentiable in theta.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch stays optional for everything that only needs numpy
    import torch

Size = tuple[int, int]

AFFINE_IDENTITY = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


# ======================================================================================
# numpy: coordinate frames
# ======================================================================================

def normalization_matrix(size: Size) -> np.ndarray:
    """3x3 matrix taking pixel coordinates of an image of ``size = (W, H)`` to normalised ones.

    x_n = (2 x + 1) / W - 1 (align_corners=False), as :func:`grid.pixels_to_normalized`.
    """
    w, h = size
    return np.array([[2.0 / w, 0.0, 1.0 / w - 1.0],
                     [0.0, 2.0 / h, 1.0 / h - 1.0],
                     [0.0, 0.0, 1.0]])


def to_normalized(points: np.ndarray, size: Size) -> np.ndarray:
    """(..., 2) pixels -> normalised, float64 (grid.pixels_to_normalized is float32)."""
    points = np.asarray(points, dtype=np.float64)
    s = np.array(size, dtype=np.float64)
    return (2.0 * points + 1.0) / s - 1.0


def to_pixels(points: np.ndarray, size: Size) -> np.ndarray:
    """(..., 2) normalised -> pixels, float64."""
    points = np.asarray(points, dtype=np.float64)
    s = np.array(size, dtype=np.float64)
    return ((points + 1.0) * s - 1.0) / 2.0


def homography_to_pixels(H_norm: np.ndarray, source_size: Size, target_size: Size) -> np.ndarray:
    """Normalised-coordinate homography (or affine as 3x3) -> the same map in pixel coordinates."""
    out = np.linalg.inv(normalization_matrix(target_size)) @ np.asarray(H_norm, np.float64) \
        @ normalization_matrix(source_size)
    return out / out[2, 2] if abs(out[2, 2]) > 1e-12 else out


def homography_to_normalized(H_pix: np.ndarray, source_size: Size, target_size: Size) -> np.ndarray:
    """Pixel homography x_t ~ H x_s -> the same map in normalised coordinates."""
    out = normalization_matrix(target_size) @ np.asarray(H_pix, np.float64) \
        @ np.linalg.inv(normalization_matrix(source_size))
    return out / out[2, 2] if abs(out[2, 2]) > 1e-12 else out


# ======================================================================================
# numpy: affine
# ======================================================================================

def affine_matrix(theta: np.ndarray) -> np.ndarray:
    """6 affine parameters (or a 2x3 matrix) -> 3x3 homogeneous matrix."""
    theta = np.asarray(theta, dtype=np.float64).reshape(2, 3)
    return np.vstack([theta, [0.0, 0.0, 1.0]])


def affine_theta(rotation: float = 0.0, shear: float = 0.0, scale_x: float = 1.0,
                 scale_y: float = 1.0, tx: float = 0.0, ty: float = 0.0) -> np.ndarray:
    """CNNGeo's composition of an affine from interpretable parameters (angles in radians).

    A = R(rotation) R(shear)^T diag(scale_x, scale_y) R(shear): an anisotropic scaling
    along axes turned by ``shear``, then a rotation; this covers every non-degenerate
    orientation-preserving linear map, which is why CNNGeo samples affines this way.
    """
    def rot(a: float) -> np.ndarray:
        c, s = np.cos(a), np.sin(a)
        return np.array([[c, -s], [s, c]])
    A = rot(rotation) @ rot(shear).T @ np.diag([scale_x, scale_y]) @ rot(shear)
    return np.array([A[0, 0], A[0, 1], tx, A[1, 0], A[1, 1], ty])


def apply_affine(theta: np.ndarray, points: np.ndarray) -> np.ndarray:
    """T(x) = A x + t for (..., 2) normalised points."""
    m = np.asarray(theta, dtype=np.float64).reshape(2, 3)
    points = np.asarray(points, dtype=np.float64)
    return points @ m[:, :2].T + m[:, 2]


# ======================================================================================
# numpy: homography
# ======================================================================================

def apply_homography(H: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map (..., 2) points through H; returns (mapped points, homogeneous w).

    w <= 0 means the point goes through or beyond the line at infinity, where the
    division is meaningless; callers must treat those as having no correspondence.
    """
    H = np.asarray(H, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    hom = points @ H[:, :2].T + H[:, 2]
    w = hom[..., 2]
    with np.errstate(divide='ignore', invalid='ignore'):
        mapped = hom[..., :2] / w[..., None]
    return mapped, w


def homography_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The homography with dst_i ~ H src_i for 4 point pairs (exact DLT, H[2, 2] = 1)."""
    src = np.asarray(src, dtype=np.float64).reshape(4, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(4, 2)
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(src, dst)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * i], b[2 * i + 1] = u, v
    h = np.linalg.solve(a, b)
    return np.append(h, 1.0).reshape(3, 3)


CORNERS = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
"""The four image corners in normalised coordinates (outer edges), clockwise from top-left."""


# ======================================================================================
# numpy: thin-plate spline
# ======================================================================================

def tps_control_points(grid_size: int = 3) -> np.ndarray:
    """(N, 2) regular control points on [-1, 1]^2 in CNNGeo's x-major order."""
    axis = np.linspace(-1.0, 1.0, grid_size)
    xs, ys = np.meshgrid(axis, axis, indexing='ij')  # x varies slowest
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def tps_identity(grid_size: int = 3) -> np.ndarray:
    """TPS parameters of the identity: the undisplaced control points, x's then y's."""
    p = tps_control_points(grid_size)
    return np.concatenate([p[:, 0], p[:, 1]])


def tps_kernel(d2: np.ndarray) -> np.ndarray:
    """U = r^2 log r^2 as a function of r^2 (0 at r = 0, its limit)."""
    d2 = np.asarray(d2, dtype=np.float64)
    # 0 * log(tiny) = 0 exactly, so no branch is needed at the control points themselves.
    return d2 * np.log(np.maximum(d2, 1e-300))


@functools.lru_cache(maxsize=8)
def _tps_system_inverse(grid_size: int) -> np.ndarray:
    """Inverse of the (N+3)x(N+3) TPS system for the regular control grid (cached)."""
    p = tps_control_points(grid_size)
    n = len(p)
    d2 = np.sum((p[:, None, :] - p[None, :, :]) ** 2, axis=-1)
    big_p = np.concatenate([np.ones((n, 1)), p], axis=1)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = tps_kernel(d2)
    system[:n, n:] = big_p
    system[n:, :n] = big_p.T
    inv = np.linalg.inv(system)
    inv.setflags(write=False)
    return inv


def tps_coefficients(theta: np.ndarray, grid_size: int = 3) -> np.ndarray:
    """Solve the spline: (N+3, 2) = N kernel weights then [a0, ax, ay] per output axis.

    Solves [K P; P^T 0] [w; a] = [Q; 0] so that the spline interpolates T(P_i) = Q_i
    exactly and its bending energy is minimal (the side conditions P^T w = 0).
    """
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    n = grid_size * grid_size
    if theta.size != 2 * n:
        raise ValueError(f'TPS with a {grid_size}x{grid_size} grid needs {2 * n} parameters, '
                         f'got {theta.size}')
    q = np.stack([theta[:n], theta[n:]], axis=1)
    rhs = np.concatenate([q, np.zeros((3, 2))], axis=0)
    return _tps_system_inverse(grid_size) @ rhs


def apply_tps(theta: np.ndarray, points: np.ndarray, grid_size: int = 3) -> np.ndarray:
    """T(x) for (..., 2) normalised points, T the spline through the displaced control points."""
    coef = tps_coefficients(theta, grid_size)
    p = tps_control_points(grid_size)
    n = len(p)
    points = np.asarray(points, dtype=np.float64)
    flat = points.reshape(-1, 2)
    x, y = flat[:, 0], flat[:, 1]
    out = coef[n] + x[:, None] * coef[n + 1] + y[:, None] * coef[n + 2]
    # One control point at a time: no (M, N, 2) temporary for a full-resolution grid.
    for i in range(n):
        u = tps_kernel((x - p[i, 0]) ** 2 + (y - p[i, 1]) ** 2)
        out += u[:, None] * coef[i]
    return out.reshape(points.shape)


def apply_transform(kind: str, theta: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Dispatch on ``kind`` in {'affine', 'similarity', 'homography', 'tps'}; NaN where a
    homography has w <= 0. A similarity is an affine theta (rotation, one zoom, shift)."""
    if kind in ('affine', 'similarity'):
        return apply_affine(theta, points)
    if kind == 'homography':
        mapped, w = apply_homography(np.asarray(theta).reshape(3, 3), points)
        return np.where((w > 1e-12)[..., None], mapped, np.nan)
    if kind == 'tps':
        return apply_tps(theta, points)
    raise ValueError(f"kind must be 'affine', 'similarity', 'homography' or 'tps', got {kind!r}")


# ======================================================================================
# torch: batched point transforms and grid_sample-ready sampling grids
# ======================================================================================

def base_grid_torch(height: int, width: int, batch: int = 1, *, dtype=None,
                    device=None) -> 'torch.Tensor':
    """(B, H, W, 2) normalised pixel-centre coordinates (x, y), align_corners=False."""
    import torch
    dtype = dtype or torch.float32
    xs = (2.0 * torch.arange(width, dtype=dtype, device=device) + 1.0) / width - 1.0
    ys = (2.0 * torch.arange(height, dtype=dtype, device=device) + 1.0) / height - 1.0
    gy, gx = torch.meshgrid(ys, xs, indexing='ij')
    return torch.stack([gx, gy], dim=-1).unsqueeze(0).expand(batch, height, width, 2)


def _flatten_points(points: 'torch.Tensor') -> tuple['torch.Tensor', tuple[int, ...]]:
    shape = points.shape
    return points.reshape(shape[0], -1, 2), shape


def apply_affine_torch(theta: 'torch.Tensor', points: 'torch.Tensor') -> 'torch.Tensor':
    """theta (B, 6) or (B, 2, 3); points (B, ..., 2) -> (B, ..., 2)."""
    m = theta.reshape(-1, 2, 3).to(points.dtype)
    flat, shape = _flatten_points(points)
    out = flat @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]
    return out.reshape(shape)


def apply_homography_torch(H: 'torch.Tensor', points: 'torch.Tensor',
                           eps: float = 1e-8) -> tuple['torch.Tensor', 'torch.Tensor']:
    """H (B, 3, 3); points (B, ..., 2) -> (mapped (B, ..., 2), w (B, ...)).

    Where w <= eps the division is clamped (finite but meaningless); use w to mask.
    """
    import torch
    H = H.reshape(-1, 3, 3).to(points.dtype)
    flat, shape = _flatten_points(points)
    hom = flat @ H[:, :, :2].transpose(1, 2) + H[:, None, :, 2]
    w = hom[..., 2]
    safe = torch.where(w > eps, w, torch.full_like(w, eps))
    mapped = hom[..., :2] / safe[..., None]
    return mapped.reshape(shape), w.reshape(shape[:-1])


def apply_tps_torch(theta: 'torch.Tensor', points: 'torch.Tensor',
                    grid_size: int = 3) -> 'torch.Tensor':
    """theta (B, 2N) displaced control points (x's then y's); points (B, ..., 2) -> (B, ..., 2)."""
    import torch
    dtype, device = points.dtype, points.device
    n = grid_size * grid_size
    theta = theta.reshape(-1, 2 * n).to(dtype)
    inv = torch.as_tensor(_tps_system_inverse(grid_size)[:, :n].copy(), dtype=dtype, device=device)
    ctrl = torch.as_tensor(tps_control_points(grid_size), dtype=dtype, device=device)
    q = torch.stack([theta[:, :n], theta[:, n:]], dim=-1)          # (B, N, 2)
    coef = inv @ q                                                   # (B, N+3, 2)
    flat, shape = _flatten_points(points)                            # (B, M, 2)
    d2 = ((flat[:, :, None, :] - ctrl[None, None]) ** 2).sum(-1)     # (B, M, N)
    u = torch.where(d2 > 0, d2 * torch.log(torch.where(d2 > 0, d2, torch.ones_like(d2))),
                    torch.zeros_like(d2))
    out = (u @ coef[:, :n] + coef[:, None, n] + flat[..., :1] * coef[:, None, n + 1]
           + flat[..., 1:] * coef[:, None, n + 2])
    return out.reshape(shape)


def sampling_grid_torch(kind: str, theta: 'torch.Tensor', size: tuple[int, int],
                        *, dtype=None, device=None) -> 'torch.Tensor':
    """Sampling grid (B, H, W, 2) for ``grid_sample(target, grid, align_corners=False)``.

    ``size = (H, W)`` of the rendered (source) image, torch order. For 'homography',
    theta is (B, 3, 3) in normalised coordinates; points with w <= 0 get coordinates
    far outside [-1, 1] so that grid_sample returns padding there.
    """
    import torch
    device = device if device is not None else theta.device
    dtype = dtype or (theta.dtype if theta.is_floating_point() else torch.float32)
    b = theta.shape[0]
    base = base_grid_torch(size[0], size[1], b, dtype=dtype, device=device)
    if kind == 'affine':
        return apply_affine_torch(theta, base)
    if kind == 'tps':
        return apply_tps_torch(theta, base)
    if kind == 'homography':
        mapped, w = apply_homography_torch(theta, base)
        return torch.where((w > 1e-8)[..., None], mapped, torch.full_like(mapped, -10.0))
    raise ValueError(f"kind must be 'affine', 'similarity', 'homography' or 'tps', got {kind!r}")
