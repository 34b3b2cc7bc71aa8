"""OpenCV's DIS optical flow: presets by name and the two-way call, shared by the ``dis``
method, the DIS refinement of learned flows (:mod:`.refine`) and ``neuflow``'s fusion with
DIS, so no method imports another."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import cv2
import numpy as np

from dense_match_ros.core.geometry import grid

MIN_SIDE = 12  # OpenCV's DIS refuses smaller images (its coarsest patch grid needs them)

PRESETS = {
    'ultrafast': cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    'fast': cv2.DISOPTICAL_FLOW_PRESET_FAST,
    'medium': cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}

CONCURRENCY = ('auto', 'on', 'off')
"""A method's ``concurrent`` option: DIS flows in a second thread beside other work always,
never, or (``auto``) when OpenCV may use more than one thread (``threads`` >= 2 in the node),
so a one-thread setting stays on one core."""


def check_concurrency(concurrent: str | bool) -> str:
    """The ``concurrent`` option as one of :data:`CONCURRENCY` (YAML reads a bare on/off as a
    boolean), or a ValueError naming the choices."""
    if isinstance(concurrent, bool):
        concurrent = 'on' if concurrent else 'off'
    if concurrent not in CONCURRENCY:
        raise ValueError(f'concurrent must be one of {CONCURRENCY}, got {concurrent!r}')
    return concurrent


def runs_concurrently(concurrent: str) -> bool:
    """Whether a checked ``concurrent`` setting puts DIS beside other work now."""
    return concurrent == 'on' or (concurrent == 'auto' and cv2.getNumThreads() > 1)


def check_preset(preset: str, what: str = 'preset') -> None:
    """Refuse an unknown preset name, naming the option it came from."""
    if preset not in PRESETS:
        raise ValueError(f'{what} must be one of {sorted(PRESETS)}, got {preset!r}')


def create_dis(preset: str = 'medium') -> cv2.DISOpticalFlow:
    """A DIS instance of the named preset."""
    check_preset(preset)
    return cv2.DISOpticalFlow_create(PRESETS[preset])


_backward_worker: ThreadPoolExecutor | None = None


def _worker() -> ThreadPoolExecutor:
    """One process-wide thread for DIS flows computed beside other work."""
    global _backward_worker
    if _backward_worker is None:
        _backward_worker = ThreadPoolExecutor(1, thread_name_prefix='dis_backward')
    return _backward_worker


def two_way_flow_in_background(dis: cv2.DISOpticalFlow, source: np.ndarray, target: np.ndarray,
                               size: tuple[int, int]) -> tuple[Future, Future]:
    """(forward, backward) futures of :func:`two_way_flow`'s two flows, computed one after
    the other on the process-wide DIS thread, the backward one first: a caller that checks
    its own flow through it can do so while the forward one is still running. ``dis`` must
    not be used elsewhere until both are done (it keeps per-call buffers)."""
    grey_s, grey_t = _greys(source, target, size)
    backward = _worker().submit(dis.calc, grey_t, grey_s, None)
    return _worker().submit(dis.calc, grey_s, grey_t, None), backward


def in_background(fn, *args) -> Future:
    """``fn(*args)`` on the process-wide DIS thread, after everything handed to it before:
    work that needs the flows of :func:`two_way_flow_in_background` (their ``.result()`` is
    ready by then) can follow them there."""
    return _worker().submit(fn, *args)


def _greys(source: np.ndarray, target: np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
    """Both RGB images as grey, at the working ``size`` (W, H)."""
    return [cv2.cvtColor(img if img.shape[1::-1] == tuple(size) else
                         cv2.resize(img, tuple(size), interpolation=cv2.INTER_AREA),
                         cv2.COLOR_RGB2GRAY) for img in (source, target)]


def two_way_flow(dis: cv2.DISOpticalFlow, source: np.ndarray, target: np.ndarray,
                 size: tuple[int, int], backward_dis: cv2.DISOpticalFlow | None = None,
                 backward_scale: float = 1.0, concurrent: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(forward, backward) DIS flows between two RGB images brought to one working ``size``
    (W, H): forward on the source's working grid, backward on the target's.

    The backward flow often only serves a consistency check, where a cheaper one buys most
    of the check for a fraction of a forward call: ``backward_dis`` (default: ``dis``)
    computes it, at ``backward_scale`` times the working size, and it is resampled back to
    the working grid. ``concurrent`` computes it in a second thread while the forward one
    runs (OpenCV releases the GIL; DIS itself uses a second core poorly); it needs its own
    ``backward_dis``, since one DIS instance keeps per-call buffers.
    """
    forward, backward = two_way_flow_staged(dis, source, target, size, backward_dis,
                                            backward_scale, concurrent)
    return forward, backward()


def two_way_flow_staged(dis: cv2.DISOpticalFlow, source: np.ndarray, target: np.ndarray,
                        size: tuple[int, int], backward_dis: cv2.DISOpticalFlow | None = None,
                        backward_scale: float = 1.0, concurrent: bool = False
                        ) -> tuple[np.ndarray, Callable[[], np.ndarray]]:
    """:func:`two_way_flow` with the backward flow left for later: the forward flow and a
    call that returns the backward one. Without ``concurrent`` the call computes it (the
    forward flow can be used meanwhile: the node publishes it); with it, it was started on
    the DIS thread before the forward one and the call waits for it. Call it before
    ``dis`` (or ``backward_dis``) is used again."""
    grey = _greys(source, target, size)
    small = (max(1, round(size[0] * backward_scale)), max(1, round(size[1] * backward_scale)))
    resized = small != tuple(size) and min(small) >= MIN_SIDE

    def backward() -> np.ndarray:
        s, t = ([cv2.resize(g, small, interpolation=cv2.INTER_AREA) for g in grey] if resized
                else grey)
        flow = (backward_dis or dis).calc(t, s, None)
        return grid.resize_flow(flow, tuple(size)) if resized else flow

    if concurrent:
        if backward_dis is None or backward_dis is dis:
            raise ValueError('a concurrent backward flow needs its own DIS instance')
        pending = _worker().submit(backward)
        return dis.calc(grey[0], grey[1], None), pending.result
    return dis.calc(grey[0], grey[1], None), backward
