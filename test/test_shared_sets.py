"""Shared-data loaders: .flo I/O, and the real sets giving documented sizes and ground
truth that actually aligns the images (skipped where ../shared/data is absent)."""
from __future__ import annotations

import numpy as np
import pytest

from dense_match_ros.core.geometry import grid
from dense_match_ros.data import shared_sets


def test_flo_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    flow = rng.normal(0, 20, size=(5, 7, 2)).astype(np.float32)
    path = tmp_path / 'f.flo'
    shared_sets.write_flo(path, flow)
    assert path.stat().st_size == 12 + 5 * 7 * 2 * 4
    back = shared_sets.read_flo(path)
    assert back.shape == (5, 7, 2) and back.dtype == np.float32
    np.testing.assert_array_equal(back, flow)


def test_flo_rejects_bad_files(tmp_path):
    bad = tmp_path / 'bad.flo'
    bad.write_bytes(np.array([1.0, 2.0, 3.0], '<f4').tobytes())
    with pytest.raises(ValueError, match='magic'):
        shared_sets.read_flo(bad)
    short = tmp_path / 'short.flo'
    short.write_bytes(np.array([202021.25], '<f4').tobytes()
                      + np.array([4, 4], '<i4').tobytes() + b'\0' * 8)
    with pytest.raises(ValueError, match='truncated'):
        shared_sets.read_flo(short)


def test_data_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv('DENSE_MATCH_DATA', str(tmp_path))
    assert shared_sets.data_root() == tmp_path
    with pytest.raises(FileNotFoundError):
        shared_sets.sintel_pairs()
    with pytest.raises(FileNotFoundError):
        shared_sets.hpatches_pair()
    with pytest.raises(FileNotFoundError):
        shared_sets.tum_pairs()


def _photometric_error(pair, flow, mask) -> float:
    """Mean |warp(target, flow) - source| over mask (grey levels)."""
    warped = grid.warp(pair.target, flow).astype(np.float64)
    return float(np.abs(warped - pair.source).mean(axis=-1)[mask].mean())


def _alignable(pair) -> np.ndarray:
    """Pixels whose true match is visible and inside the target."""
    mask = pair.valid.copy()
    if pair.occluded is not None:
        mask &= ~pair.occluded
    th, tw = pair.target.shape[:2]
    return mask & grid.in_bounds(pair.flow, (tw, th))


@pytest.fixture(scope='module')
def sintel(shared_data):
    return shared_sets.sintel_pairs(shared_data)


def test_sintel_sizes_masks_and_alignment(sintel):
    assert len(sintel) == 6
    gt_total = zero_total = 0.0
    for p in sintel:
        assert p.source.shape == p.target.shape == (436, 1024, 3)
        assert p.source.dtype == np.uint8
        assert p.flow.shape == (436, 1024, 2) and p.flow.dtype == np.float32
        assert p.valid.shape == p.occluded.shape == (436, 1024)
        assert p.valid.mean() > 0.9 and 0.0 < p.occluded.mean() < 0.5
        mask = _alignable(p)
        gt = _photometric_error(p, p.flow, mask)
        zero = _photometric_error(p, np.zeros_like(p.flow), mask)
        assert gt < zero, p.name
        gt_total += gt
        zero_total += zero
    # Over the set the ground truth removes most of the difference. (One pair, the
    # foggy ambush_2, is only mildly better: its fog does not move with the scene.)
    assert gt_total < 0.5 * zero_total


def test_hpatches_full_and_small(shared_data):
    full = shared_sets.hpatches_pair(shared_data)
    small = shared_sets.hpatches_pair(shared_data, size=(240, 240))
    assert full.source.shape == (1126, 845, 3) and full.flow.shape == (1126, 845, 2)
    assert small.source.shape == small.target.shape == (240, 240, 3)
    assert small.flow.shape == (240, 240, 2)
    for p in (full, small):
        assert 0.5 < p.valid.mean() < 1.0            # part of image 1 leaves image 2
        mask = _alignable(p)
        assert (_photometric_error(p, p.flow, mask)
                < 0.4 * _photometric_error(p, np.zeros_like(p.flow), mask))
    # The scaled homography agrees with the full-resolution flow resampled to 240x240.
    resampled = grid.resize_flow(full.flow, (240, 240),
                                 target_scale=(845 / 240 * 240 / 845, 1126 / 240 * 240 / 1126))
    interior = small.valid.copy()
    interior[:8], interior[-8:], interior[:, :8], interior[:, -8:] = False, False, False, False
    interior &= grid.in_bounds(resampled, (240, 240))
    err = np.linalg.norm(resampled - small.flow, axis=-1)[interior]
    assert np.median(err) < 0.05


