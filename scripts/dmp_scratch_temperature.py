#!/usr/bin/env python3
"""``dmp-scratch`` on the HPatches pair at 240x240 under several softmax temperatures: the
plain correlation matcher's error (iteration 0) and after N iterations, without the DIS
residual or polish, so only the network's flow is measured.

    python scripts/dmp_scratch_temperature.py --iterations 60 --temperatures 0.02,0.01,0.005,0.002

A companion of ``scripts/dmp_trunk_matches.py`` (how often the trunk's nearest neighbour is
right): a sharper softmax cannot make up for wrong nearest neighbours (README, "dmp-scratch's
start").
"""
import argparse
import math

import numpy as np
import torch

from dense_match_ros.core.registry import load_matcher
from dense_match_ros.data.shared_sets import load_flow_set
from dense_match_ros.evaluation import metrics


def error(pair, temperature: float, iterations: int) -> float:
    m = load_matcher('dmp-scratch', device='cpu', iterations=iterations, time_budget_s=0,
                     refine='none', polish=0)
    with torch.no_grad():
        m.net.log_scale.fill_(-math.log(temperature))
    m.reset = lambda: None          # keep the set temperature: each matcher serves one call
    return metrics.aepe(m.match(pair.source, pair.target).flow, pair.flow, pair.valid)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--iterations', type=int, default=60)
    p.add_argument('--temperatures', default='0.02,0.01,0.005,0.002')
    args = p.parse_args()
    torch.set_num_threads(1)
    pair = load_flow_set('hpatches240')[0]
    print(f'zero flow: {metrics.aepe(np.zeros_like(pair.flow), pair.flow, pair.valid):.2f} px')
    for temperature in (float(t) for t in args.temperatures.split(',')):
        print(f'temperature {temperature}: iteration 0 {error(pair, temperature, 0):.2f} px, '
              f'after {args.iterations} {error(pair, temperature, args.iterations):.2f} px', flush=True)


if __name__ == '__main__':
    main()
