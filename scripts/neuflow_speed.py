#!/usr/bin/env python3
"""``match()`` time of ``dis`` and ``neuflow-fast``, calls interleaved (a busy neighbour slows
every entry alike), median of N.

    python scripts/neuflow_speed.py THREADS
        neuflow-fast with and without DIS first, on the bench pair (turned: not settled) and
        the TUM frame pairs (settled), N = 15
    python scripts/neuflow_speed.py THREADS '{"name": {"option": value}, ...}' [N]
        neuflow-fast under each option set, on the bench pair, N = 20 by default; e.g.
        '{"x": {}, "no x": {"dis_cross": false, "dis_margin_px": 0}}' for what the cross
        check costs
"""
import json
import sys
import time

import numpy as np

from dense_match_ros.core.device import set_threads
from dense_match_ros.core.registry import load_matcher
from dense_match_ros.data import shared_sets
from dense_match_ros.evaluation.bench_match import photo_pair


def interleaved(matchers: dict, source: np.ndarray, target: np.ndarray, calls: int) -> str:
    """One line: each matcher's median time and its ratio to the first one's."""
    times = {name: [] for name in matchers}
    for matcher in matchers.values():
        matcher.match(source, target)
    for _ in range(calls):
        for name, matcher in matchers.items():
            t0 = time.perf_counter()
            matcher.match(source, target)
            times[name].append(time.perf_counter() - t0)
    base = float(np.median(next(iter(times.values()))))
    return ' | '.join(f'{name} {1000 * float(np.median(t)):6.1f} ms '
                      f'({float(np.median(t)) / base:.2f}x)' for name, t in times.items())


def main() -> None:
    set_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    bench = photo_pair((480, 640))
    matchers = {'dis': load_matcher('dis')}
    if len(sys.argv) > 2:
        matchers.update({name: load_matcher('neuflow-fast', **options)
                         for name, options in json.loads(sys.argv[2]).items()})
        calls = int(sys.argv[3]) if len(sys.argv) > 3 else 20
        print(interleaved(matchers, *bench, calls))
        return
    matchers['neuflow-fast'] = load_matcher('neuflow-fast')
    matchers['neuflow-fast settled_share=0'] = load_matcher('neuflow-fast', settled_share=0.0)
    pairs = {'bench 640x480 (turned)': bench}
    for pair in shared_sets.load_pose_set('tum'):
        pairs['TUM ' + pair.name] = (pair.source, pair.target)
    for name, (source, target) in pairs.items():
        print(f'{name:26s} ' + interleaved(matchers, source, target, 15), flush=True)


if __name__ == '__main__':
    main()
