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


@pytest.mark.parametrize('angle,scale', [(30.0, 1.0), (-90.0, 1.0), (0.0, 1.4)])
def test_the_homography_of_a_rotated_or_zoomed_photo_is_found(angle, scale):
    src, tgt, flow = affine_photo_pair(320, 240, angle, scale, (6.0, -4.0))
    homography = prealign.estimate_homography(src, tgt)
    assert homography is not None
    h, w = src.shape[:2]
    coords = grid.pixel_coords(h, w).astype(np.float64)
    by_h = cv2.perspectiveTransform(coords.reshape(1, -1, 2), homography).reshape(h, w, 2)
    assert np.median(np.linalg.norm(by_h - coords - flow, axis=-1)) < 1.0


def test_no_homography_between_unrelated_images():
    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur((rng.random((240, 320, 3)) * 255).astype(np.uint8), (0, 0), 1.5)
    b = cv2.GaussianBlur((rng.random((240, 320, 3)) * 255).astype(np.uint8), (0, 0), 1.5)
    assert prealign.estimate_homography(a, b) is None
    flat = np.full((240, 320, 3), 128, np.uint8)
    assert prealign.estimate_homography(flat, flat) is None


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


def test_the_dense_matcher_sees_the_aligned_pair_only_when_the_homography_is_more_than_a_shift():
    seen = []

    def identity_match(source, target):
        seen.append(target)
        h, w = source.shape[:2]
        return np.zeros((h, w, 2), np.float32), np.ones((h, w), np.float32)

    src, tgt, flow = affine_photo_pair(320, 240, 30.0, 1.0, (5.0, 3.0))
    result, matchability = prealign.match_prealigned(identity_match, src, tgt)
    assert seen[-1] is not tgt and seen[-1].shape == src.shape
    inside = grid.in_bounds(flow, (320, 240))
    assert np.median(np.linalg.norm(result - flow, axis=-1)[inside]) < 1.0
    far_outside = cv2.erode((~inside).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert matchability[inside].mean() > 0.99 and matchability[far_outside].max() == 0
    # A plain shift is the dense matcher's own business: the target goes through untouched.
    src, tgt, _ = affine_photo_pair(320, 240, 0.0, 1.0, (5.0, 3.0))
    prealign.match_prealigned(identity_match, src, tgt)
    assert seen[-1] is tgt
