"""Parametric transforms: closed-form properties, numpy/torch agreement, pixel conventions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dense_match_ros.core.geometry import grid, gt_flow, transforms as tf


def _random_points(rng: np.random.Generator, n: int = 50) -> np.ndarray:
    return rng.uniform(-1.2, 1.2, (n, 2))


def test_tps_identity_is_identity_and_interpolates_control_points():
    rng = np.random.default_rng(0)
    pts = _random_points(rng)
    np.testing.assert_allclose(tf.apply_tps(tf.tps_identity(), pts), pts, atol=1e-12)
    ctrl = tf.tps_control_points()
    # CNNGeo's layout: x-major control grid, x's then y's.
    assert ctrl[:, 0].tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1]
    assert ctrl[:, 1].tolist() == [-1, 0, 1, -1, 0, 1, -1, 0, 1]
    for seed in range(5):
        theta = tf.tps_identity() + np.random.default_rng(seed).uniform(-0.4, 0.4, 18)
        moved = tf.apply_tps(theta, ctrl)
        np.testing.assert_allclose(moved, np.stack([theta[:9], theta[9:]], 1), atol=1e-10)
        # Between control points it is smooth, not the identity.
        assert np.abs(tf.apply_tps(theta, pts) - pts).max() > 1e-3


def test_tps_reproduces_affine_displacements_exactly():
    # A TPS whose control points move affinely has zero bending: it IS that affine.
    theta_aff = tf.affine_theta(0.2, 0.3, 1.1, 0.9, 0.05, -0.1)
    ctrl = tf.tps_control_points()
    q = tf.apply_affine(theta_aff, ctrl)
    theta_tps = np.concatenate([q[:, 0], q[:, 1]])
    pts = _random_points(np.random.default_rng(1))
    np.testing.assert_allclose(tf.apply_tps(theta_tps, pts), tf.apply_affine(theta_aff, pts),
                               atol=1e-10)
    with pytest.raises(ValueError):
        tf.apply_tps(np.zeros(10), pts)


def test_affine_composition_follows_cnngeo():
    a = 0.3
    theta = tf.affine_theta(rotation=a)
    np.testing.assert_allclose(theta, [np.cos(a), -np.sin(a), 0, np.sin(a), np.cos(a), 0],
                               atol=1e-12)
    theta = tf.affine_theta(rotation=0.1, shear=0.5, scale_x=1.2, scale_y=0.8, tx=0.2, ty=-0.1)
    A = theta.reshape(2, 3)[:, :2]
    assert np.isclose(np.linalg.det(A), 1.2 * 0.8)
    # Singular values are the two scales: shear axes, not a skew matrix.
    np.testing.assert_allclose(np.linalg.svd(A, compute_uv=False), [1.2, 0.8], atol=1e-12)
    np.testing.assert_allclose(tf.apply_affine(theta, np.zeros((1, 2))), [[0.2, -0.1]])


def test_homography_from_points_and_frame_changes():
    rng = np.random.default_rng(2)
    dst = tf.CORNERS + rng.uniform(-0.5, 0.5, (4, 2))
    H = tf.homography_from_points(tf.CORNERS, dst)
    mapped, w = tf.apply_homography(H, tf.CORNERS)
    np.testing.assert_allclose(mapped, dst, atol=1e-10)
    assert (w > 0).all()
    # normalisation_matrix is grid.pixels_to_normalized as a matrix.
    size = (37, 23)
    px = rng.uniform(0, 30, (10, 2))
    n_mat, _ = tf.apply_homography(tf.normalization_matrix(size), px)
    np.testing.assert_allclose(n_mat, grid.pixels_to_normalized(px, *size), atol=1e-6)
    np.testing.assert_allclose(tf.to_pixels(tf.to_normalized(px, size), size), px, atol=1e-12)
    # Pixel <-> normalised homographies describe the same map.
    H_pix = tf.homography_to_pixels(H, (40, 30), (50, 20))
    q_pix, _ = tf.apply_homography(H_pix, px)
    q_norm, _ = tf.apply_homography(H, tf.to_normalized(px, (40, 30)))
    np.testing.assert_allclose(q_pix, tf.to_pixels(q_norm, (50, 20)), atol=1e-9)
    np.testing.assert_allclose(tf.homography_to_normalized(H_pix, (40, 30), (50, 20)),
                               H / H[2, 2], atol=1e-12)


def test_torch_and_numpy_transforms_agree():
    rng = np.random.default_rng(3)
    b = 3
    pts = rng.uniform(-1.1, 1.1, (b, 4, 5, 2))
    thetas_aff = np.stack([tf.affine_theta(*rng.uniform(-0.3, 0.3, 2), *rng.uniform(0.8, 1.2, 2),
                                           *rng.uniform(-0.2, 0.2, 2)) for _ in range(b)])
    thetas_tps = tf.tps_identity() + rng.uniform(-0.4, 0.4, (b, 18))
    thetas_hom = np.stack([tf.homography_from_points(tf.CORNERS, tf.CORNERS + rng.uniform(-.4, .4, (4, 2)))
                           for _ in range(b)])
    t = torch.from_numpy
    got_aff = tf.apply_affine_torch(t(thetas_aff), t(pts)).numpy()
    got_tps = tf.apply_tps_torch(t(thetas_tps), t(pts)).numpy()
    got_hom, w = tf.apply_homography_torch(t(thetas_hom), t(pts))
    for i in range(b):
        np.testing.assert_allclose(got_aff[i], tf.apply_affine(thetas_aff[i], pts[i]), atol=1e-12)
        np.testing.assert_allclose(got_tps[i], tf.apply_tps(thetas_tps[i], pts[i]), atol=1e-10)
        ref, ref_w = tf.apply_homography(thetas_hom[i], pts[i])
        np.testing.assert_allclose(got_hom[i].numpy(), ref, atol=1e-10)
        np.testing.assert_allclose(w[i].numpy(), ref_w, atol=1e-12)
    # float32 keeps working (the training dtype) and stays close.
    got32 = tf.apply_tps_torch(t(thetas_tps).float(), t(pts).float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), got_tps, atol=1e-5)


def test_torch_affine_grid_matches_pytorch_and_tps_is_differentiable():
    theta = torch.from_numpy(tf.affine_theta(0.2, 0.1, 1.1, 0.9, 0.1, -0.05)[None])
    ours = tf.sampling_grid_torch('affine', theta, (7, 9))
    ref = F.affine_grid(theta.view(1, 2, 3), (1, 1, 7, 9), align_corners=False)
    assert ours.shape == (1, 7, 9, 2)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    theta_tps = torch.tensor(tf.tps_identity()[None], requires_grad=True)
    g = tf.sampling_grid_torch('tps', theta_tps, (5, 6))
    torch.testing.assert_close(g, tf.base_grid_torch(5, 6, dtype=torch.float64), atol=1e-10, rtol=0)
    g.sum().backward()
    assert theta_tps.grad is not None and torch.isfinite(theta_tps.grad).all()
    with pytest.raises(ValueError):
        tf.sampling_grid_torch('spline', theta_tps, (5, 6))


@pytest.mark.parametrize('kind', ['affine', 'tps', 'homography'])
def test_torch_grid_sample_matches_numpy_flow_warp(kind):
    """grid_sample(target, grid) and grid.warp(target, gt flow) render the same source."""
    rng = np.random.default_rng(4)
    th, tw, h, w = 30, 40, 24, 28
    target = (rng.random((th, tw, 3)) * 255).astype(np.float32)
    if kind == 'affine':
        theta = tf.affine_theta(0.2, 0.3, 0.9, 1.1, 0.1, -0.1)
        flow, valid = gt_flow.flow_from_affine(theta, (w, h), (tw, th))
        t_theta = torch.from_numpy(theta)[None]
    elif kind == 'tps':
        theta = tf.tps_identity() + rng.uniform(-0.3, 0.3, 18)
        flow, valid = gt_flow.flow_from_tps(theta, (w, h), (tw, th))
        t_theta = torch.from_numpy(theta)[None]
    else:
        theta = tf.homography_from_points(tf.CORNERS, tf.CORNERS + rng.uniform(-.3, .3, (4, 2)))
        flow, valid = gt_flow.flow_from_normalized_homography(theta, (w, h), (tw, th))
        t_theta = torch.from_numpy(theta)[None]
    grid_t = tf.sampling_grid_torch(kind, t_theta, (h, w))
    img = torch.from_numpy(target).permute(2, 0, 1)[None].double()
    rendered = F.grid_sample(img, grid_t, mode='bilinear', padding_mode='zeros',
                             align_corners=False)[0].permute(1, 2, 0).numpy()
    warped = grid.warp(target, flow)
    # Compare where the bilinear footprint is fully inside (borders differ by convention).
    m = grid.flow_to_map(flow)
    inside = valid & (m[..., 0] >= 0) & (m[..., 0] <= tw - 1) & (m[..., 1] >= 0) & (m[..., 1] <= th - 1)
    assert inside.mean() > 0.5
    # cv2.remap quantises sub-pixel positions to 1/32 px, hence the tolerance.
    assert np.abs(rendered - warped)[inside].max() < 255 / 32 * 1.5
    assert np.abs(rendered - warped)[inside].mean() < 1.0


def test_forward_backward_consistency_scores_the_round_trip():
    """A round trip back to the start scores 1, one that misses by sigma 0.37, and a
    forward flow out of the target 0 (the matchability rule of every two-way method)."""
    h, w = 20, 30
    forward = np.zeros((h, w, 2), np.float32)
    forward[..., 0] = 2.0
    backward = np.zeros((h, w, 2), np.float32)
    backward[..., 0] = -2.0
    score = grid.forward_backward_consistency(forward, backward, sigma=1.5)
    assert score.dtype == np.float32
    np.testing.assert_allclose(score[:, :-3], 1.0, atol=1e-6)
    assert (score[:, -2:] == 0).all()   # x + 2 beyond the last column: no match there
    backward[..., 1] = 1.5               # every round trip now misses by 1.5 px
    score = grid.forward_backward_consistency(forward, backward, sigma=1.5)
    np.testing.assert_allclose(score[:, :-3], np.exp(-1.0), rtol=1e-5)


@pytest.mark.parametrize('size,target_scale', [((50, 30), (1.0, 1.0)), ((31, 77), (1.0, 1.0)),
                                               ((50, 30), (0.5, 2.0)), ((17, 64), (1.3, 0.7))])
def test_resize_flow_moves_every_new_pixel_centre_to_its_target_point(size, target_scale):
    """The new flow at pixel x is where x's position on the old grid lands, in the rescaled
    target: (x + .5) / s - .5 + d, mapped by (p + .5) t - .5, minus x (exactly, for a flow
    that is constant, so interpolation cannot blur it)."""
    flow = np.zeros((24, 40, 2), np.float32)
    flow[..., 0], flow[..., 1] = 3.25, -1.5
    out = grid.resize_flow(flow, size, target_scale)
    (w, h), (nw, nh) = (40, 24), size
    s = np.array([nw / w, nh / h])
    t = s * np.array(target_scale)
    x = grid.pixel_coords(nh, nw)
    expected = (((x + 0.5) / s - 0.5 + np.array([3.25, -1.5])) + 0.5) * t - 0.5 - x
    assert out.shape == (nh, nw, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_in_bounds_counts_the_outer_half_pixel_and_refuses_nan():
    flow = np.zeros((3, 4, 2), np.float32)
    flow[0, 0] = (-0.5, -0.5)          # on the edge: inside
    flow[0, 1] = (-1.51, 0.0)          # x = -0.51: outside
    flow[2, 3] = (0.5, 0.5)            # (3.5, 2.5): the far corner, inside
    flow[1, 1] = (np.nan, 0.0)
    inside = grid.in_bounds(flow, (4, 3))
    assert inside.dtype == bool
    assert inside[0, 0] and not inside[0, 1] and inside[2, 3] and not inside[1, 1]
    assert inside.sum() == 10
