#!/usr/bin/env python3
"""Where neuflow's time goes, one thread: per-stage time of ``match()`` (network passes, DIS
residual, fusion with DIS, polish, the pre-alignment's homography from the first flow and
from sparse features) for ``neuflow`` and ``neuflow-fast`` on the bench pair at 640x480 and
240x240 and on real pairs of the shared data (a TUM frame pair, a Sintel pair, the HPatches
pair turned by 30 degrees, where the pre-alignment runs the matcher twice), ``dis`` on the
same pairs, the 640x480 second pass alone, and one training step (batch 8, 192x192, bf16
autocast) of the ``neuflow`` task.

    python scripts/neuflow_timing.py [out.json]
"""
import json
import sys
import time

import cv2
import numpy as np
import torch

from dense_match_ros.core import refine
from dense_match_ros.core.geometry import prealign
from dense_match_ros.core.methods import neuflow as neuflow_method
from dense_match_ros.core.networks.neuflow import NeuFlowConfig, NeuFlowNet
from dense_match_ros.core.registry import load_matcher
from dense_match_ros.evaluation.bench_match import photo_pair
from dense_match_ros.training.neuflow_task import NeuFlowLossConfig, sequence_loss

torch.set_num_threads(1)
cv2.setNumThreads(1)


def median_ms(fn, n=5):
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def stages(matcher, pair, n=3):
    """Mean ms per stage over n calls, by wrapping the stages' functions."""
    source, target = pair
    matcher.match(source, target)
    spent = {}

    def wrap(name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return timed
    saved = (matcher._pass, matcher._fuse_with_dis, refine.dis_residual, refine.variational_polish,
             prealign.estimate_homography, prealign.homography_from_flow,
             neuflow_method.two_way_flow)
    matcher._pass = wrap('network passes', saved[0])
    matcher._fuse_with_dis = wrap('fusion with DIS (after its flows)', saved[1])
    neuflow_method.two_way_flow = wrap("DIS's two flows for the fusion", saved[6])
    refine.dis_residual = wrap('DIS residual', saved[2])
    refine.variational_polish = wrap('polish', saved[3])
    prealign.estimate_homography = wrap('sparse homography', saved[4])
    prealign.homography_from_flow = wrap('homography from the flow', saved[5])
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            matcher.match(source, target)
        total = (time.perf_counter() - t0) / n
    finally:
        matcher._pass, matcher._fuse_with_dis = saved[0], saved[1]
        neuflow_method.two_way_flow = saved[6]
        refine.dis_residual, refine.variational_polish = saved[2], saved[3]
        prealign.estimate_homography, prealign.homography_from_flow = saved[4], saved[5]
    return {'total_ms': 1000 * total, **{k: 1000 * v / n for k, v in spent.items()}}


def training_step_ms():
    net = NeuFlowNet(NeuFlowConfig()).train()
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    s, t = (torch.rand(8, 3, 192, 192).contiguous(memory_format=torch.channels_last)
            for _ in range(2))
    gt, vis = torch.randn(8, 192, 192, 2), torch.ones(8, 192, 192, dtype=torch.bool)

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = net(s, t)
        loss, _ = sequence_loss(out, gt, vis, NeuFlowLossConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return median_ms(step, 3)


def pairs():
    """The bench pairs and, where ../shared/data is present, real ones."""
    out = {f'bench {w}x{h}': photo_pair((h, w)) for w, h in ((640, 480), (240, 240))}
    try:
        from dense_match_ros.data import shared_sets
        tum = shared_sets.load_pose_set('tum')[0]
        out['TUM 640x480 (first pair)'] = (tum.source, tum.target)
        sintel = shared_sets.load_flow_set('sintel')[0]
        out['Sintel 1024x436 (first pair)'] = (sintel.source, sintel.target)
        turned = shared_sets.load_flow_set('hpatches_viewpoint')[1]
        out['HPatches 240x240 turned 30 degrees'] = (turned.source, turned.target)
    except (FileNotFoundError, OSError, IndexError) as exc:
        print(f'shared data: {exc}; bench pairs only', file=sys.stderr)
    return out


def main():
    record = {'match_stages': {}, 'dis_ms': {}}
    test_pairs = pairs()
    dis = load_matcher('dis', device='cpu')
    for name, (a, b) in test_pairs.items():
        record['dis_ms'][name] = median_ms(lambda: dis.match(a, b))
    for method in ('neuflow-fast', 'neuflow'):
        matcher = load_matcher(method, device='cpu')
        record['match_stages'][method] = {name: stages(matcher, pair)
                                          for name, pair in test_pairs.items()}
    x, y = (torch.rand(1, 3, 480, 640).contiguous(memory_format=torch.channels_last)
            for _ in range(2))
    start = torch.zeros(2, 2, 60, 80)
    with torch.no_grad(), matcher._autocast():
        record['second_pass_640x480_ms'] = median_ms(
            lambda: matcher.net(x, y, iterations=matcher.cascade_steps, init_flow=start,
                                two_way=True))
    record['training_step_ms'] = training_step_ms()
    print(json.dumps(record, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], 'w') as f:
            json.dump(record, f, indent=1)


if __name__ == '__main__':
    main()
