"""Ground-truth flow builders agree with rendered images and with closed-form geometry."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from dense_match_ros.core.geometry import grid, gt_flow


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB texture: enough structure for photometric checks, no aliasing."""
    rng = np.random.default_rng(seed)
    noise = rng.random((h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
    img = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


H_TEST = np.array([[1.08, 0.06, -4.0],
                   [-0.04, 0.93, 3.0],
                   [3e-4, -2e-4, 1.0]])


def test_homography_flow_warps_target_onto_source():
    w, h, tw, th = 72, 56, 80, 60
    source = _texture(h, w)
    # cv2.warpPerspective samples src at H^-1 x_dst with integer pixel centres, which is
    # exactly our convention: this renders the target seen through x_t ~ H x_s.
    target = cv2.warpPerspective(source, H_TEST, (tw, th), flags=cv2.INTER_LINEAR)
    flow, valid = gt_flow.flow_from_homography(H_TEST, (w, h), (tw, th))
    assert flow.dtype == np.float32 and flow.shape == (h, w, 2) and valid.dtype == bool
    # Keep well inside both images so border handling does not enter the comparison.
    inner = cv2.erode(valid.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    inner[:3], inner[-3:], inner[:, :3], inner[:, -3:] = False, False, False, False
    assert inner.mean() > 0.4
    warped = grid.warp(target, flow).astype(np.float32)
    err = np.abs(warped - source.astype(np.float32)).mean(axis=-1)[inner].mean()
    identity = np.abs(grid.warp(target, np.zeros_like(flow)).astype(np.float32)
                      - source.astype(np.float32)).mean(axis=-1)[inner].mean()
    assert err < 3.0
    assert err < identity / 5


def test_homography_flow_matches_generic_point_transform():
    size_s, size_t = (33, 21), (40, 25)
    flow, valid = gt_flow.flow_from_homography(H_TEST, size_s, size_t)
    ref, ref_valid = gt_flow.flow_from_point_transform(
        lambda p: gt_flow.apply_homography(H_TEST, p)[0], size_s, size_t)
    np.testing.assert_allclose(flow, ref, atol=1e-5)
    assert np.array_equal(valid, ref_valid)
    # And both agree with a hand computation at one pixel.
    x, y = 7, 11
    q = H_TEST @ np.array([x, y, 1.0])
    np.testing.assert_allclose(flow[y, x], q[:2] / q[2] - [x, y], atol=1e-4)


def test_homography_points_behind_are_invalid_and_size_is_respected():
    # A strong projective term sends the right part of the image through infinity.
    H = np.array([[1.0, 0, 0], [0, 1.0, 0], [-0.05, 0, 1.0]])
    flow, valid = gt_flow.flow_from_homography(H, (40, 10), (1000, 1000))
    xs = np.arange(40)
    behind = 1 - 0.05 * xs <= 0
    assert behind.any() and not valid[:, behind].any()
    assert np.isfinite(flow).all()
    # Landing outside the target is invalid too: identity into a smaller target.
    _, v_small = gt_flow.flow_from_homography(np.eye(3), (40, 30), (20, 30))
    assert v_small[:, :20].all() and not v_small[:, 21:].any()


def test_scaled_homography_commutes_with_resizing():
    old_s, new_s = (80, 60), (24, 24)
    old_t, new_t = (100, 70), (24, 24)
    H2 = gt_flow.scale_homography(H_TEST, (old_s, new_s), (old_t, new_t))
    rng = np.random.default_rng(1)
    p_new = rng.uniform(0, 23, (20, 2))
    p_old = grid.rescale_points(p_new, new_s, old_s).astype(np.float64)
    q_old, _ = gt_flow.apply_homography(H_TEST, p_old)
    expected = grid.rescale_points(q_old, old_t, new_t)
    got, _ = gt_flow.apply_homography(H2, p_new)
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_scaled_intrinsics_project_like_resized_images():
    K = np.array([[500.0, 0, 319.5], [0, 480.0, 239.5], [0, 0, 1]])
    K2 = gt_flow.scale_intrinsics(K, (640, 480), (240, 240))
    X = np.array([[0.3, -0.2, 2.0], [-1.0, 0.5, 4.0]])
    p = (X @ K.T)[:, :2] / X[:, 2:]
    p2 = (X @ K2.T)[:, :2] / X[:, 2:]
    np.testing.assert_allclose(p2, grid.rescale_points(p, (640, 480), (240, 240)), atol=1e-4)


K_CAM = np.array([[60.0, 0, 31.5], [0, 62.0, 23.5], [0, 0, 1]])


def test_depth_flow_of_fronto_parallel_plane_is_analytic_disparity():
    w, h, Z = 64, 48, 2.5
    depth = np.full((h, w), Z)
    T = np.eye(4)
    T[:3, 3] = [-0.2, 0.1, 0.0]  # target camera displaced: points shift by this in its frame
    flow, valid = gt_flow.flow_from_depth(depth, K_CAM, T, K_CAM, (w, h))
    expected = np.array([60.0 * -0.2 / Z, 62.0 * 0.1 / Z])
    np.testing.assert_allclose(flow[valid], np.broadcast_to(expected, flow[valid].shape), atol=1e-4)
    # Exactly the pixels whose shifted position stays in the image are valid.
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    inside = (xs + expected[0] >= -0.5) & (ys + expected[1] <= h - 0.5)
    assert np.array_equal(valid, inside)
    # Forward motion along the axis: flow radiates from the principal point.
    T2 = np.eye(4)
    T2[2, 3] = -0.5
    f2, v2 = gt_flow.flow_from_depth(depth, K_CAM, T2, K_CAM, (w, h))
    r = np.stack([xs - 31.5, ys - 23.5], -1)
    np.testing.assert_allclose(f2[v2], (r * (Z / (Z - 0.5) - 1))[v2], atol=1e-4)


def test_depth_flow_under_pure_rotation_is_the_infinite_homography():
    w, h = 64, 48
    rng = np.random.default_rng(3)
    depth = rng.uniform(0.5, 8.0, (h, w))  # any depth: rotation flow does not depend on it
    depth[5, 7] = 0.0
    R, _ = cv2.Rodrigues(np.array([0.03, -0.05, 0.02]))
    T = np.eye(4)
    T[:3, :3] = R
    K_t = K_CAM.copy()
    K_t[0, 0] = 55.0
    flow, valid = gt_flow.flow_from_depth(depth, K_CAM, T, K_t, (w, h))
    H = K_t @ R @ np.linalg.inv(K_CAM)
    ref, ref_valid = gt_flow.flow_from_homography(H, (w, h), (w, h))
    np.testing.assert_allclose(flow[valid], ref[valid], atol=1e-4)
    ref_valid[5, 7] = False  # unknown depth is never valid
    assert np.array_equal(valid, ref_valid)


def test_depth_flow_marks_occluded_and_unverifiable_pixels():
    w, h, Z = 40, 30, 3.0
    depth = np.full((h, w), Z)
    T = np.eye(4)
    T[0, 3] = 0.05
    dx = 60.0 * 0.05 / Z
    depth_t = np.full((h, w), Z)
    depth_t[10:20, 10:20] = 1.0       # an occluder in front, seen only by the target
    depth_t[0:5, 30:35] = 0.0         # a hole in the target depth
    flow, valid = gt_flow.flow_from_depth(depth, K_CAM, T, K_CAM, (w, h), depth_target=depth_t)
    _, no_check = gt_flow.flow_from_depth(depth, K_CAM, T, K_CAM, (w, h))
    land_x = np.rint(np.arange(w) + dx).astype(int)
    occluded_cols = (land_x >= 10) & (land_x < 20)
    assert not valid[10:20][:, occluded_cols].any()
    assert no_check[10:20][:, occluded_cols].all()
    assert not valid[0:5][:, (land_x >= 30) & (land_x < 35)].any()
    # Elsewhere the check changes nothing; a depth mismatch within tolerance is accepted.
    untouched = no_check.copy()
    untouched[10:20][:, occluded_cols] = False
    untouched[0:5][:, (land_x >= 30) & (land_x < 35)] = False
    assert np.array_equal(valid, untouched)
    _, tol_ok = gt_flow.flow_from_depth(depth, K_CAM, T, K_CAM, (w, h),
                                        depth_target=np.full((h, w), Z * 1.03))
    assert np.array_equal(tol_ok, no_check)
    with pytest.raises(ValueError):
        gt_flow.flow_from_depth(depth, K_CAM, T, K_CAM, (w, h), depth_target=np.ones((3, 3)))


def test_hpatches_homography_at_240_aligns_the_real_pair(shared_data):
    """Real data: the scaled HPatches homography warps image 2 onto image 1 at 240x240."""
    folder = shared_data / 'hpatches_v_machines'
    img1 = cv2.cvtColor(cv2.imread(str(folder / '1.ppm')), cv2.COLOR_BGR2GRAY)
    img2 = cv2.cvtColor(cv2.imread(str(folder / '2.ppm')), cv2.COLOR_BGR2GRAY)
    H = np.loadtxt(folder / 'H_1_2.txt')
    size1, size2 = img1.shape[1::-1], img2.shape[1::-1]
    small = (240, 240)
    a = cv2.resize(img1, small, interpolation=cv2.INTER_AREA).astype(np.float32)
    b = cv2.resize(img2, small, interpolation=cv2.INTER_AREA).astype(np.float32)
    H240 = gt_flow.scale_homography(H, (size1, small), (size2, small))
    flow, valid = gt_flow.flow_from_homography(H240, small, small)
    inner = cv2.erode(valid.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert 0.3 < inner.mean() < 1.0
    err = np.abs(grid.warp(b, flow) - a)[inner].mean()
    identity = np.abs(b - a)[inner].mean()
    assert err < 0.4 * identity, (err, identity)
    # The scaled matrix is the full-resolution one seen through the two resizes.
    p = np.array([[10.0, 20.0], [200.0, 100.0]])
    q_full, _ = gt_flow.apply_homography(H, grid.rescale_points(p, small, size1).astype(np.float64))
    q_small, _ = gt_flow.apply_homography(H240, p)
    np.testing.assert_allclose(q_small, grid.rescale_points(q_full, size2, small), atol=1e-3)
