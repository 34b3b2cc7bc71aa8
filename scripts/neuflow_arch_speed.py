#!/usr/bin/env python3
"""Forward time of untrained ``neuflow`` networks of several sizes, as ``neuflow-fast`` runs
them: both directions in one call at 256x192, bf16 autocast where the CPU has bf16 (fp32
elsewhere, as ``precision='auto'``), BatchNorm folded, channels-last, one thread; calls
interleaved, median of 15. What a lighter network would save per pair before any of it is
trained (the weights do not change the time).

    python scripts/neuflow_arch_speed.py
"""
import time

import numpy as np
import torch

from dense_match_ros.core.device import autocast, inference_dtype
from dense_match_ros.core.networks.neuflow import NeuFlowConfig, NeuFlowNet

LITE = {'hidden': 32, 'corr_channels': 32, 'flow_channels': 16, 'head_channels': 32,
        'mask_channels': 64, 'match_channels': 16}
SIZES = {  # name: (config, refinement steps at test time)
    'shipped: width 1.0, hidden 64, 4 steps': (NeuFlowConfig(), 4),
    'width 1.0, hidden 64, 3 steps': (NeuFlowConfig(), 3),
    'width 1.0, hidden 48, 4 steps': (NeuFlowConfig(hidden=48), 4),
    'width 0.75, hidden 48, 4 steps': (NeuFlowConfig(width=0.75, hidden=48), 4),
    'width 0.75, hidden 48, 3 steps': (NeuFlowConfig(width=0.75, hidden=48), 3),
    'width 0.5, hidden 32, 4 steps': (NeuFlowConfig(width=0.5, hidden=32), 4),
    'width 1.0, hidden 32, 3 steps': (NeuFlowConfig(hidden=32), 3),
    'width 0.75, hidden 32, 3 steps': (NeuFlowConfig(width=0.75, hidden=32), 3),
    'width 0.5, hidden 32, 3 steps': (NeuFlowConfig(width=0.5, hidden=32), 3),
    'lite: width 1.0, hidden 32, slim heads, 3 steps': (NeuFlowConfig(**LITE), 3),
    'lite: width 1.0, hidden 32, slim heads, 4 steps': (NeuFlowConfig(**LITE), 4),
    'lite at width 0.75, 3 steps': (NeuFlowConfig(**{**LITE, 'width': 0.75}), 3),
}


def main() -> None:
    torch.set_num_threads(1)
    amp = inference_dtype('auto', 'cpu')
    print(f'autocast: {amp}')
    nets = {}
    for name, (config, steps) in SIZES.items():
        net = NeuFlowNet(config).eval()
        net.fold_batch_norm()
        net = net.to(memory_format=torch.channels_last)
        net.correlation_dtype(amp)
        nets[name] = (net, steps)
    s, t = (torch.rand(1, 3, 192, 256).contiguous(memory_format=torch.channels_last)
            for _ in range(2))
    times = {name: [] for name in nets}
    with torch.no_grad(), autocast('cpu', amp):
        for net, steps in nets.values():
            for _ in range(3):
                net(s, t, iterations=steps, two_way=True)
        for _ in range(15):
            for name, (net, steps) in nets.items():
                t0 = time.perf_counter()
                net(s, t, iterations=steps, two_way=True)
                times[name].append(time.perf_counter() - t0)
    for name, (net, _) in nets.items():
        params = sum(p.numel() for p in net.parameters()) / 1e6
        print(f'{name:40s} {1000 * float(np.median(times[name])):6.1f} ms   {params:.2f} M parameters')


if __name__ == '__main__':
    main()
