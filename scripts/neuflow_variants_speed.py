#!/usr/bin/env python3
"""``match()`` time of ``dis`` and of ``neuflow-fast`` under several option sets on the bench
pair at 640x480, calls interleaved (a busy neighbour slows every entry alike), median of N.

    python scripts/neuflow_variants_speed.py THREADS '{"name": {"option": value}, ...}' [N]

e.g. '{"default": {}, "no cross": {"dis_cross": false}}' for what the cross check costs.
"""
import json
import sys
import time

import numpy as np

from dense_match_ros.core.device import set_threads
from dense_match_ros.core.registry import load_matcher
from dense_match_ros.evaluation.bench_match import photo_pair


def main() -> None:
    set_threads(int(sys.argv[1]))
    variants = json.loads(sys.argv[2])
    calls = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    source, target = photo_pair((480, 640))
    matchers = {'dis': load_matcher('dis')}
    matchers.update({name: load_matcher('neuflow-fast', **opts) for name, opts in variants.items()})
    times = {name: [] for name in matchers}
    for matcher in matchers.values():
        matcher.match(source, target)
    for _ in range(calls):
        for name, matcher in matchers.items():
            t0 = time.perf_counter()
            matcher.match(source, target)
            times[name].append(time.perf_counter() - t0)
    base = float(np.median(times['dis']))
    print(' | '.join(f'{name} {1000 * float(np.median(t)):.1f} ms ({float(np.median(t)) / base:.2f}x)'
                     for name, t in times.items()))


if __name__ == '__main__':
    main()
