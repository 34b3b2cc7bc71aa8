"""The DIS residual refinement of a network's flow (core.refine)."""
from __future__ import annotations

import cv2
import numpy as np
from skimage import data as skdata

from dense_match_ros.core import refine


def _pair():
    """A real photo and its affine warp, with the exact flow (source grid, pixels)."""
    src = cv2.resize(skdata.astronaut(), (192, 160), interpolation=cv2.INTER_AREA)
    a = cv2.getRotationMatrix2D((96, 80), 4.0, 1.05)
    a[:, 2] += (6.0, -4.0)
    tgt = cv2.warpAffine(src, a, (192, 160), borderMode=cv2.BORDER_REFLECT)
    ys, xs = np.mgrid[0:160, 0:192].astype(np.float32)
    gt = np.stack([a[0, 0] * xs + a[0, 1] * ys + a[0, 2] - xs,
                   a[1, 0] * xs + a[1, 1] * ys + a[1, 2] - ys], axis=-1)
    return src, tgt, gt


def test_a_coarse_flow_is_made_precise():
    """A flow off by a smooth 2-3 px error (what a low-resolution network gives) comes back
    sub-pixel; the exact flow stays exact."""
    src, tgt, gt = _pair()
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
