"""Full-resolution refinement of a network's flow by a classical residual flow.

A network runs at its working size (128x128 for the CPU dgc checkpoint), so its flow is
right to about a working pixel, which is several pixels of a full-size input. The residual
between the source and the target warped by that flow is small and smooth where the flow
is right: exactly what DIS (coarse-to-fine patch search plus variational refinement)
recovers well at full resolution, for one DIS call and two remaps.

Composition: with ``w(x) = target(x + f(x))`` and DIS residual ``r`` from source to ``w``,
``source(x) ~ w(x + r(x)) = target(x + r(x) + f(x + r(x)))``, so the refined flow is
``r(x) + f(x + r(x))``. (Keeping the network's flow where the residual is long was tried
and dropped: on the full-size HPatches pair it undid most of the gain, the note of issue 6
has the numbers.) ``dmp`` does keep it, with the limit scaled to the input: its optimised
flow is right to a few working pixels wherever it is right at all, so a residual longer than
``max_residual_px`` is DIS locking on to another structure (motion blur, large non-rigid
motion), not a correction (README, "dmp: the residual's length limit").
"""
from __future__ import annotations

import cv2
import numpy as np

from dense_match_ros.core.geometry import grid
from dense_match_ros.core.dis_presets import check_preset, create_dis

REFINERS = ('none', 'dis')


def check_refiner(refine: str, preset: str = 'medium') -> None:
    """Refuse an unknown refiner or preset when a matcher is built, not at its first pair."""
    if refine not in REFINERS:
        raise ValueError(f'refine must be one of {REFINERS}, got {refine!r}')
    check_preset(preset, 'refine_preset')


def dis_residual(source: np.ndarray, target: np.ndarray, flow: np.ndarray,
                 preset: str = 'medium', max_residual_px: float | None = None) -> np.ndarray:
    """``flow`` (source grid, pixels) refined by DIS on the full-resolution RGB pair; a pixel
    whose residual is longer than ``max_residual_px`` (None: no limit) keeps ``flow``."""
    check_refiner('dis', preset)
    check_residual_limit(max_residual_px)
    return apply_residual(flow, residual_of(source, target, flow, preset), max_residual_px)


def residual_of(source: np.ndarray, target: np.ndarray, flow: np.ndarray,
                preset: str = 'medium') -> np.ndarray:
    """DIS's flow from the grey source to the grey target warped by ``flow``: what
    :func:`apply_residual` adds (apart so that one residual can be tried under several limits)."""
    check_refiner('dis', preset)
    grey_s = cv2.cvtColor(source, cv2.COLOR_RGB2GRAY)
    grey_t = cv2.cvtColor(target, cv2.COLOR_RGB2GRAY)
    warped = grid.warp(grey_t, flow, border_mode=cv2.BORDER_REPLICATE)
    return create_dis(preset).calc(grey_s, warped, None)


def apply_residual(flow: np.ndarray, residual: np.ndarray,
                   max_residual_px: float | None = None) -> np.ndarray:
    """``r(x) + f(x + r(x))`` (module doc), with ``r`` zero where it is longer than
    ``max_residual_px`` (None: no limit); ``residual`` is left as it was."""
    check_residual_limit(max_residual_px)
    if max_residual_px is not None:
        too_long = np.square(residual).sum(-1) > float(max_residual_px) ** 2
        residual = np.where(too_long[..., None], np.float32(0.0), residual).astype(np.float32)
    refined = residual + grid.warp(flow, residual, border_mode=cv2.BORDER_REPLICATE)
    return refined.astype(np.float32)


def check_residual_limit(max_residual_px: float | None) -> None:
    """Refuse a residual limit that is not a positive length (None: no limit)."""
    if max_residual_px is not None and not max_residual_px > 0:
        raise ValueError(f'max_residual_px must be > 0 px or None, got {max_residual_px}')


def variational_polish(source: np.ndarray, target: np.ndarray, flow: np.ndarray,
                       iterations: int = 10, min_texture: float = 0.0,
                       scale: float = 1.0) -> np.ndarray:
    """``flow`` polished by OpenCV's variational refinement (the last stage of DIS: data
    term + smoothness) at full resolution, or on copies ``scale`` times the size with the
    update added back, kept only where the source has texture.

    Why after a fusion: a per-pixel choice between two flows leaves seams and each
    candidate's sub-pixel bias; one variational pass over the chosen flow evens them out.
    Why the texture test: where the image is flat only the smoothness term acts, and it drags
    the flow of weakly textured objects towards their surroundings (Middlebury's dark dino):
    a pixel keeps its unpolished flow where the smaller eigenvalue of its 5x5 structure
    tensor (grey levels / 255) is below ``min_texture``. The numbers behind the default
    are in the README ("neuflow: second pass and polish").

    A pair of different sizes is returned unchanged: the refinement needs both images on
    one grid.
    """
    if source.shape[:2] != target.shape[:2] or iterations <= 0:
        return flow
    refiner = cv2.VariationalRefinement_create()
    refiner.setFixedPointIterations(int(iterations))
    refiner.setSorIterations(5)
    grey_s = cv2.cvtColor(source, cv2.COLOR_RGB2GRAY)
    grey_t = cv2.cvtColor(target, cv2.COLOR_RGB2GRAY)
    h, w = grey_s.shape
    if scale < 1.0:
        # The smaller copy is polished and its update added back; the texture test runs on
        # that copy too (a full-resolution test cost as much as the polish itself).
        size = grid.working_size((w, h), int(round(max(w, h) * scale)), min_side=8)
        grey_s = cv2.resize(grey_s, size, interpolation=cv2.INTER_AREA)
        grey_t = cv2.resize(grey_t, size, interpolation=cv2.INTER_AREA)
        small = grid.resize_flow(flow, size)
        update = refiner.calc(grey_s, grey_t, small.copy()) - small
        if min_texture > 0:
            _keep_flat(update, 0.0, grey_s, min_texture)
        return (flow + grid.resize_flow(update, (w, h))).astype(np.float32)
    # calc() writes into the flow it is given: hand it a copy.
    polished = refiner.calc(grey_s, grey_t, np.array(flow, np.float32, order='C', copy=True))
    if min_texture > 0:
        _keep_flat(polished, flow, grey_s, min_texture)
    return polished.astype(np.float32)


def _keep_flat(polished: np.ndarray, unpolished, grey: np.ndarray, min_texture: float) -> None:
    """Put ``unpolished`` back into ``polished`` where ``grey`` has no texture (in place)."""
    flat = cv2.cornerMinEigenVal(grey.astype(np.float32) / 255.0, 5) < min_texture
    np.copyto(polished, unpolished, where=flat[..., None])   # a boolean index copies slowly
