"""Classical baseline: OpenCV's DIS optical flow with a forward-backward check.

It needs no training, so the whole pipeline (node, replay, evaluation) runs before any
network exists, and it is the baseline every learned method has to beat.
"""
from __future__ import annotations

import cv2
import numpy as np

from dense_match_ros.core import grid
from dense_match_ros.core.registry import Matcher

PRESETS = {  # DIS presets by name, for this method and for core.refine
    'ultrafast': cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    'fast': cv2.DISOPTICAL_FLOW_PRESET_FAST,
    'medium': cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


class DisMatcher(Matcher):
    """DIS flow (grey images) with matchability from forward-backward consistency.

    Matchability is ``exp(-(e / sigma)^2)`` of the forward-backward error e in pixels,
    zero where the match leaves the target; ``sigma`` = 1 px by default, so a pixel whose
    round trip misses by 1 px scores 0.37 and one that misses by 2 px 0.02.
    """

    def __init__(self, device: str = 'cpu', weights: str | None = None,
                 preset: str = 'medium', fb_sigma: float = 1.0, max_side: int = 0) -> None:
        if weights:
            raise ValueError('dis has no weights; leave `weights` empty')
        if preset not in PRESETS:
            raise ValueError(f'preset must be one of {sorted(PRESETS)}, got {preset!r}')
        self.device = 'cpu'  # OpenCV's DIS runs on the CPU whatever was asked for.
        self.preset = preset
        self.fb_sigma = float(fb_sigma)
        self.max_side = int(max_side)
        self._dis = cv2.DISOpticalFlow_create(PRESETS[preset])

    def _flow(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._dis.calc(a, b, None)

    def _match(self, source: np.ndarray, target: np.ndarray):
        h, w = source.shape[:2]
        th, tw = target.shape[:2]
        # Work on one grid: the source's size, optionally capped by max_side.
        scale = min(1.0, self.max_side / max(h, w)) if self.max_side > 0 else 1.0
        ww, wh = max(2, round(w * scale)), max(2, round(h * scale))
        src = cv2.cvtColor(cv2.resize(source, (ww, wh), interpolation=cv2.INTER_AREA)
                           if (ww, wh) != (w, h) else source, cv2.COLOR_RGB2GRAY)
        tgt = cv2.cvtColor(cv2.resize(target, (ww, wh), interpolation=cv2.INTER_AREA)
                           if (ww, wh) != (tw, th) else target, cv2.COLOR_RGB2GRAY)
        forward = self._flow(src, tgt)
        backward = self._flow(tgt, src)
        matchability = grid.forward_backward_consistency(forward, backward, self.fb_sigma)
        # Back to the source's full grid and the target's own pixel frame.
        flow = grid.resize_flow(forward, (w, h), target_scale=(tw / w, th / h))
        if (ww, wh) != (w, h):
            matchability = cv2.resize(matchability, (w, h), interpolation=cv2.INTER_LINEAR)
        return flow, matchability
