"""The node's scheduling and reporting helpers; plain threading, no ROS.

:class:`Mailbox` is how subscription callbacks hand work to the worker without ever waiting
on the model, :class:`Throttle` keeps a bad stream from flooding the log while still saying
what went wrong, :class:`RateMeter` feeds the rates in /diagnostics, and
:func:`bound_heap_growth` keeps a long-running node's memory flat.
"""
from __future__ import annotations

import collections
import ctypes
import ctypes.util
import sys
import threading
import time
from typing import Any


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameter numbers


def bound_heap_growth(mmap_threshold: int = 256 * 1024, trim_threshold: int = 1024 * 1024) -> bool:
    """Fix glibc's mmap and trim thresholds, so that freed image-sized buffers go back to the
    system; True where that was done (glibc), False elsewhere.

    By default glibc raises its mmap threshold to the size of every large block freed, so
    after the first frames each 0.9-2.4 MB image or flow buffer comes from the heap, and
    heap holes left by buffers of different lifetimes are kept: the node's RSS then
    climbed by 1-5 % over the first ten minutes of a 30 Hz stream before levelling off
    (README, "Latency and endurance"). With fixed thresholds, blocks above 256 KiB are
    mapped and unmapped on their own (a page-zeroing cost of well under 0.1 ms per frame).
    """
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
                and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


class Throttle:
    """One warning per cause per period; the next one says how many were swallowed.

    rclpy's own ``throttle_duration_sec`` keys on the call site, which would let one noisy
    cause (say, a bad encoding at 30 Hz) hide a different one logged from the same line.
    """

    def __init__(self, logger, period_s: float) -> None:
        self._logger = logger
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self.last_message = ''
        self._last_time = -float('inf')

    def recent(self, window_s: float) -> str:
        """The last warning if it was logged within ``window_s``, else '' (a quiet stream
        clears it)."""
        return self.last_message if time.monotonic() - self._last_time <= window_s else ''

    def warn(self, reason: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self.period_s:
                self._suppressed[reason] += 1
                return
            self._last[reason] = now
            suppressed = self._suppressed.pop(reason, 0)
            self.last_message = f'{reason}: {message}'
            self._last_time = now
        extra = f' ({suppressed} more since the last report)' if suppressed else ''
        self._logger.warning(f'[{reason}] {message}{extra}')


class RecentCount:
    """How much a growing counter grew within the last ``window_s`` (samples as it is read)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: collections.deque = collections.deque()

    def update(self, value: int, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        self._samples.append((now, value))
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        return value - self._samples[0][1]


class Mailbox:
    """One-slot hand-over from callbacks to the worker: the newest job wins."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._job: Any = None
        self._closed = False

    def put(self, job: Any) -> bool:
        """Store ``job``; True when it replaced one the worker never saw."""
        with self._cond:
            replaced = self._job is not None
            self._job = job
            self._cond.notify()
            return replaced

    def take(self, timeout: float = 0.5) -> Any:
        with self._cond:
            if self._job is None and not self._closed:
                self._cond.wait(timeout)
            job, self._job = self._job, None
            return job

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class RateMeter:
    """Events per second over a sliding window (0 with fewer than two events in it)."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._times: collections.deque = collections.deque()

    def tick(self, now: float) -> None:
        self._times.append(now)

    def rate(self, now: float) -> float:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        span = max(now - self._times[0], 1e-9)
        return (len(self._times) - 1) / span if span > 0 else 0.0
