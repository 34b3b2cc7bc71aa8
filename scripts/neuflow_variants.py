#!/usr/bin/env python3
"""``neuflow-fast`` under variants that no option reaches, by patching the code for one process:
what a finer residual or an fp32 refinement would buy in accuracy and cost in time (README,
"Back on an AMX machine").

    python scripts/neuflow_variants.py eval VARIANT dense-match-eval args...
        the evaluation CLI with the variant in force
    python scripts/neuflow_variants.py speed VARIANT THREADS '{"name": {options}}' [N]
        scripts/neuflow_speed.py with the variant in force (dis interleaved as the reference)
    python scripts/neuflow_variants.py network [N]
        the network's pass alone at 640x480 (256 px working size), one thread, every variant
        that touches the network interleaved, median of N calls (default 25)

VARIANT: base; residual-fine (the ``fast`` residual at DIS finest scale 1 instead of 2);
refiner-fp32 (the refinement steps outside autocast); refiner-corr-fp32 (also the local
correlation in fp32).
"""
import runpy
import sys
import time

import numpy as np
import torch

from dense_match_ros.core import refine
from dense_match_ros.core.networks import neuflow as nf

_create_dis = refine.create_dis
_refiner_forward = nf.Refiner.forward
_correlation_dtype = nf.NeuFlowNet.correlation_dtype


def _fine_residual(preset: str = 'medium'):
    dis = _create_dis(preset)
    if preset == 'fast':
        dis.setFinestScale(1)
    return dis


def _fp32_refiner(self, hidden, context_term, corr, flow):
    with torch.autocast('cpu', enabled=False):
        return _refiner_forward(self, hidden.float(), context_term.float(), corr.float(),
                                flow.float())


def apply(variant: str) -> None:
    """Put ``variant`` in force for this process."""
    refine.create_dis, nf.Refiner.forward = _create_dis, _refiner_forward
    nf.NeuFlowNet.correlation_dtype = _correlation_dtype
    if variant == 'residual-fine':
        refine.create_dis = _fine_residual
    elif variant in ('refiner-fp32', 'refiner-corr-fp32'):
        nf.Refiner.forward = _fp32_refiner
        if variant == 'refiner-corr-fp32':
            nf.NeuFlowNet.correlation_dtype = lambda self, dtype: _correlation_dtype(self, None)
    elif variant != 'base':
        raise SystemExit(f'unknown variant {variant!r}')


def network_times(calls: int) -> str:
    from dense_match_ros.core.device import set_threads
    from dense_match_ros.core.registry import load_matcher
    from dense_match_ros.evaluation.bench_match import photo_pair
    set_threads(1)
    matcher = load_matcher('neuflow-fast')
    source, target = photo_pair((480, 640))
    variants = {'bf16': (_refiner_forward, matcher.net._corr_dtype),
                'refiner fp32': (_fp32_refiner, matcher.net._corr_dtype),
                'refiner + correlation fp32': (_fp32_refiner, None)}
    times = {name: [] for name in variants}
    for _ in range(calls + 1):   # the first round warms up and is dropped
        for name, (forward, corr_dtype) in variants.items():
            nf.Refiner.forward, matcher.net._corr_dtype = forward, corr_dtype
            t0 = time.perf_counter()
            matcher.network_flows(source, target)
            times[name].append(time.perf_counter() - t0)
    return ' | '.join(f'{name} {1000 * float(np.median(t[1:])):.1f} ms'
                      for name, t in times.items())


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else ''
    if mode == 'network':
        print(network_times(int(sys.argv[2]) if len(sys.argv) > 2 else 25))
        return
    if mode not in ('eval', 'speed') or len(sys.argv) < 3:
        raise SystemExit(__doc__)
    apply(sys.argv[2])
    if mode == 'eval':
        from dense_match_ros.evaluation.cli import main as evaluate
        sys.argv = ['dense-match-eval'] + sys.argv[3:]
        evaluate()
    else:
        sys.argv = ['scripts/neuflow_speed.py'] + sys.argv[3:]
        runpy.run_path('scripts/neuflow_speed.py', run_name='__main__')


if __name__ == '__main__':
    main()
