"""What a parametric matcher (CNNGeo) needs beyond :mod:`.transforms`: composing its two
stages, densifying a transform into a flow, the round trip of two transforms, sanity checks
and least-squares fits (each stage's floor on a pair with known flow).

Conventions are those of :mod:`.transforms`: a transform maps a point of the rendered image
(our SOURCE) to the point of the sampled image (our TARGET), coordinates normalised with
``align_corners=False``, each image by its own size. So a transform *is* the flow, and
images of different sizes need nothing but their own normalisation.

Why a composition is again a TPS: the spline through control points Q is linear in Q and
reproduces affine maps exactly, so for an affine A, ``A(TPS_Q(x)) = TPS_{A(Q)}(x)``: the
hierarchy "TPS on the affine-aligned pair, then the affine" is one TPS whose control
points are the TPS stage's mapped by the affine (:func:`compose_affine_tps_torch`).

torch functions are batched and differentiable; numpy ones work in float64.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from dense_match_ros.core.geometry import transforms as tf

AFFINE_PARAMS = 6
TPS_PARAMS = 18
DETERMINANT_RANGE = (0.1, 10.0)
"""An affine whose linear part has a determinant outside this (or <= 0: a mirror or a
collapse) is not a plausible view change: area scaled beyond 10x either way."""


# ======================================================================================
# points
# ======================================================================================

def grid_points(n: int = 21, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """(n*n, 2) regular grid on [-1, 1]^2, x varying fastest: CNNGeo's loss points."""
    if n < 2:
        raise ValueError(f'a loss grid needs at least 2 points a side, got {n}')
    axis = torch.linspace(-1.0, 1.0, n, dtype=dtype, device=device)
    gy, gx = torch.meshgrid(axis, axis, indexing='ij')
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


