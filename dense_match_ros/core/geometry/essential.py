"""Two-view geometry shared by every pose estimator: calibrated rays, essential matrices,
the four-fold decomposition with its cheirality test, Sampson errors, and a Gauss-Newton
polish on the manifold of essential matrices that also yields the pose covariance.

Conventions (the same in the whole package):

* ``x_source``, ``x_target`` are calibrated (normalised) image coordinates ``K^-1 [u, v, 1]``
  of the two cameras, Nx2 or homogeneous Nx3.
* The pose (R, t) is ``T_target_source``: ``X_target = R X_source + t`` for a 3-D point
  expressed in the optical frames (x right, y down, z forward).
* ``E = [t]_x R``, hence ``x_target^T E x_source = 0``.

Every robust estimator only proposes an E and an inlier set; choosing (R, t) from E, the
refinement and the covariance happen here, so that all estimators are compared on one
decomposition and one error measure.
"""
from __future__ import annotations

import cv2
import numpy as np

# Rotation by +90 degrees about z: the W of Hartley & Zisserman's E = U diag(1,1,0) V^T split.
_W = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def skew(v: np.ndarray) -> np.ndarray:
    """[v]_x, so that skew(v) @ w == cross(v, w)."""
    x, y, z = np.asarray(v, dtype=np.float64).reshape(3)
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def rotation_from_vector(w: np.ndarray) -> np.ndarray:
    """exp([w]_x): the rotation by |w| radians about w/|w| (Rodrigues)."""
    return cv2.Rodrigues(np.asarray(w, dtype=np.float64).reshape(3, 1))[0]


