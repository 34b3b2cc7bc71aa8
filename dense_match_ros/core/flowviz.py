"""Flow and error images for people: the Middlebury colour code and an error heat map.

The colour code is the one of Baker et al., "A Database and Evaluation Methodology for
Optical Flow" (IJCV 2011), so flow images from this package read like the figures of
the optical-flow literature: hue is the direction, saturation the magnitude (white =
no motion, fully saturated = ``max_flow``). Here it is built from that published
description: a 55-entry wheel of six linear ramps between red, yellow, green, cyan,
blue and magenta, whose lengths (15, 6, 4, 11, 13, 6) were chosen by the authors to
space hues evenly to the eye. Beyond ``max_flow`` colours are kept saturated and
darkened to 75 %.

Outputs are RGB uint8; the ROS node converts to ``bgr8`` itself.
"""
from __future__ import annotations

import cv2
import numpy as np

# (length of the ramp, colour it starts from, colour it ends at), RGB, in wheel order.
_RAMPS = (
    (15, (255, 0, 0), (255, 255, 0)),      # red -> yellow
    (6, (255, 255, 0), (0, 255, 0)),       # yellow -> green
    (4, (0, 255, 0), (0, 255, 255)),       # green -> cyan
    (11, (0, 255, 255), (0, 0, 255)),      # cyan -> blue
    (13, (0, 0, 255), (255, 0, 255)),      # blue -> magenta
    (6, (255, 0, 255), (255, 0, 0)),       # magenta -> red
)


def color_wheel() -> np.ndarray:
    """(55, 3) float array of wheel colours in [0, 255], red first.

    Each ramp steps ``floor(255 * i / n)`` from its start colour towards its end colour,
    so entry 0 is pure red and the last entry is one step short of red again.
    """
    rows = []
    for n, start, end in _RAMPS:
        steps = np.floor(255.0 * np.arange(n) / n)[:, None]  # 0 .. <255
        start_a = np.array(start, dtype=np.float64)
        direction = np.sign(np.array(end, dtype=np.float64) - start_a)
        rows.append(start_a + direction * steps)
    return np.concatenate(rows, axis=0)


_WHEEL_UNIT = (color_wheel() / 255.0).astype(np.float32)


def flow_to_color(flow: np.ndarray, max_flow: float | None = None,
                  valid: np.ndarray | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB image of a flow field in the Middlebury colour code.

    ``max_flow`` (pixels) is the magnitude shown fully saturated; None scales to the
    largest valid magnitude so that every field uses the whole range (pass a fixed
    value to compare two fields, e.g. estimate vs ground truth). Pixels outside
    ``valid`` or with non-finite flow are black.
    """
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f'flow must be HxWx2, got {flow.shape}')
    # float32 throughout: this runs on every frame the ROS node publishes.
    u = flow[..., 0].astype(np.float32)
    v = flow[..., 1].astype(np.float32)
    ok = np.isfinite(u) & np.isfinite(v)
    if valid is not None:
        ok &= np.asarray(valid, bool)
    u[~ok] = 0.0
    v[~ok] = 0.0
    mag = np.hypot(u, v)
    if max_flow is None:
        max_flow = float(mag[ok].max()) if ok.any() else 0.0
    rad = mag / np.float32(max(float(max_flow), 1e-9))

    # Direction angle atan2(-v, -u) in [-pi, pi] mapped onto wheel positions [0, n - 1]:
    # rightwards (+x) is red, downwards (+y) orange, leftwards cyan, upwards blue-violet.
    n = _WHEEL_UNIT.shape[0]
    pos = (np.arctan2(-v, -u) * np.float32(1.0 / np.pi) + 1.0) * np.float32((n - 1) / 2.0)
    k0 = np.minimum(pos.astype(np.int32), n - 1)      # pos >= 0, so truncation = floor
    k1 = k0 + 1
    k1[k1 == n] = 0
    frac = (pos - k0)[..., None]
    col = np.take(_WHEEL_UNIT, k0, axis=0) * (1.0 - frac) + np.take(_WHEEL_UNIT, k1, axis=0) * frac

    # Inside the disc: blend towards white as the magnitude falls; outside: darken.
    inside = (rad <= 1.0)[..., None]
    col = np.where(inside, 1.0 - rad[..., None] * (1.0 - col), col * np.float32(0.75))
    img = (np.clip(col, 0.0, 1.0) * 255.0).astype(np.uint8)    # truncation = floor (>= 0)
    img[~ok] = 0
    return img


def error_map_color(err: np.ndarray, max_err: float, valid: np.ndarray | None = None
                    ) -> np.ndarray:
    """HxWx3 uint8 RGB heat map of a per-pixel error, 0 (dark) .. ``max_err`` (bright).

    Errors above ``max_err`` saturate; pixels outside ``valid`` or non-finite are black
    and the colour map (inferno) starts near black too, so masked pixels and zero
    error read alike on purpose: both mean "nothing wrong to see here". Infinite error
    (e.g. a match outside the image) is shown at full brightness.
    """
    err = np.asarray(err, dtype=np.float64)
    if err.ndim != 2:
        raise ValueError(f'error map must be HxW, got {err.shape}')
    ok = ~np.isnan(err)
    if valid is not None:
        ok &= np.asarray(valid, bool)
    scaled = np.clip(np.where(ok, err, 0.0) / max(float(max_err), 1e-9), 0.0, 1.0)
    grey = np.round(scaled * 255.0).astype(np.uint8)
    img = cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    img[~ok] = 0
    return img
