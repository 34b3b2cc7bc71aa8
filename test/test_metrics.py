"""Metrics and flow colouring against values worked out by hand on tiny arrays."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dense_match_ros.core import flowviz
from dense_match_ros.evaluation import metrics


def _flow(*vectors) -> np.ndarray:
    """1xN flow field from (u, v) pairs."""
    return np.array([vectors], dtype=np.float32)


# --------------------------------------------------------------------------- pose


def _rot_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def test_rotation_error_is_the_relative_angle():
    assert metrics.rotation_error_deg(_rot_z(30), np.eye(3)) == pytest.approx(30.0)
    assert metrics.rotation_error_deg(_rot_z(10), _rot_z(-25)) == pytest.approx(35.0)
    assert metrics.rotation_error_deg(_rot_z(180), np.eye(3)) == pytest.approx(180.0)
    # Identical rotations: rounding must not produce NaN from arccos(1 + eps).
    R = _rot_z(17.3) @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])
    assert metrics.rotation_error_deg(R, R.copy()) == pytest.approx(0.0, abs=1e-5)


def test_translation_direction_error_ignores_scale_but_not_sign():
    assert metrics.translation_direction_error_deg([2, 0, 0], [0.1, 0, 0]) == pytest.approx(0.0)
    assert metrics.translation_direction_error_deg([1, 0, 0], [0, 3, 0]) == pytest.approx(90.0)
    assert metrics.translation_direction_error_deg([1, 0, 0], [-1, 0, 0]) == pytest.approx(180.0)
    assert metrics.translation_direction_error_deg([1, 1, 0], [1, 0, 0]) == pytest.approx(45.0)
    assert math.isnan(metrics.translation_direction_error_deg([0, 0, 0], [1, 0, 0]))


def test_pose_error_is_the_max_and_failures_are_infinite():
    assert metrics.pose_error_deg(3.0, 7.0) == 7.0
    assert metrics.pose_error_deg(None, 1.0) == math.inf
    assert metrics.pose_error_deg(float('nan'), 1.0) == math.inf


def test_pose_auc_hand_computed():
    # errors 1, 1, 1 and a failure; T = 5: the curve runs (0, 0) -> (1, 0.25), steps up
    # to 0.75 at 1 deg (ties) and stays flat: 0.5 * 0.25 + 4 * 0.75 = 3.125 -> / 5 = 0.625.
    auc = metrics.pose_auc([1.0, 1.0, 1.0, None], thresholds=(5,))
    assert auc == {'auc@5': pytest.approx(0.625)}
    # errors 0 and 10, T = 20: (0,0)->(0,.5)->(10,1)->(20,1): 7.5 + 10 = 17.5 -> 0.875;
    # T = 5 only sees the 0: flat 0.5 -> 0.5. T = 10 excludes the error equal to it.
    auc = metrics.pose_auc([10.0, 0.0], thresholds=(5, 10, 20))
    assert auc['auc@5'] == pytest.approx(0.5)
    assert auc['auc@10'] == pytest.approx(0.5)
    assert auc['auc@20'] == pytest.approx(0.875)
    assert metrics.pose_auc([0.0, 0.0])['auc@10'] == pytest.approx(1.0)
    assert metrics.pose_auc([math.inf, float('nan')])['auc@20'] == 0.0
    assert math.isnan(metrics.pose_auc([])['auc@5'])


# --------------------------------------------------------------------------- flow


def test_epe_aepe_and_pck_on_three_pixels():
    gt = _flow((0, 0), (0, 0), (0, 0))
    est = _flow((3, 4), (0, 1), (0, 0))          # EPE 5, 1, 0
    np.testing.assert_allclose(metrics.end_point_error(est, gt), [[5, 1, 0]])
    assert metrics.aepe(est, gt) == pytest.approx(2.0)
    assert metrics.pck(est, gt, threshold=1.0) == pytest.approx(1 / 3)   # strictly below
    assert metrics.pck(est, gt, threshold=3.0) == pytest.approx(2 / 3)
    assert metrics.pck(est, gt, threshold=10.0) == pytest.approx(1.0)
    valid = np.array([[False, True, True]])
    assert metrics.aepe(est, gt, valid) == pytest.approx(0.5)
    np.testing.assert_allclose(metrics.pck_curve(est, gt, valid, [0.5, 1.0, 1.5]), [0.5, 0.5, 1.0])
    assert math.isnan(metrics.aepe(est, gt, np.zeros((1, 3), bool)))


def test_non_finite_estimates_count_as_wrong_not_skipped():
    gt = _flow((0, 0), (0, 0))
    est = _flow((np.nan, 0), (0, 0))
    assert metrics.pck(est, gt, threshold=1.0) == pytest.approx(0.5)
    assert metrics.aepe(est, gt) == math.inf


def test_accuracy_at_10_is_pck_at_10_on_dense_flow():
    gt = _flow((0, 0), (0, 0), (0, 0), (0, 0))
    est = _flow((9.9, 0), (10, 0), (0, 12), (0, 0))
    assert metrics.accuracy_at(est, gt, threshold=10.0) == pytest.approx(0.5)


def test_kitti_outlier_needs_both_absolute_and_relative_error():
    gt = _flow((100, 0), (2, 0), (0, 0), (10, 0))
    est = _flow((104, 0), (6, 0), (1, 0), (20, 0))   # EPE 4, 4, 1, 10
    # 4 px on a 100 px motion is only 4 %: not an outlier; 4 px on 2 px is; 1 px is not;
    # 10 px on 10 px is.
    assert metrics.kitti_outlier_rate(est, gt) == pytest.approx(0.5)


def test_matchability_jaccard():
    m = np.array([[0.9, 0.6, 0.2, 0.1]])
    truth = np.array([[True, False, True, False]])
    assert metrics.matchability_jaccard(m, truth) == pytest.approx(1 / 3)
    assert metrics.matchability_jaccard(m, truth, threshold=0.15) == pytest.approx(2 / 3)
    assert metrics.matchability_jaccard(np.zeros((1, 2)), np.zeros((1, 2), bool)) == 1.0


def test_flow_metrics_bundle():
    gt = _flow((0, 0), (0, 0), (0, 0), (0, 0))
    est = _flow((0, 0), (2, 0), (4, 0), (0, 0.5))
    valid = np.array([[True, True, True, False]])
    out = metrics.flow_metrics(est, gt, valid, matchability=np.array([[1, 1, 0, 0]]))
    assert out['aepe'] == pytest.approx(2.0)
    assert out['pck@1'] == pytest.approx(1 / 3)
    assert out['pck@3'] == pytest.approx(2 / 3)
    assert out['pck@5'] == pytest.approx(1.0)
    assert out['acc@10'] == pytest.approx(1.0)
    assert out['fl'] == pytest.approx(1 / 3)
    assert out['n_valid'] == 3
    assert out['jaccard'] == pytest.approx(2 / 3)        # {0,1} vs {0,1,2}
    assert 'jaccard' not in metrics.flow_metrics(est, gt, valid)


# --------------------------------------------------------------------------- colours


def test_color_wheel_hits_the_primaries_in_order():
    wheel = flowviz.color_wheel()
    assert wheel.shape == (55, 3)
    np.testing.assert_array_equal(wheel[0], [255, 0, 0])      # red
    np.testing.assert_array_equal(wheel[15], [255, 255, 0])   # yellow
    np.testing.assert_array_equal(wheel[21], [0, 255, 0])     # green
    np.testing.assert_array_equal(wheel[25], [0, 255, 255])   # cyan
    np.testing.assert_array_equal(wheel[36], [0, 0, 255])     # blue
    np.testing.assert_array_equal(wheel[49], [255, 0, 255])   # magenta


def test_flow_to_color_encodes_direction_and_magnitude():
    f = _flow((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (0.5, 0), (3, 0))
    img = flowviz.flow_to_color(f, max_flow=1.0)
    assert img.dtype == np.uint8 and img.shape == (1, 7, 3)
    px = img[0].astype(int)
    np.testing.assert_array_equal(px[0], [255, 255, 255])         # no motion: white
    assert px[1][0] == 255 and px[1][1] < 10 and px[1][2] < 50     # right: red
    assert px[2][0] == 255 and 150 < px[2][1] < 255 and px[2][2] == 0   # down: orange
    assert px[3][0] == 0 and px[3][1] > 150 and px[3][2] == 255    # left: cyan-blue
    assert px[4][2] == 255 and px[4][1] == 0 and px[4][0] < 150    # up: blue-violet
    # half the magnitude: the same hue half-way to white
    assert px[5][0] == 255 and 120 < px[5][1] < 135 and 120 < px[5][2] < 135
    assert px[6].max() <= 191                                     # beyond max: darkened
    # max_flow=None scales to the largest magnitude: (3, 0) becomes fully saturated red.
    auto = flowviz.flow_to_color(f)
    assert auto[0, 6, 0] == 255 and auto[0, 6, 1] < 10


def test_flow_to_color_blacks_out_invalid_and_non_finite():
    f = _flow((1, 0), (np.nan, 0), (1, 0))
    img = flowviz.flow_to_color(f, valid=np.array([[True, True, False]]))
    assert img[0, 0].sum() > 0
    np.testing.assert_array_equal(img[0, 1:], 0)


def test_error_map_brightens_with_error_and_masks():
    err = np.array([[0.0, 2.5, 5.0, 10.0, 50.0, np.nan]])
    img = flowviz.error_map_color(err, max_err=10.0).astype(int)
    brightness = img.sum(axis=-1)[0]
    assert brightness[0] < brightness[1] < brightness[2] < brightness[3]
    assert brightness[4] == brightness[3]                          # saturates
    assert brightness[5] == 0
    masked = flowviz.error_map_color(err, 10.0, valid=np.array([[1, 1, 1, 0, 1, 1]], bool))
    np.testing.assert_array_equal(masked[0, 3], 0)


def test_reliability_counts_add_up_and_calibration_error_is_zero_when_calibrated():
    rng = np.random.default_rng(0)
    m = rng.random(200000)
    right = rng.random(200000) < m                 # right with probability = matchability
    counts = metrics.reliability_counts(m, right)
    assert sum(counts['count']) == 200000
    assert metrics.calibration_error(counts) < 0.01
    over = metrics.reliability_counts(np.ones_like(m), right)   # always sure, right half the time
    assert metrics.calibration_error(over) == pytest.approx(0.5, abs=0.01)
    merged = metrics.merge_reliability([counts, over])
    assert sum(merged['count']) == 400000
    assert metrics.calibration_error({'count': [0, 0]}) is None


def test_isotonic_calibration_fits_a_monotone_map_that_removes_miscalibration():
    from dense_match_ros.core import calibration
    assert calibration.isotonic_fit([0.1, 0.2, 0.3], [0.5, 0.2, 0.9], [1, 1, 1]).tolist() == \
        pytest.approx([0.35, 0.35, 0.9])
    rng = np.random.default_rng(1)
    m = rng.random(100000)
    right = rng.random(100000) < m ** 3            # overconfident raw scores
    counts = metrics.reliability_counts(m, right)
    table = calibration.fit_table(counts)
    assert np.all(np.diff(table['probability']) >= 0)
    fixed = calibration.apply_table(m, table)
    assert metrics.calibration_error(counts) > 0.15
    assert metrics.calibration_error(metrics.reliability_counts(fixed, right)) < 0.02
    assert calibration.apply_table(m, None) is m
    with pytest.raises(ValueError):
        calibration.fit_table({'count': [1, 2], 'sum_matchability': [0, 0], 'correct': [0, 0]})


def test_calibration_counts_right_or_visible_matches_as_told():
    """``dense-match-calibrate --truth``: a flow 2 px off everywhere is never right, yet every
    pixel with a visible match counts as visible; an unknown truth is named."""
    from types import SimpleNamespace
    from dense_match_ros.evaluation.calibrate import reliability_of

    gt = np.zeros((8, 10, 2), np.float32)
    valid = np.ones((8, 10), bool)
    valid[:, :3] = False                           # occluded: no visible match
    pair = SimpleNamespace(source=None, target=None, flow=gt, valid=valid)

    class Off:
        def match(self, source, target):
            return gt + 2.0, np.full(gt.shape[:2], 0.95, np.float32)

    right = reliability_of(Off(), [pair], 'right')
    visible = reliability_of(Off(), [pair], 'visible')
    assert sum(right['count']) == sum(visible['count']) == 80
    assert sum(right['correct']) == 0
    assert sum(visible['correct']) == 56
    with pytest.raises(ValueError, match='truth'):
        reliability_of(Off(), [pair], 'seen')


def test_match_figure_shows_images_flow_with_legend_and_matchability(tmp_path):
    import cv2
    from dense_match_ros.evaluation import report
    rng = np.random.default_rng(0)
    img = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    flow = np.dstack([np.full((30, 40), 3.0), np.zeros((30, 40))]).astype(np.float32)
    path = report.save_match_figure(tmp_path / 'f.png', 'pair', img, img, flow,
                                    np.full((30, 40), 0.5, np.float32))
    fig = cv2.imread(str(path))
    assert fig.shape[1] > 600 and fig.shape[0] > 300
    # the flow panel is saturated in the colour of +x motion, and the wheel legend adds more
    assert len(np.unique(fig.reshape(-1, 3), axis=0)) > 200
