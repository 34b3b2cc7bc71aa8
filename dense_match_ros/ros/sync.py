"""Approximate-time pairing of N message streams, for installs without ``message_filters``.

``message_filters`` (a separate ROS package, not on PyPI) is used when importable; this is
the fallback with the same observable behaviour as its Python
``ApproximateTimeSynchronizer``, so that pair mode pairs the same frames either way:

* each input keeps at most ``queue_size`` messages keyed by stamp (a newer message with an
  equal stamp replaces the older one); beyond that the oldest stamp is discarded;
* only the arrival of a message can complete a set. For every *other* input, the candidate
  stamps are those within ``slop`` (inclusive) of the new stamp, tried nearest first; an input
  without a candidate means no set this time;
* the first combination (in that nearest-first order, inputs in index order) whose whole
  spread ``max - min`` is strictly below ``slop`` is emitted, in input order, and its
  messages leave their queues. Unmatched older messages stay until they are pushed out.

No rclpy: stamps are integer nanoseconds (read from ``msg.header.stamp`` when not given).
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Callable

from dense_match_ros.ros.convert import stamp_to_ns


class ApproximateTimeSynchronizer:
    """Pairs messages of ``num_inputs`` streams whose stamps lie within ``slop`` seconds."""

    def __init__(self, num_inputs: int, queue_size: int, slop: float,
                 callback: Callable[..., Any] | None = None) -> None:
        if num_inputs < 2:
            raise ValueError('need at least two inputs to synchronise')
        if queue_size < 1:
            raise ValueError(f'queue_size must be >= 1, got {queue_size}')
        if slop < 0:
            raise ValueError(f'slop must be >= 0, got {slop}')
        self.queue_size = int(queue_size)
        self.slop_ns = int(round(slop * 1e9))
        self.queues: list[dict[int, Any]] = [{} for _ in range(num_inputs)]
        self._callbacks: list[Callable[..., Any]] = [callback] if callback else []
        self._lock = threading.Lock()

    def register_callback(self, callback: Callable[..., Any]) -> None:
        """Call ``callback(msg_0, ..., msg_{N-1})`` for every completed set."""
        self._callbacks.append(callback)

    registerCallback = register_callback  # message_filters spelling

    def input(self, index: int) -> Callable[[Any], None]:
        """A one-argument callable feeding input ``index`` (a subscription callback)."""
        return lambda msg: self.add(index, msg)

    def add(self, index: int, msg: Any, stamp_ns: int | None = None) -> tuple | None:
        """Offer a message on input ``index``; returns the emitted set, if this completed one."""
        stamp = stamp_to_ns(msg.header.stamp) if stamp_ns is None else int(stamp_ns)
        with self._lock:
            emitted = self._add_locked(index, msg, stamp)
        if emitted is not None:
            for callback in self._callbacks:
                callback(*emitted)
        return emitted

    def _add_locked(self, index: int, msg: Any, stamp: int) -> tuple | None:
        own = self.queues[index]
        own[stamp] = msg
        while len(own) > self.queue_size:
            del own[min(own)]
        candidates: list[list[int]] = []
        for j, queue in enumerate(self.queues):
            if j == index:
                continue
            near = [(abs(s - stamp), s) for s in queue if abs(s - stamp) <= self.slop_ns]
            if not near:
                return None
            near.sort(key=lambda d: d[0])  # stable: equal deltas keep arrival order
            candidates.append([s for _, s in near])
        for combo in itertools.product(*candidates):
            stamps = list(combo)
            stamps.insert(index, stamp)
            if max(stamps) - min(stamps) < self.slop_ns and all(
                    s in q for q, s in zip(self.queues, stamps)):
                msgs = tuple(q.pop(s) for q, s in zip(self.queues, stamps))
                return msgs
        return None

    def clear(self) -> None:
        """Drop every queued message (e.g. after a stream reset)."""
        with self._lock:
            for queue in self.queues:
                queue.clear()
