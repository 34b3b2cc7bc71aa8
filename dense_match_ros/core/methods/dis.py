"""Classical baseline: OpenCV's DIS optical flow with a forward-backward check.

It needs no training, so the whole pipeline (node, replay, evaluation) runs before any
network exists, and it is the baseline every learned method has to beat.
"""
from __future__ import annotations

import numpy as np

from dense_match_ros.core.geometry import grid
from dense_match_ros.core.dis_presets import (MIN_SIDE, check_concurrency, check_preset, create_dis,
                                              runs_concurrently, two_way_flow_staged)
from dense_match_ros.core.registry import Matcher


class DisMatcher(Matcher):
    """DIS flow (grey images) with matchability from forward-backward consistency.

    Matchability is ``exp(-(e / sigma)^2)`` of the forward-backward error e in pixels,
    zero where the match leaves the target; ``sigma`` = 1 px by default, so a pixel whose
    round trip misses by 1 px scores 0.37 and one that misses by 2 px 0.02. ``fb_preset``
    names the DIS preset of the backward flow (empty: ``preset``) and ``fb_scale`` its
    resolution relative to the working grid; the forward flow, the output, always uses
    ``preset`` at the working size. ``concurrent`` computes the backward flow in a second
    thread beside the forward one: ``auto`` does so when OpenCV may use more than one
    thread (``threads`` >= 2 in the node), so a one-thread setting stays on one core.
    """

    def __init__(self, device: str = 'cpu', weights: str | None = None,
                 preset: str = 'medium', fb_sigma: float = 1.0, max_side: int = 0,
                 fb_preset: str = '', fb_scale: float = 1.0, concurrent: str | bool = 'auto') -> None:
        if weights:
            raise ValueError('dis has no weights; leave `weights` empty')
        check_preset(preset)
        if fb_preset:
            check_preset(fb_preset, 'fb_preset')
        if not fb_sigma > 0:
            raise ValueError(f'fb_sigma must be > 0 px (the forward-backward tolerance), got {fb_sigma}')
        if int(max_side) != 0 and int(max_side) < MIN_SIDE:
            raise ValueError(f'max_side must be 0 (no cap) or at least {MIN_SIDE}, got {max_side}')
        if not 0.1 <= float(fb_scale) <= 1.0:
            raise ValueError(f'fb_scale must be in [0.1, 1] (the backward flow\'s resolution '
                             f'relative to the working grid), got {fb_scale}')
        concurrent = check_concurrency(concurrent)
        self.device = 'cpu'  # OpenCV's DIS runs on the CPU whatever was asked for.
        self.preset = preset
        self.fb_sigma = float(fb_sigma)
        self.max_side = int(max_side)
        self._dis = create_dis(preset)
        # The backward flow only feeds the consistency check (matchability, pose selection).
        self.fb_preset = fb_preset or preset
        self._dis_backward = create_dis(self.fb_preset)   # its own buffers: may run beside
        self.fb_scale = float(fb_scale)
        self.concurrent = concurrent

    def _match(self, source: np.ndarray, target: np.ndarray):
        flow, matchability = self._match_staged(source, target)
        return flow, matchability()

    def _match_staged(self, source: np.ndarray, target: np.ndarray):
        # The flow is out before the backward flow of the check is computed: the node
        # publishes it meanwhile (640x480, one thread: 34 of the 85 ms).
        h, w = source.shape[:2]
        th, tw = target.shape[:2]
        if min(h, w, th, tw) < MIN_SIDE:
            raise ValueError(f'dis needs images of at least {MIN_SIDE} px a side, got source '
                             f'{w}x{h} and target {tw}x{th}')
        # Work on one grid: the source's size, optionally capped by max_side.
        ww, wh = grid.working_size((w, h), self.max_side, min_side=MIN_SIDE)
        concurrent = runs_concurrently(self.concurrent)
        forward, backward = two_way_flow_staged(self._dis, source, target, (ww, wh),
                                                self._dis_backward, self.fb_scale, concurrent)
        flow, _ = grid.to_source_grid(forward, None, (w, h), (ww, wh), (tw, th))

        def matchability() -> np.ndarray:
            consistency = grid.forward_backward_consistency(forward, backward(), self.fb_sigma)
            return grid.to_source_grid(forward, consistency, (w, h), (ww, wh), (tw, th))[1]

        return flow, matchability
