#!/usr/bin/env python3
"""``match()`` time of ``dis`` and ``neuflow-fast`` (with and without DIS first) on the
bench pair (turned: not settled) and the TUM frame pairs (settled), median of 15 calls.

    python scripts/neuflow_speed.py THREADS
"""
import sys
import time

import numpy as np

from dense_match_ros.core.device import set_threads
from dense_match_ros.core.registry import load_matcher
from dense_match_ros.data import shared_sets
from dense_match_ros.evaluation.bench_match import photo_pair


def main() -> None:
    set_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    pairs = {'bench 640x480 (turned)': photo_pair((480, 640))}
    for pair in shared_sets.load_pose_set('tum'):
        pairs['TUM ' + pair.name] = (pair.source, pair.target)
    matchers = {'dis': load_matcher('dis'), 'neuflow-fast': load_matcher('neuflow-fast'),
                'neuflow-fast settled_share=0': load_matcher('neuflow-fast', settled_share=0.0)}
    for name, (source, target) in pairs.items():
        times = {m: [] for m in matchers}
        for matcher in matchers.values():
            matcher.match(source, target)
        for _ in range(15):   # interleaved: a busy neighbour slows every method alike
            for key, matcher in matchers.items():
                t0 = time.perf_counter()
                matcher.match(source, target)
                times[key].append(time.perf_counter() - t0)
        base = 1000 * float(np.median(times['dis']))
        print(f'{name:26s} ' + ' | '.join(
            f'{key} {1000 * float(np.median(t)):6.1f} ms ({1000 * float(np.median(t)) / base:.2f}x)'
            for key, t in times.items()), flush=True)


if __name__ == '__main__':
    main()
