"""A real photo and an affine warp of it with the exact flow: a known answer for matchers."""
from __future__ import annotations

import cv2
import numpy as np
from skimage import data as skdata


def affine_photo_pair(width: int, height: int, angle_deg: float, scale: float,
                      shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, target, flow): the astronaut photo, its rotation/scale/shift about the centre,
    and the flow on the source grid in pixels (source (x, y) <-> target (x+u, y+v))."""
    src = cv2.resize(skdata.astronaut(), (width, height), interpolation=cv2.INTER_AREA)
    a = cv2.getRotationMatrix2D((width / 2, height / 2), angle_deg, scale)
    a[:, 2] += shift
    tgt = cv2.warpAffine(src, a, (width, height), borderMode=cv2.BORDER_REFLECT)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    flow = np.stack([a[0, 0] * xs + a[0, 1] * ys + a[0, 2] - xs,
                     a[1, 0] * xs + a[1, 1] * ys + a[1, 2] - ys], axis=-1)
    return src, tgt, flow