def test_tum_pairs_geometry(shared_data):
    from dense_match_ros.core.geometry.gt_flow import flow_from_depth

    pairs = shared_sets.tum_pairs(shared_data)
    assert [p.name for p in pairs] == ['fr3_office/0-5', 'fr3_office/0-10', 'fr3_office/0-15']
    baselines = []
    for p in pairs:
        assert p.source.shape == (480, 640, 3)
        assert p.depth_source.shape == (480, 640)
        known = p.depth_source[p.depth_source > 0]
        assert 0.3 < np.median(known) < 6.0             # metres, not raw PNG units
        R = p.T_target_source[:3, :3]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-6)
        np.testing.assert_allclose(p.K_source[0, 0], 535.4)
        baselines.append(np.linalg.norm(p.T_target_source[:3, 3]))
    assert baselines[0] < baselines[1] < baselines[2]   # the camera keeps moving
    # The pose (with depth) explains the image motion better than no motion at all.
    p = pairs[-1]
    flow, valid = flow_from_depth(p.depth_source, p.K_source, p.T_target_source,
                                  p.K_target, (640, 480), p.depth_target)
    assert valid.mean() > 0.5
    warped_err = np.abs(grid.warp(p.target, flow).astype(float) - p.source).mean(-1)[valid]
    zero_err = np.abs(p.target.astype(float) - p.source).mean(-1)[valid]
    assert warped_err.mean() < 0.8 * zero_err.mean()


def test_middlebury_neighbour_pairs_satisfy_epipolar_geometry(shared_data):
    import cv2

    pairs = shared_sets.middlebury_pairs(shared_data)
    assert {p.name.split('/')[0] for p in pairs} == {'templeSparseRing', 'dinoSparseRing'}
    for p in pairs:
        cos = (np.trace(p.T_target_source[:3, :3]) - 1) / 2
        assert np.degrees(np.arccos(np.clip(cos, -1, 1))) < 30.0
    # Independent check on one pair: SIFT matches lie on the epipolar lines of the pose.
    p = pairs[0]
    sift = cv2.SIFT_create(nfeatures=1000)
    ka, da = sift.detectAndCompute(cv2.cvtColor(p.source, cv2.COLOR_RGB2GRAY), None)
    kb, db = sift.detectAndCompute(cv2.cvtColor(p.target, cv2.COLOR_RGB2GRAY), None)
    good = [m for m, n in cv2.BFMatcher().knnMatch(da, db, k=2) if m.distance < 0.7 * n.distance]
    assert len(good) > 20
    xa = np.array([[*ka[m.queryIdx].pt, 1.0] for m in good])
    xb = np.array([[*kb[m.trainIdx].pt, 1.0] for m in good])
    R, t = p.T_target_source[:3, :3], p.T_target_source[:3, 3]
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    F = np.linalg.inv(p.K_target).T @ tx @ R @ np.linalg.inv(p.K_source)
    lines = xa @ F.T
    dist = np.abs(np.sum(lines * xb, axis=1)) / np.linalg.norm(lines[:, :2], axis=1)
    assert np.median(dist) < 1.0
    # The inverse pose (what a world/camera mix-up gives) fits far worse.
    Ti = np.linalg.inv(p.T_target_source)
    txi = np.array([[0, -Ti[2, 3], Ti[1, 3]], [Ti[2, 3], 0, -Ti[0, 3]], [-Ti[1, 3], Ti[0, 3], 0]])
    Fi = np.linalg.inv(p.K_target).T @ txi @ Ti[:3, :3] @ np.linalg.inv(p.K_source)
    li = xa @ Fi.T
    wrong = np.abs(np.sum(li * xb, axis=1)) / np.linalg.norm(li[:, :2], axis=1)
    assert np.median(dist) < 0.2 * np.median(wrong)


def test_named_sets(shared_data):
    assert len(shared_sets.load_flow_set('hpatches240', shared_data)) == 1
    with pytest.raises(KeyError):
        shared_sets.load_flow_set('kitti', shared_data)
    with pytest.raises(KeyError):
        shared_sets.load_pose_set('sintel', shared_data)


def test_viewpoint_set_flows_are_exact_for_rotation_and_zoom(shared_data):
    pairs = shared_sets.load_flow_set('hpatches_viewpoint', shared_data)
    assert [p.name.split('/')[-1] for p in pairs[1:]] == [v[0] for v in shared_sets.VIEWPOINT_CHANGES]
    base = pairs[0]
    for pair in pairs:
        assert pair.valid.mean() > 0.3, pair.name
        warped = grid.warp(pair.target, pair.flow).astype(np.float32)
        err = np.abs(warped - pair.source.astype(np.float32)).mean(-1)[pair.valid]
        base_err = np.abs(grid.warp(base.target, base.flow).astype(np.float32)
                          - base.source.astype(np.float32)).mean(-1)[base.valid]
        # As photo-consistent as the original pair (interpolation adds a little).
        assert np.median(err) < np.median(base_err) + 4.0, pair.name
    rot180 = pairs[-1]
    assert np.median(np.abs(rot180.flow[rot180.valid])) > 50      # the flow really turned
    with pytest.raises(KeyError):
        shared_sets.load_flow_set('hpatches_sideways', shared_data)