def essential_from_pose(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """E = [t]_x R for X_target = R X_source + t."""
    return skew(t) @ np.asarray(R, dtype=np.float64)


def homogeneous(x: np.ndarray) -> np.ndarray:
    """Nx2 -> Nx3 with a trailing one; Nx3 passes through."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] == 3:
        return x
    return np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1)


def normalize_points(points: np.ndarray, K: np.ndarray,
                     dist: np.ndarray | None = None) -> np.ndarray:
    """Pixels (Nx2, pixel centres at integers) -> calibrated Nx2 coordinates.

    With non-zero OpenCV distortion coefficients the points are undistorted on the way, so
    the estimators always see an ideal pinhole camera.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    K = np.asarray(K, dtype=np.float64)
    if dist is not None and np.any(np.asarray(dist, dtype=np.float64) != 0):
        out = cv2.undistortPoints(points.reshape(-1, 1, 2), K, np.asarray(dist, dtype=np.float64))
        return out.reshape(-1, 2)
    return (homogeneous(points) @ np.linalg.inv(K).T)[:, :2]


def sampson_error(E: np.ndarray, x_source: np.ndarray, x_target: np.ndarray) -> np.ndarray:
    """Signed first-order geometric (Sampson) distance of each correspondence to E.

    In the units of the coordinates given (calibrated: multiply by a focal length for pixels).
    """
    x1, x2 = homogeneous(x_source), homogeneous(x_target)
    ex1 = x1 @ E.T
    etx2 = x2 @ E
    numerator = np.sum(x2 * ex1, axis=1)
    denominator = ex1[:, 0] ** 2 + ex1[:, 1] ** 2 + etx2[:, 0] ** 2 + etx2[:, 1] ** 2
    return numerator / np.sqrt(np.maximum(denominator, 1e-300))


def decompose_essential(E: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The four (R, t) with unit t that E = [t]_x R admits, up to E's scale and sign."""
    U, _, Vt = np.linalg.svd(np.asarray(E, dtype=np.float64))
    # E's sign is free, so flipping U or V keeps it valid while making both proper.
    if np.linalg.det(U) < 0:
        U = -U
    if np.linalg.det(Vt) < 0:
        Vt = -Vt
    R1 = U @ _W @ Vt
    R2 = U @ _W.T @ Vt
    t = U[:, 2] / np.linalg.norm(U[:, 2])
    return [(R1, t), (R1, -t), (R2, t), (R2, -t)]


def triangulate_depths(R: np.ndarray, t: np.ndarray, x_source: np.ndarray,
                       x_target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depths (z) of each correspondence in the source and target cameras.

    Midpoint triangulation: the depths d1, d2 minimise |d2 x_t - (d1 R x_s + t)|; the
    target depth is then the z of the source point moved into the target frame. Parallel
    rays give non-finite depths.
    """
    x1, x2 = homogeneous(x_source), homogeneous(x_target)
    a = x1 @ R.T
    b = x2
    aa = np.sum(a * a, axis=1)
    bb = np.sum(b * b, axis=1)
    ab = np.sum(a * b, axis=1)
    at = a @ t
    bt = b @ t
    det = aa * bb - ab * ab
    with np.errstate(divide='ignore', invalid='ignore'):
        d1 = (-at * bb + ab * bt) / det
    z_target = d1 * a[:, 2] + t[2]
    return d1, z_target


def choose_pose(E: np.ndarray, x_source: np.ndarray, x_target: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """Resolve the four-fold ambiguity: the (R, t) that puts most points in front of both.

    Returns R, unit t and the number of points with positive depth in both cameras.
    """
    best = None
    for R, t in decompose_essential(E):
        d_source, d_target = triangulate_depths(R, t, x_source, x_target)
        in_front = int(np.count_nonzero((d_source > 0) & (d_target > 0)))
        if best is None or in_front > best[2]:
            best = (R, t, in_front)
    return best


def rotation_compensated_parallax(R: np.ndarray, x_source: np.ndarray,
                                  x_target: np.ndarray) -> np.ndarray:
    """Angle (radians) between each target ray and its source ray rotated into the target.

    It is what only translation can explain: zero for a pure rotation whatever the scene,
    so a small median flags a motion whose translation direction is unobservable.
    """
    a = homogeneous(x_source) @ R.T
    b = homogeneous(x_target)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.arccos(np.clip(cos, -1.0, 1.0))


def _tangent_basis(t: np.ndarray) -> np.ndarray:
    """3x2 orthonormal basis of the plane perpendicular to the unit vector t."""
    helper = np.eye(3)[np.argmin(np.abs(t))]
    b1 = np.cross(t, helper)
    b1 /= np.linalg.norm(b1)
    b2 = np.cross(t, b1)
    return np.stack([b1, b2], axis=1)


def _retract(R: np.ndarray, t: np.ndarray, basis: np.ndarray, delta: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Move (R, t) by delta = (dt1, dt2, wx, wy, wz): t on its sphere, R by a left rotation."""
    t_new = t + basis @ delta[:2]
    return rotation_from_vector(delta[2:]) @ R, t_new / np.linalg.norm(t_new)


def _residuals(R, t, x1, x2, scale):
    return sampson_error(essential_from_pose(R, t), x1, x2) * scale


def _jacobian(R, t, basis, x1, x2, scale, step=1e-6):
    columns = []
    for k in range(5):
        d = np.zeros(5)
        d[k] = step
        plus = _residuals(*_retract(R, t, basis, d), x1, x2, scale)
        minus = _residuals(*_retract(R, t, basis, -d), x1, x2, scale)
        columns.append((plus - minus) / (2 * step))
    return np.stack(columns, axis=1)


def _robust_cost(r: np.ndarray, loss_scale: float | None) -> tuple[float, np.ndarray]:
    """Cauchy cost and IRLS weights of residuals r (plain least squares when no scale)."""
    if loss_scale is None:
        return float(r @ r), np.ones_like(r)
    u = (r / loss_scale) ** 2
    return float(loss_scale ** 2 * np.sum(np.log1p(u))), 1.0 / (1.0 + u)


def refine_pose(R: np.ndarray, t: np.ndarray, x_source: np.ndarray, x_target: np.ndarray,
                scale: float = 1.0, iterations: int = 10, loss_scale: float | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Polish (R, t) by Levenberg-Marquardt on the Sampson error, and return the
    first-order 6x6 covariance.

    Five degrees of freedom (rotation, and the translation direction on its sphere), so E
    stays an exact essential matrix. ``scale`` turns calibrated residuals into pixels (a
    focal length), which makes the residual variance estimate, and hence the covariance,
    independent of the calibration. With ``loss_scale`` (pixels) the cost is Cauchy
    (iteratively reweighted), so the points given may include some outliers: a hard inlier
    threshold near the noise level would otherwise drop many good matches and bias the fit.

    The covariance is ``s^2 (J^T J)^-1`` with J the Sampson-error Jacobian at the optimum
    over the points within 3 s, and s the noise level from the median absolute Sampson
    residual (1.4826 MAD), mapped to (tx,
    ty, tz, rx, ry, rz): the translation part is that of the unit vector (rank two, nothing
    along t), the rotation part a rotation vector in radians about the TARGET frame axes
    (R' = exp([w]_x) R). It is chosen over a bootstrap because it costs one Jacobian, not
    tens of RANSAC runs, and it is what the Gauss-Newton polish computes anyway; it
    describes the noise of the inliers, not the risk that the inlier set itself is wrong.
    """
    x1, x2 = homogeneous(x_source), homogeneous(x_target)
    R = np.asarray(R, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64) / np.linalg.norm(t)
    n = len(x1)
    if n < 6:
        return R, t, np.full((6, 6), np.nan)
    damping = 1e-4
    r = _residuals(R, t, x1, x2, scale)
    cost, weights = _robust_cost(r, loss_scale)
    for _ in range(iterations):
        basis = _tangent_basis(t)
        J = _jacobian(R, t, basis, x1, x2, scale)
        H = J.T @ (J * weights[:, None])
        g = J.T @ (weights * r)
        improved = False
        for _ in range(6):
            try:
                delta = -np.linalg.solve(H + damping * np.diag(np.diag(H) + 1e-12), g)
            except np.linalg.LinAlgError:
                break
            R_new, t_new = _retract(R, t, basis, delta)
            r_new = _residuals(R_new, t_new, x1, x2, scale)
            cost_new, weights_new = _robust_cost(r_new, loss_scale)
            if cost_new < cost:
                improved = cost - cost_new > 1e-10 * cost
                R, t, r, cost, weights = R_new, t_new, r_new, cost_new, weights_new
                damping = max(damping * 0.1, 1e-9)
                break
            damping *= 10.0
        if not improved:
            break
    basis = _tangent_basis(t)
    J = _jacobian(R, t, basis, x1, x2, scale)
    # The noise level from the median absolute residual (robust to the outliers the band
    # admits), then plain least squares over the points within three of it: the robust
    # weights and a residual variance taken from them would both understate the noise.
    sigma = 1.4826 * float(np.median(np.abs(r)))
    keep = np.abs(r) < 3.0 * sigma if sigma > 0 else np.ones(n, bool)
    try:
        cov5 = sigma ** 2 * np.linalg.inv(J[keep].T @ J[keep])
    except np.linalg.LinAlgError:
        cov5 = np.full((5, 5), np.nan)
    G = np.zeros((6, 5))
    G[:3, :2] = basis
    G[3:, 2:] = np.eye(3)
    return R, t, G @ cov5 @ G.T
