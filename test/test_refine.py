"""The DIS residual refinement of a network's flow (core.refine)."""
from __future__ import annotations

import numpy as np
import pytest

from dense_match_ros.core import refine
from photo_warp import affine_photo_pair


def test_a_coarse_flow_is_made_precise():
    """A flow off by a smooth 2-3 px error (what a low-resolution network gives) comes back
    sub-pixel; the exact flow stays exact."""
    src, tgt, gt = affine_photo_pair(192, 160, 4.0, 1.05, (6.0, -4.0))
    h, w = gt.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    error = np.stack([2.0 + 0.5 * np.sin(xs / 40.0), -1.5 + 0.5 * np.cos(ys / 30.0)], axis=-1)
    inner = (slice(16, -16), slice(16, -16))
    refined = refine.dis_residual(src, tgt, gt + error)
    err = np.linalg.norm(refined - gt, axis=-1)[inner]
    assert refined.dtype == np.float32 and refined.shape == gt.shape
    assert np.median(err) < 0.5, np.median(err)
    exact = np.linalg.norm(refine.dis_residual(src, tgt, gt) - gt, axis=-1)[inner]
    assert np.median(exact) < 0.2, np.median(exact)


def test_a_residual_longer_than_the_limit_is_dropped():
    """``max_residual_px``: a pixel whose DIS residual is longer keeps the flow it was given;
    a limit above every residual changes nothing."""
    src, tgt, gt = affine_photo_pair(192, 160, 4.0, 1.05, (6.0, -4.0))
    coarse = (gt + np.array([2.0, -1.5], np.float32)).astype(np.float32)   # 2.5 px off
    inner = (slice(16, -16), slice(16, -16))
    free = refine.dis_residual(src, tgt, coarse)
    np.testing.assert_array_equal(refine.dis_residual(src, tgt, coarse, max_residual_px=50.0), free)
    held = refine.dis_residual(src, tgt, coarse, max_residual_px=1.0)
    kept = np.all(held == coarse, axis=-1)[inner]
    assert kept.mean() > 0.9, kept.mean()
    assert np.median(np.linalg.norm(free - gt, axis=-1)[inner]) < 0.5
    with pytest.raises(ValueError, match='max_residual_px'):
        refine.dis_residual(src, tgt, coarse, max_residual_px=0.0)