def transform_points_torch(kind: str, theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """T(points) for theta (B, 6) 'affine' or (B, 18) 'tps'; points (N, 2) or (B, ..., 2)."""
    if points.dim() == 2:
        points = points.unsqueeze(0).expand(theta.shape[0], -1, -1)
    if kind == 'affine':
        return tf.apply_affine_torch(theta, points)
    if kind == 'tps':
        return apply_tps_lean(theta, points)
    raise ValueError(f"kind must be 'affine' or 'tps', got {kind!r}")


def apply_tps_lean(theta: torch.Tensor, points: torch.Tensor, grid_size: int = 3) -> torch.Tensor:
    """:func:`transforms.apply_tps_torch` (the same spline, the same result) one control point
    at a time: no (B, M, N) temporaries, so a full frame (M = 307200 at 640x480) costs a
    few elementwise passes per control point instead of a batched matrix product over a
    (B, M, N) kernel, which is what keeps densification at native size cheap."""
    dtype, device = points.dtype, points.device
    n = grid_size * grid_size
    theta = theta.reshape(-1, 2 * n).to(dtype)
    inv = torch.as_tensor(tf._tps_system_inverse(grid_size)[:, :n].copy(), dtype=dtype, device=device)
    ctrl = tf.tps_control_points(grid_size).tolist()
    q = torch.stack([theta[:, :n], theta[:, n:]], dim=-1)            # (B, N, 2)
    coef = inv @ q                                                     # (B, N+3, 2)
    shape = (-1,) + (1,) * (points.dim() - 2) + (2,)
    x, y = points[..., :1], points[..., 1:]
    out = coef[:, n].view(shape) + x * coef[:, n + 1].view(shape) + y * coef[:, n + 2].view(shape)
    for i, (cx, cy) in enumerate(ctrl):
        d2 = (x - cx).square() + (y - cy).square()
        out = out + torch.xlogy(d2, d2) * coef[:, i].view(shape)      # U = r^2 log r^2, U(0) = 0
    return out


# ======================================================================================
# composition
# ======================================================================================

def compose_affine_tps_torch(affine: torch.Tensor, tps: torch.Tensor) -> torch.Tensor:
    """TPS parameters (B, 18) of x -> affine(tps(x)): the TPS stage ran on the target
    aligned by the affine, so its output points are in the aligned frame and the affine
    takes them on to the target (see the module doc for why the result is exact)."""
    n = TPS_PARAMS // 2
    q = torch.stack([tps[:, :n], tps[:, n:]], dim=-1)                 # (B, 9, 2)
    mapped = tf.apply_affine_torch(affine, q)
    return torch.cat([mapped[..., 0], mapped[..., 1]], dim=1)


def compose_affine_tps(affine: np.ndarray, tps: np.ndarray) -> np.ndarray:
    """numpy (float64) :func:`compose_affine_tps_torch` for one pair of parameter vectors."""
    tps = np.asarray(tps, dtype=np.float64).reshape(-1)
    n = tps.size // 2
    mapped = tf.apply_affine(affine, np.stack([tps[:n], tps[n:]], axis=1))
    return np.concatenate([mapped[:, 0], mapped[:, 1]])


def compose_affine_affine_torch(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Affine parameters (B, 6) of x -> outer(inner(x)), exact: a further affine regressed on
    the target aligned by ``outer`` composes into one affine."""
    a, b = outer.reshape(-1, 2, 3), inner.reshape(-1, 2, 3).to(outer.dtype)
    linear = a[:, :, :2] @ b[:, :, :2]
    shift = (a[:, :, :2] @ b[:, :, 2:]) + a[:, :, 2:]
    return torch.cat([linear, shift], dim=2).reshape(-1, 6)


def compose_tps_tps_torch(outer: torch.Tensor, inner: torch.Tensor, n: int = 21) -> torch.Tensor:
    """TPS parameters (B, 18) closest (least squares on an ``n`` x ``n`` grid over [-1, 1]^2)
    to x -> outer(inner(x)): a further TPS regressed on the target aligned by ``outer``.

    Unlike an affine after a TPS this is not exact (a spline of a spline is no spline), but
    where ``inner`` is a small correction, as on a pair already aligned, the fit is close:
    the test measures it."""
    points = grid_points(n, dtype=outer.dtype, device=outer.device)
    mapped = transform_points_torch('tps', outer, transform_points_torch('tps', inner, points))
    solve = torch.as_tensor(_tps_fit_matrix(n), dtype=outer.dtype, device=outer.device)
    q = solve @ mapped                                                # (B, 9, 2)
    return torch.cat([q[..., 0], q[..., 1]], dim=1)


@functools.lru_cache(maxsize=4)
def _tps_fit_matrix(n: int) -> np.ndarray:
    """(9, n*n) least-squares solve of a TPS through the points of :func:`grid_points` (n):
    the same for every call, so built once (a pass per match would otherwise rebuild it)."""
    return np.linalg.pinv(tps_basis(grid_points(n, dtype=torch.float64).numpy()))


def affine_identity_torch(batch: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    return torch.as_tensor(tf.AFFINE_IDENTITY, dtype=dtype, device=device).expand(batch, -1).clone()


# ======================================================================================
# sanity
# ======================================================================================

def affine_determinant(theta: np.ndarray | torch.Tensor):
    """Determinant of the 2x2 linear part of affine parameters (..., 6), in normalised units
    (the area ratio target/source in each image's own normalisation)."""
    return theta[..., 0] * theta[..., 4] - theta[..., 1] * theta[..., 3]


def degenerate_affine(theta: np.ndarray, limits: tuple[float, float] = DETERMINANT_RANGE) -> str:
    """Why an affine is no plausible view change ('' when it is one): a non-finite
    parameter, or a determinant <= 0 (mirror, collapse) or outside ``limits``."""
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(theta)):
        return 'non-finite parameters'
    det = float(affine_determinant(theta))
    if det <= 0:
        return f'determinant {det:.3g} <= 0'
    if not limits[0] <= det <= limits[1]:
        return f'determinant {det:.3g} outside [{limits[0]:g}, {limits[1]:g}]'
    return ''


# ======================================================================================
# densification and the round trip
# ======================================================================================

def _normalise(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., 2) pixels -> normalised, size = (W, H)."""
    s = torch.tensor(size, dtype=pixels.dtype, device=pixels.device)
    return (2.0 * pixels + 1.0) / s - 1.0


def _to_pixels(points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., 2) normalised -> pixels, size = (W, H)."""
    s = torch.tensor(size, dtype=points.dtype, device=points.device)
    return ((points + 1.0) * s - 1.0) / 2.0


def dense_map(kind: str, theta: torch.Tensor, source_size: tuple[int, int]) -> torch.Tensor:
    """T at every pixel centre of a source of ``source_size`` (W, H): (B, H, W, 2), normalised
    target coordinates (the ``grid_sample`` grid that renders the source from the target)."""
    w, h = source_size
    if kind == 'tps' and not theta.requires_grad:
        return _tps_on_grid(theta, w, h)
    base = tf.base_grid_torch(h, w, theta.shape[0], dtype=theta.dtype, device=theta.device)
    return transform_points_torch(kind, theta, base)


def _tps_on_grid(theta: torch.Tensor, width: int, height: int, grid_size: int = 3) -> torch.Tensor:
    """The TPS at every pixel centre, exploiting the grid twice.

    A point's squared distance to a control point is dx^2 (one per column) + dy^2 (one per
    row), one broadcast add. And both the pixel centres and the control points are
    symmetric about the image centre, so the kernel of the control point at (-cx, cy) is
    that of (cx, cy) read with its columns reversed (rows for -cy): a 3x3 grid needs four
    log passes, not nine. The kernels then meet the coefficients in one matrix product.
    Measured at 640x480 on one core: 6.0 -> 4.5 ms.
    """
    dtype, device = theta.dtype, theta.device
    n = grid_size * grid_size
    theta = theta.reshape(-1, 2 * n)
    inv = torch.as_tensor(tf._tps_system_inverse(grid_size)[:, :n].copy(), dtype=dtype, device=device)
    coef = inv @ torch.stack([theta[:, :n], theta[:, n:]], dim=-1)   # (B, N+3, 2)
    xs = (2.0 * torch.arange(width, dtype=dtype, device=device) + 1.0) / width - 1.0
    ys = (2.0 * torch.arange(height, dtype=dtype, device=device) + 1.0) / height - 1.0
    tiny = torch.finfo(dtype).tiny
    kernels, cache = [], {}
    for cx, cy in tf.tps_control_points(grid_size).tolist():
        key = (abs(cx), abs(cy))
        if key not in cache:
            d2 = (ys - key[1]).square()[:, None] + (xs - key[0]).square()[None, :]
            cache[key] = d2.clamp_min(tiny).log_().mul_(d2)           # r^2 log r^2, 0 at r = 0
        u = cache[key]
        flips = [dim for dim, c in ((1, cx), (0, cy)) if c < 0]
        kernels.append(u.flip(flips) if flips else u)
    stacked = torch.stack(kernels).reshape(n, -1)                      # (N, H*W)
    affine = (coef[:, n][:, None, None] + xs[None, None, :, None] * coef[:, n + 1][:, None, None]
              + ys[None, :, None, None] * coef[:, n + 2][:, None, None])   # (B, H, W, 2)
    bent = (coef[:, :n].transpose(1, 2) @ stacked).reshape(-1, 2, height, width)
    return affine + bent.permute(0, 2, 3, 1)


def map_to_flow(mapped: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
    """A :func:`dense_map` (B, H, W, 2) -> flow in pixels on the source grid, the target
    of ``target_size`` (W, H)."""
    h, w = mapped.shape[1:3]
    half = torch.tensor(target_size, dtype=mapped.dtype, device=mapped.device) / 2.0
    flow = mapped * half + (half - 0.5)                               # target pixels
    flow[..., 0] -= torch.arange(w, dtype=mapped.dtype, device=mapped.device)
    flow[..., 1] -= torch.arange(h, dtype=mapped.dtype, device=mapped.device)[:, None]
    return flow


def dense_flow(kind: str, theta: torch.Tensor, source_size: tuple[int, int],
               target_size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, 2) flow in pixels on the source's own grid (sizes (W, H), may differ).

    The transform is evaluated at every source pixel at native size, so there is no
    upsampling of a coarse flow: the parametric flow is exact at any resolution.
    """
    return map_to_flow(dense_map(kind, theta, source_size), target_size)


def round_trip_error(kind: str, backward: torch.Tensor, there: torch.Tensor,
                     unit_size: tuple[int, int] | None = None) -> torch.Tensor:
    """|T_ts(T_st(x)) - x| (B, H, W) per pixel of a grid, from ``there`` = T_st on that grid
    (:func:`dense_map`, normalised) and the backward parameters.

    The error is in pixels of an image of ``unit_size`` (W, H) (default: the grid's), so a
    threshold fitted at one resolution means the same at every other.
    """
    back = transform_points_torch(kind, backward, there)
    h, w = there.shape[1:3]
    base = tf.base_grid_torch(h, w, there.shape[0], dtype=there.dtype, device=there.device)
    uw, uh = unit_size or (w, h)
    scale = torch.tensor([uw / 2.0, uh / 2.0], dtype=there.dtype, device=there.device)
    return ((back - base) * scale).norm(dim=-1)


def inside(points: torch.Tensor) -> torch.Tensor:
    """Normalised points inside the image (edges included): bool (...)."""
    return (points.abs() <= 1.0).all(dim=-1)


# ======================================================================================
# least-squares fits (the floor a stage can reach on a pair with known flow)
# ======================================================================================

def fit_affine(points: np.ndarray, mapped: np.ndarray) -> np.ndarray:
    """The affine parameters (6,) minimising sum |A p + t - q|^2 over (N, 2) point pairs."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    q = np.asarray(mapped, dtype=np.float64).reshape(-1, 2)
    design = np.concatenate([p, np.ones((len(p), 1))], axis=1)
    sol, *_ = np.linalg.lstsq(design, q, rcond=None)                  # (3, 2)
    return np.concatenate([sol[:, 0], sol[:, 1]])


def tps_basis(points: np.ndarray, grid_size: int = 3) -> np.ndarray:
    """(N, grid_size^2) matrix B with T(p) = B @ Q for every TPS through control points Q.

    The spline is linear in its control-point positions, which is what makes fitting one a
    linear least-squares problem.
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = grid_size * grid_size
    columns = []
    for i in range(n):
        q = np.zeros(2 * n)
        q[i] = 1.0                                                    # unit x of control i
        columns.append(tf.apply_tps(q, p, grid_size)[:, 0])
    return np.stack(columns, axis=1)


def fit_tps(points: np.ndarray, mapped: np.ndarray, grid_size: int = 3) -> np.ndarray:
    """The TPS parameters (2 grid_size^2,) minimising sum |T(p) - q|^2 over point pairs."""
    q = np.asarray(mapped, dtype=np.float64).reshape(-1, 2)
    basis = tps_basis(points, grid_size)
    sol, *_ = np.linalg.lstsq(basis, q, rcond=None)                   # (n, 2)
    return np.concatenate([sol[:, 0], sol[:, 1]])
