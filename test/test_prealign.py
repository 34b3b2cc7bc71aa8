"""Global pre-alignment by a sparse homography (core.geometry.prealign)."""
import cv2
import numpy as np
import pytest

from dense_match_ros.core.geometry import grid, prealign

from photo_warp import affine_photo_pair


def _as_homography(source: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """The 3x3 matrix of an affine flow (exact, from three of its points)."""
    h, w = flow.shape[:2]
    pts = np.float32([[0, 0], [w - 1, 0], [0, h - 1]])
    moved = pts + flow[pts[:, 1].astype(int), pts[:, 0].astype(int)]
    return np.vstack([cv2.getAffineTransform(pts, moved.astype(np.float32)), [0, 0, 1]])


@pytest.mark.parametrize('features', prealign.FEATURES)
@pytest.mark.parametrize('angle,scale', [(30.0, 1.0), (-90.0, 1.0), (0.0, 1.4)])
def test_the_homography_of_a_rotated_or_zoomed_photo_is_found(angle, scale, features):
    src, tgt, flow = affine_photo_pair(320, 240, angle, scale, (6.0, -4.0))
    homography = prealign.estimate_homography(src, tgt, prealign.PrealignConfig(features=features))
    assert homography is not None
    h, w = src.shape[:2]
    coords = grid.pixel_coords(h, w).astype(np.float64)
    by_h = cv2.perspectiveTransform(coords.reshape(1, -1, 2), homography).reshape(h, w, 2)
    assert np.median(np.linalg.norm(by_h - coords - flow, axis=-1)) < 1.0


@pytest.mark.parametrize('features', prealign.FEATURES)
def test_no_homography_between_unrelated_images(features):
    config = prealign.PrealignConfig(features=features)
    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur((rng.random((240, 320, 3)) * 255).astype(np.uint8), (0, 0), 1.5)
    b = cv2.GaussianBlur((rng.random((240, 320, 3)) * 255).astype(np.uint8), (0, 0), 1.5)
    assert prealign.estimate_homography(a, b, config) is None
    flat = np.full((240, 320, 3), 128, np.uint8)
    assert prealign.estimate_homography(flat, flat, config) is None


def test_a_config_with_unknown_features_or_a_tiny_size_is_refused():
    with pytest.raises(ValueError, match='features'):
        prealign.PrealignConfig(features='surf')
    with pytest.raises(ValueError, match='max_side'):
        prealign.PrealignConfig(max_side=16)


def test_departure_is_zero_for_a_shift_and_grows_with_rotation_and_zoom():
    shift = np.array([[1, 0, 25.0], [0, 1, -7.0], [0, 0, 1]])
    assert prealign.departure_from_shift(shift, (320, 240)) == pytest.approx(0.0, abs=1e-9)
    src, _, flow = affine_photo_pair(320, 240, 30.0, 1.0, (0.0, 0.0))
    assert prealign.departure_from_shift(_as_homography(src, flow), (320, 240)) == pytest.approx(
        np.sin(np.radians(15)), abs=0.01)
    _, _, zoom = affine_photo_pair(320, 240, 0.0, 1.4, (0.0, 0.0))
    assert prealign.departure_from_shift(_as_homography(src, zoom), (320, 240)) == pytest.approx(
        0.2, abs=0.01)


def test_composing_a_zero_flow_gives_the_homography_and_leaves_out_what_leaves_the_target():
    src, tgt, flow = affine_photo_pair(160, 120, 0.0, 1.4, (0.0, 0.0))
    homography = _as_homography(src, flow)
    composed, matchability = prealign.compose(np.zeros_like(flow), np.ones((120, 160), np.float32),
                                              homography, (160, 120))
    assert np.allclose(composed, flow, atol=1e-3)
    inside = grid.in_bounds(flow, (160, 120))
    assert np.all(matchability[inside] == 1) and np.all(matchability[~inside] == 0)
    # The dense flow is followed inside the target, ignored where H(x) leaves it.
    nudged, _ = prealign.compose(np.full_like(flow, 2.0), matchability, homography, (160, 120))
    assert np.allclose(nudged[~inside], flow[~inside], atol=1e-3)
    assert np.allclose(nudged[inside], flow[inside] + 2.8, atol=1e-3)


class _Matcher:
    """A dense matcher stand-in: knows the true flow of the original pair (or not), sees
    an aligned pair as already aligned, and counts its calls."""

    def __init__(self, target: np.ndarray, flow: np.ndarray, confident: bool,
                 aligned_matchability: float = 1.0) -> None:
        self.target, self.flow, self.confident = target, flow, confident
        self.aligned_matchability = aligned_matchability
        self.targets: list[np.ndarray] = []

    def __call__(self, source: np.ndarray, target: np.ndarray):
        self.targets.append(target)
        h, w = source.shape[:2]
        if target is self.target:   # like any matcher: nothing where the flow leaves the target
            inside = grid.in_bounds(self.flow, target.shape[1::-1])
            return self.flow.copy(), (0.9 * inside if self.confident else 0 * inside).astype(np.float32)
        return np.zeros((h, w, 2), np.float32), np.full((h, w), self.aligned_matchability,
                                                          np.float32)


def _no_features(*_args, **_kwargs):
    raise AssertionError('features were matched although the dense result could tell')


def test_a_confident_dense_result_gives_the_homography_without_features(monkeypatch):
    monkeypatch.setattr(prealign, 'estimate_homography', _no_features)
    src, tgt, flow = affine_photo_pair(320, 240, 30.0, 1.0, (5.0, 3.0))
    verdict, homography = prealign.homography_from_flow(src, flow, np.ones((240, 320), np.float32))
    assert verdict == 'found'
    assert prealign.departure_from_shift(homography, (320, 240)) == pytest.approx(0.26, abs=0.01)
    match = _Matcher(tgt, flow, confident=True)
    result, matchability = prealign.match_prealigned(match, src, tgt)
    assert len(match.targets) == 2 and match.targets[1].shape == src.shape
    inside = grid.in_bounds(flow, (320, 240))
    assert np.median(np.linalg.norm(result - flow, axis=-1)[inside]) < 0.5
    far_outside = cv2.erode((~inside).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert matchability[inside].mean() > 0.99 and matchability[far_outside].max() == 0


def test_a_near_shift_costs_one_dense_run_and_no_features(monkeypatch):
    monkeypatch.setattr(prealign, 'estimate_homography', _no_features)
    src, tgt, flow = affine_photo_pair(320, 240, 0.0, 1.0, (5.0, 3.0))
    match = _Matcher(tgt, flow, confident=True)
    result, _ = prealign.match_prealigned(match, src, tgt)
    assert match.targets == [tgt] and np.array_equal(result, flow)


def test_features_decide_when_the_dense_result_cannot_tell():
    src, tgt, flow = affine_photo_pair(320, 240, 180.0, 1.0, (3.0, -2.0))
    verdict, _ = prealign.homography_from_flow(src, np.zeros_like(flow),
                                               np.zeros((240, 320), np.float32))
    assert verdict == 'unknown'
    match = _Matcher(tgt, np.zeros_like(flow), confident=False)
    result, _ = prealign.match_prealigned(match, src, tgt)
    assert len(match.targets) == 2
    inside = grid.in_bounds(flow, (320, 240))
    assert np.median(np.linalg.norm(result - flow, axis=-1)[inside]) < 1.0


def test_matches_that_agree_on_no_homography_say_none_and_flat_images_say_unknown():
    src, _, _ = affine_photo_pair(320, 240, 0.0, 1.0, (0.0, 0.0))
    rng = np.random.default_rng(1)
    scattered = rng.uniform(-40, 40, (240, 320, 2)).astype(np.float32)
    assert prealign.homography_from_flow(src, scattered, np.ones((240, 320), np.float32))[0] == 'none'
    flat = np.full_like(src, 128)
    assert prealign.homography_from_flow(flat, np.zeros_like(scattered),
                                         np.ones((240, 320), np.float32))[0] == 'unknown'


def test_the_aligned_run_replaces_the_first_only_if_it_is_more_matchable():
    src, tgt, flow = affine_photo_pair(320, 240, 30.0, 1.0, (5.0, 3.0))
    match = _Matcher(tgt, flow, confident=True, aligned_matchability=0.1)
    result, matchability = prealign.match_prealigned(match, src, tgt)
    assert len(match.targets) == 2
    assert np.array_equal(result, flow) and matchability.max() == pytest.approx(0.9)


@pytest.mark.parametrize('margin', [0.1, 10.0])
def test_pixels_the_homography_sends_far_outside_keep_the_first_result(margin):
    """Zoomed 1.4x, the source's corners land up to 0.2 of the target's width outside it.
    Beyond ``max_extrapolation`` of it the first result stays (here a sentinel flow where
    the first run saw nothing); nearer, the aligned run and the homography speak."""
    src, tgt, flow = affine_photo_pair(160, 120, 0.0, 1.4, (0.0, 0.0))
    inside = grid.in_bounds(flow, (160, 120))
    first_flow = np.where(inside[..., None], flow, -7.0).astype(np.float32)
    first_m = (0.9 * inside).astype(np.float32)

    def match(source, target):
        if target is tgt:
            return first_flow.copy(), first_m.copy()
        return np.zeros_like(flow), np.ones(flow.shape[:2], np.float32)

    config = prealign.PrealignConfig(max_extrapolation=margin)
    result, matchability = prealign.match_prealigned(match, src, tgt, config)
    sent = flow + grid.pixel_coords(120, 160)
    pad = margin * 160
    beyond = ((sent < -0.5 - pad) | (sent > np.array([159.5, 119.5]) + pad)).any(-1)
    assert beyond.any() == (margin < 1)
    assert np.all(result[beyond] == -7.0) and np.all(matchability[beyond] == 0)
    assert np.allclose(result[~beyond], flow[~beyond], atol=1e-2)
    assert np.all(matchability[inside] == 1)
    with pytest.raises(ValueError, match='max_extrapolation'):
        prealign.PrealignConfig(max_extrapolation=-1)


def test_without_from_flow_only_features_decide():
    src, tgt, flow = affine_photo_pair(320, 240, 0.0, 1.0, (5.0, 3.0))
    match = _Matcher(tgt, flow, confident=True)
    config = prealign.PrealignConfig(from_flow=False)
    result, _ = prealign.match_prealigned(match, src, tgt, config)
    assert match.targets == [tgt] and np.array_equal(result, flow)


@pytest.mark.parametrize('angle,verdict', [(8.0, 'found'), (60.0, 'none')])
def test_a_homography_that_part_of_the_matches_hold_is_used_only_while_it_warps_gently(
        angle, verdict):
    """Two thirds of the reliable matches follow one rotation, the rest scatter: a fit
    held by that share describes a part of the scene. Gentle (8 degrees, departure 0.07),
    it may pre-align; strong (60 degrees, 0.5), nothing bounds it beyond its inliers."""
    src, _, flow = affine_photo_pair(320, 240, angle, 1.0, (4.0, -3.0))
    rng = np.random.default_rng(3)
    partial = flow.copy()
    scatter = rng.random((240, 320)) < 0.35
    partial[scatter] += rng.uniform(-60, 60, (int(scatter.sum()), 2)).astype(np.float32)
    confident = np.ones((240, 320), np.float32)
    assert prealign.homography_from_flow(src, flow, confident)[0] == 'found'
    found, homography = prealign.homography_from_flow(src, partial, confident)
    assert found == verdict
    if verdict == 'found':
        assert prealign.departure_from_shift(homography, (320, 240)) < 0.1
    with pytest.raises(ValueError, match='inlier ratios'):
        prealign.PrealignConfig(full_support=1.5)
