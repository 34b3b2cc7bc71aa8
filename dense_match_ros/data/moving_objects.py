"""Independently moving objects pasted over a synthetic pair (the FlyingChairs idea).

A single warp moves every pixel of a pair together; real scenes (Sintel, people in front of
a robot) have parts that move on their own and hide each other. Each object here is a
random shape cut from another photo, placed in the SOURCE at a random position and moved
to the TARGET by its own affine map, on top of the background's warp. Objects are layered
(later ones in front, in both images), so the ground truth stays exact:

* flow of a source pixel = the map of the frontmost layer covering it there;
* ``visible`` = the pixel lands inside the target AND the frontmost layer at its target
  position is its own layer (otherwise an object in front hides it: occluded, or it was
  an object that moved away and uncovered nothing of it).

The flow stays defined on occluded pixels (it is where the point went), so flow losses can
use every pixel while the matchability loss learns the visibility.
"""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np


@dataclasses.dataclass
class ObjectMotion:
    """Ranges of the per-object motion (uniform draws)."""

    count: tuple[int, int] = (2, 6)
    """Objects per pair (inclusive)."""
    radius: tuple[float, float] = (0.08, 0.25)
    """Object radius as a fraction of the image's shorter side."""
    translation: float = 0.25
    """Extra translation as a fraction of each image side (each way)."""
    rotation_deg: float = 30.0
    scale: tuple[float, float] = (0.8, 1.25)


def _shape_mask(size: tuple[int, int], rng: np.random.Generator, radius_px: float) -> np.ndarray:
    """A random ellipse or star-convex polygon mask (uint8 0/1) of the image size (H, W)."""
    h, w = size
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    mask = np.zeros((h, w), np.uint8)
    if rng.random() < 0.4:
        axes = (max(2, int(radius_px * rng.uniform(0.6, 1.0))),
                max(2, int(radius_px * rng.uniform(0.3, 1.0))))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:
        n = int(rng.integers(5, 11))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = radius_px * rng.uniform(0.5, 1.0, n)
        pts = np.stack((cx + radii * np.cos(angles), cy + radii * np.sin(angles)), -1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def _object_map(rng: np.random.Generator, size: tuple[int, int], centre: tuple[float, float],
                base: np.ndarray, motion: ObjectMotion) -> np.ndarray:
    """2x3 pixel affine source -> target: the background's motion at the centre, plus the
    object's own rotation/scale about its centre and a translation."""
    h, w = size
    cx, cy = centre
    ix, iy = int(np.clip(round(cx), 0, w - 1)), int(np.clip(round(cy), 0, h - 1))
    bx, by = base[iy, ix]
    a = math.radians(motion.rotation_deg) * rng.uniform(-1, 1)
    s = float(rng.uniform(*motion.scale))
    tx = bx + motion.translation * w * rng.uniform(-1, 1)
    ty = by + motion.translation * h * rng.uniform(-1, 1)
    rot = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    centre_v = np.array([cx, cy])
    offset = centre_v + np.array([tx, ty]) - rot @ centre_v
    return np.concatenate((rot, offset[:, None]), 1)


def add_moving_objects(source: np.ndarray, target: np.ndarray, flow: np.ndarray,
                       valid: np.ndarray, textures: list[np.ndarray], rng: np.random.Generator,
                       motion: ObjectMotion = ObjectMotion()) -> tuple[np.ndarray, np.ndarray,
                                                                        np.ndarray, np.ndarray]:
    """(source, target, flow, visible) with ``len(textures)`` objects composited on top.

    ``textures`` are RGB uint8 images of the pair's size (crops of other photos); the
    inputs are not modified. ``valid`` is the background's in-frame mask.
    """
    h, w = flow.shape[:2]
    source, target, flow = source.copy(), target.copy(), flow.copy()
    src_layer = np.zeros((h, w), np.int32)
    tgt_layer = np.zeros((h, w), np.int32)
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), -1)
    for k, texture in enumerate(textures, start=1):
        radius = float(rng.uniform(*motion.radius)) * min(h, w)
        mask = _shape_mask((h, w), rng, radius)
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        centre = (float(xs.mean()), float(ys.mean()))
        A = _object_map(rng, (h, w), centre, flow, motion)
        on = mask.astype(bool)
        source[on] = texture[on]
        src_layer[on] = k
        mapped = grid @ A[:, :2].T.astype(np.float32) + A[:, 2].astype(np.float32)
        flow[on] = (mapped - grid)[on]
        warped_tex = cv2.warpAffine(texture, A, (w, h), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REFLECT)
        warped_mask = cv2.warpAffine(mask, A, (w, h), flags=cv2.INTER_NEAREST,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
        target[warped_mask] = warped_tex[warped_mask]
        tgt_layer[warped_mask] = k
    pos = grid + flow
    inside = (pos[..., 0] >= -0.5) & (pos[..., 0] <= w - 0.5) & (pos[..., 1] >= -0.5) \
        & (pos[..., 1] <= h - 0.5)
    px = np.clip(np.rint(pos[..., 0]), 0, w - 1).astype(np.int64)
    py = np.clip(np.rint(pos[..., 1]), 0, h - 1).astype(np.int64)
    visible = inside & (tgt_layer[py, px] == src_layer) & (valid | (src_layer > 0))
    return source, target, flow.astype(np.float32), visible
