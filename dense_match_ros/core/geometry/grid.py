"""Flow, sampling grids and pixel maps, and warping, under ONE pixel convention.

Convention (used everywhere in this package, numpy and torch alike):

* Pixel (x, y) is the *centre* of column x, row y; x in [0, W-1], y in [0, H-1].
* Normalised coordinates follow ``align_corners=False`` (the default of
  ``torch.nn.functional.grid_sample`` / ``interpolate`` and the behaviour of ``cv2.resize``):
  -1 and +1 are the outer *edges* of the image, so ``x_n = (2 x + 1) / W - 1`` and
  ``x = ((x_n + 1) W - 1) / 2``.
* Resizing an image from W to W' therefore maps pixel x to ``(x + 0.5) W' / W - 0.5``.

Representations of one correspondence field on a source grid of size HxW into a target of
size Ht x Wt:

* ``flow``  float32 HxWx2, pixels: source (x, y) <-> target (x + u, y + v);
* ``map``   float32 HxWx2, absolute target pixel coordinates (x + u, y + v), the form
  ``cv2.remap`` takes;
* ``grid``  float32 HxWx2, absolute target coordinates normalised to [-1, 1] with the
  target's own size, the form ``grid_sample`` takes (channel 0 = x).
"""
from __future__ import annotations

import functools

import cv2
import numpy as np


def pixel_coords(height: int, width: int) -> np.ndarray:
    """HxWx2 float32 array of (x, y) pixel coordinates (a fresh, writable array)."""
    return _coords(height, width).copy()


@functools.lru_cache(maxsize=8)
def _coords(height: int, width: int) -> np.ndarray:
    """:func:`pixel_coords`, built once per size and read-only: every warp, round trip and
    resize of a frame needs it, and building it cost a few ms per use at 640x480."""
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    coords = np.stack([xs, ys], axis=-1)
    coords.flags.writeable = False
    return coords


