"""Relative pose from correspondences and from dense flow: accuracy, direction, verdicts."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from dense_match_ros.core.geometry import essential
from dense_match_ros.evaluation import metrics
from dense_match_ros.core.geometry.pose import (PoseConfig, estimate_from_correspondences,
                                       estimate_relative_pose, select_correspondences,
                                       spread_sample)
from dense_match_ros.evaluation.pose_eval import random_rotation, random_scene

MSG = Path(__file__).resolve().parents[1] / 'msg' / 'RelativePose.msg'


def _errors(estimate, scene):
    return (metrics.rotation_error_deg(estimate.R, scene.R),
            metrics.translation_direction_error_deg(estimate.t, scene.t))


# --------------------------------------------------------------------------- acceptance

@pytest.mark.parametrize('seed', range(20))
def test_default_estimator_meets_acceptance_on_random_scenes(seed):
    scene = random_scene(1000 + seed, n=2000, noise_px=1.0, outlier_ratio=0.3)
    est = estimate_from_correspondences(scene.points_source, scene.points_target,
                                        scene.K, scene.K, rng=seed)
    rot, tra = _errors(est, scene)
    assert est.valid, est.status
    assert rot < 0.5 and tra < 2.0, (rot, tra)
    # The inlier mask finds the planted outliers: almost no outlier is called an inlier.
    assert np.mean(est.inlier_mask[scene.is_outlier]) < 0.02


@pytest.mark.parametrize('estimator', ['opencv-ransac', 'opencv-magsac', 'kornia', 'dgc-5x1000'])
@pytest.mark.parametrize('seed', range(2))
def test_other_estimators_meet_acceptance(estimator, seed):
    scene = random_scene(2000 + seed, n=1000, noise_px=1.0, outlier_ratio=0.3)
    config = PoseConfig(estimator=estimator, device='cpu')
    est = estimate_from_correspondences(scene.points_source, scene.points_target,
                                        scene.K, scene.K, config=config, rng=seed)
    rot, tra = _errors(est, scene)
    assert est.valid, est.status
    assert rot < 0.5 and tra < 2.0, (estimator, rot, tra)


def test_every_estimator_exact_on_noise_free_points():
    scene = random_scene(7, n=300, noise_px=0.0, outlier_ratio=0.0)
    for name in PoseConfig.estimators():
        est = estimate_from_correspondences(scene.points_source, scene.points_target, scene.K,
                                            scene.K, config=PoseConfig(estimator=name, device='cpu'))
        rot, tra = _errors(est, scene)
        assert est.status == 'ok' and rot < 1e-3 and tra < 1e-2, (name, rot, tra)


# --------------------------------------------------------------------------- direction

def test_transform_maps_source_frame_points_to_target_frame():
    rng = np.random.default_rng(3)
    R = random_rotation(rng, 10.0)
    t_metric = np.array([0.3, -0.1, 0.05])
    K_s = np.array([[520.0, 0, 319.5], [0, 515.0, 239.5], [0, 0, 1]])
    K_t = np.array([[610.0, 0, 330.0], [0, 600.0, 250.0], [0, 0, 1]])  # a different camera
    px = np.stack([rng.uniform(0, 639, 400), rng.uniform(0, 479, 400)], axis=1)
    X_s = np.c_[px, np.ones(400)] @ np.linalg.inv(K_s).T * rng.uniform(2, 6, (400, 1))
    X_t = X_s @ R.T + t_metric
    uv_t = X_t @ K_t.T
    uv_t = uv_t[:, :2] / uv_t[:, 2:]
    est = estimate_from_correspondences(px, uv_t, K_s, K_t)
    assert est.valid, est.status
    assert np.isclose(np.linalg.norm(est.t), 1.0)
    # Scale is unobservable: give it the true length, then the points must line up.
    mapped = X_s @ est.R.T + est.t * np.linalg.norm(t_metric)
    assert np.max(np.linalg.norm(mapped - X_t, axis=1)) < 1e-4
    # Swapping the images gives the inverse transform.
    back = estimate_from_correspondences(uv_t, px, K_t, K_s)
    assert metrics.rotation_error_deg(back.R, est.R.T) < 1e-3
    assert metrics.translation_direction_error_deg(back.t, -est.R.T @ est.t) < 1e-2
    # E is [t]_x R and satisfies the epipolar constraint in calibrated coordinates.
    assert np.allclose(est.E, essential.skew(est.t) @ est.R)
    x1 = essential.normalize_points(px, K_s)
    x2 = essential.normalize_points(uv_t, K_t)
    assert np.max(np.abs(np.sum(essential.homogeneous(x2) * (essential.homogeneous(x1) @ est.E.T),
                                axis=1))) < 1e-6


def test_four_fold_decomposition_and_cheirality():
    rng = np.random.default_rng(5)
    R = random_rotation(rng, 30.0)
    t = np.array([0.6, 0.2, -0.3])
    t /= np.linalg.norm(t)
    E = essential.essential_from_pose(R, t) * -2.5  # any scale and sign
    candidates = essential.decompose_essential(E)
    assert len(candidates) == 4
    matches = [np.allclose(Rc, R, atol=1e-9) and np.allclose(tc, t)
               for Rc, tc in candidates]
    assert sum(matches) == 1
    for Rc, tc in candidates:
        assert np.isclose(np.linalg.det(Rc), 1.0) and np.isclose(np.linalg.norm(tc), 1.0)
        En = essential.essential_from_pose(Rc, tc)
        assert min(np.abs(En / np.linalg.norm(En) - E / np.linalg.norm(E)).max(),
                   np.abs(En / np.linalg.norm(En) + E / np.linalg.norm(E)).max()) < 1e-9
    X = np.c_[rng.uniform(-1, 1, (50, 2)), rng.uniform(3, 5, 50)]
    Xt = X @ R.T + t
    R_best, t_best, in_front = essential.choose_pose(E, X[:, :2] / X[:, 2:], Xt[:, :2] / Xt[:, 2:])
    assert in_front == 50
    assert np.allclose(R_best, R, atol=1e-9) and np.allclose(t_best, t)
    # Points behind the cameras flip the choice: the test is really about depth signs.
    Xb = -X
    Xbt = Xb @ R.T + t
    _, _, in_front_true = essential.choose_pose(E, Xb[:, :2] / Xb[:, 2:], Xbt[:, :2] / Xbt[:, 2:])
    d1, d2 = essential.triangulate_depths(R, t, Xb[:, :2] / Xb[:, 2:], Xbt[:, :2] / Xbt[:, 2:])
    assert np.all(d1 < 0) and in_front_true > np.count_nonzero((d1 > 0) & (d2 > 0))


# --------------------------------------------------------------------------- verdicts

def test_pure_rotation_is_degenerate_motion():
    scene = random_scene(11, n=800, noise_px=0.5, outlier_ratio=0.2, translation=np.zeros(3))
    est = estimate_from_correspondences(scene.points_source, scene.points_target, scene.K, scene.K)
    assert not est.valid and est.status.startswith('degenerate_motion'), est.status
    # The rotation itself is still right: only the translation is unobservable.
    assert metrics.rotation_error_deg(est.R, scene.R) < 0.5
    # And the threshold is a parameter.
    relaxed = estimate_from_correspondences(scene.points_source, scene.points_target,
                                            scene.K, scene.K, config=PoseConfig(min_parallax_deg=0.0))
    assert relaxed.status == 'ok'


def test_points_in_one_small_patch_are_degenerate_spread():
    scene = random_scene(12, n=8000, noise_px=0.3, outlier_ratio=0.0)
    patch = (np.abs(scene.points_source[:, 0] - 320) < 25) & (np.abs(scene.points_source[:, 1] - 240) < 25)
    assert patch.sum() > 30
    est = estimate_from_correspondences(scene.points_source[patch], scene.points_target[patch],
                                        scene.K, scene.K, image_size=scene.size)
    assert not est.valid and est.status.startswith('degenerate_spread'), est.status
    full = estimate_from_correspondences(scene.points_source, scene.points_target, scene.K, scene.K,
                                         image_size=scene.size)
    assert full.status == 'ok' and full.spread > 0.2


def test_too_few_and_missing_calibration():
    scene = random_scene(13, n=20, noise_px=0.0, outlier_ratio=0.0)
    est = estimate_from_correspondences(scene.points_source, scene.points_target, scene.K, scene.K)
    assert est.status.startswith('too_few_correspondences') and not est.valid
    assert est.num_correspondences == 20
    ok = estimate_from_correspondences(scene.points_source, scene.points_target, scene.K, scene.K,
                                       config=PoseConfig(min_correspondences=10, min_inliers=10,
                                                         min_spread=0.0))
    assert ok.status == 'ok'
    for bad_K in (None, np.zeros((3, 3)), np.full((3, 3), np.nan)):
        est = estimate_from_correspondences(scene.points_source, scene.points_target, bad_K, scene.K)
        assert est.status.startswith('no_camera_info') and not est.valid
    flow = np.zeros((8, 8, 2), np.float32)
    assert estimate_relative_pose(flow, np.ones((8, 8)), scene.K, None).status.startswith('no_camera_info')
    with pytest.raises(ValueError, match='HxWx2'):
        estimate_relative_pose(flow, np.ones((8, 9)), scene.K, scene.K)


def test_unrelated_points_give_too_few_inliers():
    rng = np.random.default_rng(14)
    a = rng.uniform(0, 639, (200, 2))
    b = rng.uniform(0, 639, (200, 2))
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    est = estimate_from_correspondences(a, b, K, K, config=PoseConfig(min_inliers=40))
    assert not est.valid and est.status.startswith('too_few_inliers'), est.status


def test_statuses_are_those_of_the_message():
    text = MSG.read_text()
    declared = set(re.findall(r'^string STATUS_\w+="(\w+)"', text, flags=re.M))
    from dense_match_ros.core.geometry import pose
    ours = {v for k, v in vars(pose).items() if k.startswith('STATUS_')}
    assert ours == declared


def test_config_rejects_unknown_estimator_and_lists_names():
    assert set(PoseConfig.estimators()) >= {'opencv-ransac', 'opencv-magsac', 'poselib',
                                             'kornia', 'dgc-5x1000'}
    assert PoseConfig().estimator in PoseConfig.estimators()
    with pytest.raises(ValueError, match='unknown pose estimator'):
        PoseConfig(estimator='nope')


# --------------------------------------------------------------------------- distortion

def test_distorted_points_need_and_get_undistortion():
    scene = random_scene(15, n=1500, noise_px=0.3, outlier_ratio=0.1, max_rotation_deg=5)
    D = np.array([-0.28, 0.09, 0.001, -0.0005, 0.0])

    def distort(points):
        x = essential.normalize_points(points, scene.K)
        out, _ = cv2.projectPoints(np.c_[x, np.ones(len(x))], np.zeros(3), np.zeros(3), scene.K, D)
        return out.reshape(-1, 2)

    ps, pt = distort(scene.points_source), distort(scene.points_target)
    assert np.median(np.linalg.norm(ps - scene.points_source, axis=1)) > 5  # a strong lens
    with_d = estimate_from_correspondences(ps, pt, scene.K, scene.K, dist_source=D, dist_target=D)
    rot, tra = _errors(with_d, scene)
    assert with_d.valid and rot < 0.3 and tra < 2.0, (rot, tra)
    # The pixels returned are the ones given (distorted), not the undistorted ones.
    assert np.allclose(with_d.points_source, ps)
    without = estimate_from_correspondences(ps, pt, scene.K, scene.K)
    assert without.num_inliers < 0.8 * with_d.num_inliers


# --------------------------------------------------------------------------- covariance

def test_covariance_shape_gauge_and_noise_scaling():
    stds = []
    for noise in (0.5, 2.0):
        scene = random_scene(16, n=1500, noise_px=noise, outlier_ratio=0.0)
        est = estimate_from_correspondences(scene.points_source, scene.points_target, scene.K,
                                            scene.K, config=PoseConfig(ransac_threshold_px=3 * noise))
        C = est.covariance
        assert C.shape == (6, 6) and np.allclose(C, C.T)
        assert np.all(np.linalg.eigvalsh(C) > -1e-15)
        # Nothing along the unit translation itself: its length is fixed.
        assert np.abs(C[:3, :3] @ est.t).max() < 1e-9 * np.abs(C[:3, :3]).max() + 1e-18
        stds.append(np.sqrt(np.trace(C[3:, 3:])))
        # The predicted rotation spread is the right order of magnitude for the actual error.
        err = np.radians(metrics.rotation_error_deg(est.R, scene.R))
        assert err < 6 * stds[-1]
    assert 2.5 < stds[1] / stds[0] < 6.0  # 4x the noise


# --------------------------------------------------------------------------- from flow

def _flow_scene(seed=21, size=(160, 120)):
    """A smooth random depth map, a known motion and the flow they induce."""
    rng = np.random.default_rng(seed)
    w, h = size
    K = np.array([[150.0, 0, (w - 1) / 2], [0, 150.0, (h - 1) / 2], [0, 0, 1]])
    depth = cv2.resize(rng.uniform(2, 6, (4, 5)), (w, h), interpolation=cv2.INTER_CUBIC)
    R = random_rotation(rng, 5.0)
    t = np.array([0.25, 0.05, 0.1])
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    X = np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(K).T * depth[..., None]
    Xt = X @ R.T + t
    uv = Xt @ K.T
    flow = (uv[..., :2] / uv[..., 2:] - np.stack([xs, ys], -1)).astype(np.float32)
    return flow, K, R, t / np.linalg.norm(t)


def test_pose_from_flow_and_matchability_selection():
    flow, K, R, t = _flow_scene()
    h, w = flow.shape[:2]
    matchability = np.ones((h, w), np.float32)
    matchability[:, : w // 3] = 0.2  # below threshold: must never be used
    rng = np.random.default_rng(0)
    bad = rng.random((h, w)) < 0.3
    noisy = flow + np.where(bad[..., None], rng.uniform(-30, 30, flow.shape), 0).astype(np.float32)
    config = PoseConfig(max_correspondences=1500)
    est = estimate_relative_pose(noisy, matchability, K, K, config=config, rng=1)
    assert est.valid, est.status
    assert metrics.rotation_error_deg(est.R, R) < 0.2
    assert metrics.translation_direction_error_deg(est.t, t) < 1.0
    assert est.num_correspondences == 1500
    assert est.points_source[:, 0].min() >= w // 3
    # Target points are source + flow at the selected pixels.
    xi, yi = est.points_source.astype(int).T
    assert np.allclose(est.points_target, est.points_source + noisy[yi, xi])
    # Same seed, same answer.
    again = estimate_relative_pose(noisy, matchability, K, K, config=config, rng=1)
    assert np.array_equal(again.inlier_mask, est.inlier_mask) and np.allclose(again.R, est.R)


def test_spread_sample_caps_and_fills_every_cell():
    rng = np.random.default_rng(0)
    # 95 % of the points crowd one corner; the rest are spread out.
    crowd = rng.uniform(0, 10, (9500, 2))
    spread = rng.uniform(0, 100, (500, 2))
    points = np.concatenate([crowd, spread])
    keep = spread_sample(points, 400, (10, 10), (0, 0, 100, 100), rng)
    assert len(keep) == 400 and len(np.unique(keep)) == 400
    chosen = points[keep]
    cells = set(map(tuple, (chosen // 10).astype(int)))
    occupied = set(map(tuple, (points // 10).astype(int)))
    assert cells == occupied
    assert np.mean(np.all(chosen < 10, axis=1)) < 0.1  # the crowd does not dominate
    assert len(spread_sample(points[:50], 400, (10, 10), (0, 0, 100, 100), rng)) == 50
    # With a priority each cell gives its highest-priority points first.
    priority = rng.random(len(points))
    ranked = spread_sample(points, 400, (10, 10), (0, 0, 100, 100), rng, priority=priority)
    assert set(map(tuple, (points[ranked] // 10).astype(int))) == occupied
    crowd_kept = ranked[ranked < 9500]
    assert priority[crowd_kept].min() > np.quantile(priority[:9500], 0.9)


def test_selection_from_a_large_flow_is_capped_spread_and_follows_matchability():
    # 640x480: the lattice thinning must keep the cap filled, every region represented,
    # and only confident pixels, with target points exactly source + flow.
    h, w = 480, 640
    rng = np.random.default_rng(3)
    flow = rng.normal(0, 2, (h, w, 2)).astype(np.float32)
    matchability = np.ones((h, w), np.float32)
    matchability[:, : w // 4] = 0.0                       # left quarter unmatchable
    config = PoseConfig(max_correspondences=2000)
    src, tgt = select_correspondences(flow, matchability, config, rng)
    assert len(src) == 2000 and len(np.unique(src, axis=0)) == 2000
    assert src[:, 0].min() >= w // 4
    xi, yi = src[:, 0].astype(int), src[:, 1].astype(int)
    np.testing.assert_allclose(tgt, src + flow[yi, xi], atol=1e-4)
    cols, rows = config.spread_grid
    cells = set(zip((src[:, 0] * cols // w).astype(int), (src[:, 1] * rows // h).astype(int)))
    expected = {(c, r) for c in range(cols) for r in range(rows) if (c + 1) * w / cols > w // 4 + 1}
    assert expected <= cells