def pixels_to_normalized(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """(..., 2) pixel coordinates -> normalised [-1, 1] (align_corners=False)."""
    points = np.asarray(points, dtype=np.float32)
    size = np.array([width, height], dtype=np.float32)
    return (2.0 * points + 1.0) / size - 1.0


def normalized_to_pixels(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """(..., 2) normalised [-1, 1] coordinates -> pixels (align_corners=False)."""
    points = np.asarray(points, dtype=np.float32)
    size = np.array([width, height], dtype=np.float32)
    return ((points + 1.0) * size - 1.0) / 2.0


def rescale_points(points: np.ndarray, from_size: tuple[int, int],
                   to_size: tuple[int, int]) -> np.ndarray:
    """Map pixel coordinates between two resolutions of the same image.

    Sizes are (width, height). Pixel centres, not corners, scale: x' = (x + .5) W'/W - .5.
    """
    points = np.asarray(points, dtype=np.float32)
    scale = np.array([to_size[0] / from_size[0], to_size[1] / from_size[1]], dtype=np.float32)
    return (points + 0.5) * scale - 0.5


def flow_to_map(flow: np.ndarray) -> np.ndarray:
    """Flow (pixels) -> absolute target pixel coordinates."""
    h, w = flow.shape[:2]
    return np.add(_coords(h, w), flow, dtype=np.float32)


def map_to_flow(pixel_map: np.ndarray) -> np.ndarray:
    """Absolute target pixel coordinates -> flow (pixels)."""
    h, w = pixel_map.shape[:2]
    return np.subtract(pixel_map, _coords(h, w), dtype=np.float32)


def flow_to_grid(flow: np.ndarray, target_size: tuple[int, int]) -> np.ndarray:
    """Flow -> normalised sampling grid in the target's [-1, 1] frame. target_size=(W, H)."""
    return pixels_to_normalized(flow_to_map(flow), *target_size)


def grid_to_flow(grid: np.ndarray, target_size: tuple[int, int]) -> np.ndarray:
    """Normalised sampling grid (target frame, target_size=(W, H)) -> flow in pixels."""
    return map_to_flow(normalized_to_pixels(grid, *target_size))


def resize_flow(flow: np.ndarray, size: tuple[int, int],
                target_scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Resample a flow field to a new source grid size (W, H), rescaling its vectors.

    ``target_scale`` is how much the target resolution changes by (new/old per axis);
    by default the target is assumed to be resized like the source. The displacement,
    not the absolute target coordinate, is interpolated: near the border, where bilinear
    resizing replicates the outermost sample, a replicated displacement stays right for
    smooth motions while a replicated absolute coordinate would pin the outer half-pixel
    band of the new grid to one target point.
    """
    h, w = flow.shape[:2]
    new_w, new_h = size
    sx, sy = new_w / w, new_h / h
    tsx, tsy = sx * target_scale[0], sy * target_scale[1]
    displacement = cv2.resize(np.ascontiguousarray(flow, dtype=np.float32), (new_w, new_h),
                              interpolation=cv2.INTER_LINEAR)
    # A new-grid pixel x sits at (x + .5) / s - .5 on the old grid, exactly; its target
    # point (old position + displacement) scales by ts about the half-pixel origin, so the
    # new flow is d ts + (x + .5)(ts / s - 1): only the vectors scale when the target is
    # resized like the source.
    flow_new = displacement * np.array([tsx, tsy], dtype=np.float32)
    if target_scale[0] != 1.0 or target_scale[1] != 1.0:
        gain = np.array([tsx / sx - 1.0, tsy / sy - 1.0], dtype=np.float32)
        flow_new += (_coords(new_h, new_w) + 0.5) * gain
    return flow_new


def working_size(size: tuple[int, int], max_side: int, *, min_side: int = 2, multiple: int = 1,
                 upscale: bool = False) -> tuple[int, int]:
    """(W, H) a method works at for an image of ``size`` (W, H): the longest side capped by
    ``max_side`` (0: no cap; ``upscale`` also scales smaller images up to it), at least
    ``min_side`` a side, rounded to ``multiple`` (networks with strided stages)."""
    w, h = size
    scale = max_side / max(w, h) if max_side > 0 else 1.0
    if not upscale:
        scale = min(1.0, scale)
    scale = max(scale, min_side / min(w, h))

    def side(x: int) -> int:
        if multiple > 1:
            return max(min_side, int(round(x * scale / multiple)) * multiple)
        return max(min_side, int(round(x * scale)))
    return side(w), side(h)


def to_source_grid(flow: np.ndarray, matchability: np.ndarray | None,
                   source_size: tuple[int, int], target_working_size: tuple[int, int],
                   target_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Flow and matchability computed between working copies of a pair, brought back to the
    source's own grid (``source_size``) and pointing into the target's own pixels.

    ``flow`` lies on the working source grid (its shape) and points into a target of
    ``target_working_size``; the two images may have been scaled differently. Every method
    and the node's output stage go through here, so the half-pixel rule of resizing
    (:func:`resize_flow`) is written once.
    """
    wh, ww = flow.shape[:2]
    w, h = source_size
    sx, sy = w / ww, h / wh
    t_sx, t_sy = target_size[0] / target_working_size[0], target_size[1] / target_working_size[1]
    if (ww, wh) == (w, h) and (t_sx, t_sy) == (1.0, 1.0):
        return flow, matchability
    flow = resize_flow(flow, (w, h), target_scale=(t_sx / sx, t_sy / sy))
    if matchability is not None and (ww, wh) != (w, h):
        matchability = np.clip(cv2.resize(matchability, (w, h), interpolation=cv2.INTER_LINEAR),
                               0.0, 1.0)
    return flow, matchability


def unrotate_flow(flow: np.ndarray, quarter_turns: int, target_size: tuple[int, int]) -> np.ndarray:
    """Flow into ``np.rot90(target, quarter_turns)`` made into flow into ``target`` itself
    (``target_size`` (W, H) of the unrotated target).

    A matcher whose features are not rotation invariant can match a target turned by a
    multiple of 90 degrees against an upright copy; the copy is an exact permutation of the
    target's pixels, so the points it finds map back exactly.
    """
    k = int(quarter_turns) % 4
    if k == 0:
        return flow
    w, h = target_size
    pts = flow_to_map(flow)
    x, y = pts[..., 0], pts[..., 1]
    # np.rot90 turns counter-clockwise: after one turn, pixel (x', y') shows (W-1-y', x').
    if k == 1:
        orig = (w - 1 - y, x)
    elif k == 2:
        orig = (w - 1 - x, h - 1 - y)
    else:
        orig = (y, h - 1 - x)
    return map_to_flow(np.stack(orig, axis=-1).astype(np.float32))


def warp(target: np.ndarray, flow: np.ndarray, interpolation: int = cv2.INTER_LINEAR,
         border_value: float = 0.0, border_mode: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    """Sample ``target`` at source (x, y) + flow: the target warped onto the source grid.

    Where the flow is right, ``warp(target, flow) ~= source``. Out-of-image samples get
    ``border_value`` (or, with ``border_mode=cv2.BORDER_REPLICATE``, the nearest edge pixel:
    no artificial edge for a later flow estimate to latch onto).
    """
    return _sample(target, flow_to_map(flow), interpolation, border_mode, border_value)


def _sample(image: np.ndarray, pixel_map: np.ndarray, interpolation: int = cv2.INTER_LINEAR,
            border_mode: int = cv2.BORDER_CONSTANT, border_value: float = 0.0) -> np.ndarray:
    """``image`` sampled at an absolute pixel map (one two-channel map: one pass)."""
    return cv2.remap(image, pixel_map, None, interpolation, borderMode=border_mode,
                     borderValue=border_value)


def in_bounds(flow: np.ndarray, target_size: tuple[int, int]) -> np.ndarray:
    """Boolean HxW: the flow lands inside the target image (size (W, H))."""
    return _map_in_bounds(flow_to_map(flow), target_size)


def _map_in_bounds(pixel_map: np.ndarray, target_size: tuple[int, int]) -> np.ndarray:
    w, h = target_size
    # One pass over both channels (NaN fails every comparison, so it counts as outside).
    return cv2.inRange(pixel_map, (-0.5, -0.5), (w - 0.5, h - 0.5)) > 0


def forward_backward_error(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """|f(x) + b(x + f(x))| per source pixel, infinity where x + f(x) leaves the target.

    ``forward`` is source->target on the source grid, ``backward`` target->source on the
    target grid. A consistent pair of flows gives ~0; occlusions and mismatches do not.
    """
    th, tw = backward.shape[:2]
    pixel_map = flow_to_map(forward)
    # Replicated borders: bilinear sampling on the last row or column weighs in the pixel
    # beyond it (with weight 0), and a NaN border there would make the edge unmatched.
    back_at_target = _sample(np.ascontiguousarray(backward, dtype=np.float32), pixel_map,
                             border_mode=cv2.BORDER_REPLICATE)
    loop = forward + back_at_target
    err = cv2.magnitude(np.ascontiguousarray(loop[..., 0]), np.ascontiguousarray(loop[..., 1]))
    err[~_map_in_bounds(pixel_map, (tw, th)) | ~np.isfinite(err)] = np.inf
    return err.astype(np.float32)


def forward_backward_consistency(forward: np.ndarray, backward: np.ndarray,
                                 sigma: float) -> np.ndarray:
    """``exp(-(e / sigma)^2)`` of the :func:`forward_backward_error` e, float32 in [0, 1]:
    a round trip that misses by ``sigma`` pixels scores 0.37, by 2 ``sigma`` 0.02, one that
    leaves the target 0. The matchability of every method with a two-way check."""
    return consistency_from_error(forward_backward_error(forward, backward), sigma)


def consistency_from_error(error: np.ndarray, sigma: float) -> np.ndarray:
    """``exp(-(e / sigma)^2)`` of round-trip errors e in pixels (infinite: 0), float32."""
    if not sigma > 0:
        raise ValueError(f'the forward-backward tolerance sigma must be > 0 px, got {sigma}')
    return np.exp(-np.square(error / sigma)).astype(np.float32)
