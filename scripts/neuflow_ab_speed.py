#!/usr/bin/env python3
"""The shipped ``neuflow`` networks' forward pass under this checkout's code against the same
weights under the code of an earlier commit, in one process and interleaved (the machine's
drift between two runs is larger than most changes): both directions at 256x192 as
``neuflow-fast`` and ``neuflow-lite`` run them, BatchNorm folded, channels-last, one thread,
the inference precision ``auto`` picks. The earlier commit's ``core/networks/neuflow.py`` and
``correlation.py`` are read with ``git show`` and loaded under other names; the weights
are the checkout's. Also checks that both give the same flows.

    python scripts/neuflow_ab_speed.py REV [repeats]
"""
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dense_match_ros.core.checkpoint import load_weights
from dense_match_ros.core.device import autocast, inference_dtype
from dense_match_ros.core.methods import neuflow as neuflow_method
from dense_match_ros.core.methods.neuflow_variants import FAST_DEFAULTS, LITE_DEFAULTS
from dense_match_ros.core.networks import neuflow as current

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = {'neuflow-fast (neuflow_gpu.pt)': ('gpu', FAST_DEFAULTS['iterations']),
            'neuflow-lite (neuflow_lite.pt)': ('lite', LITE_DEFAULTS['iterations'])}
"""label: (shipped variant, refinement steps of the matcher that runs it)."""


def _load(name: str, source: str, folder: Path):
    path = folder / f'{name}.py'
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def earlier_network_module(rev: str, folder: Path):
    """``core/networks/neuflow.py`` of ``rev``, importing ``rev``'s correlation module."""
    def show(path: str) -> str:
        return subprocess.run(['git', '-C', str(ROOT), 'show', f'{rev}:{path}'], check=True,
                              capture_output=True, text=True).stdout
    _load('earlier_correlation', show('dense_match_ros/core/networks/correlation.py'), folder)
    source = show('dense_match_ros/core/networks/neuflow.py').replace(
        'from dense_match_ros.core.networks import correlation',
        'import earlier_correlation as correlation')
    return _load('earlier_neuflow', source, folder)


def build(module, variant: str) -> torch.nn.Module:
    """The shipped checkpoint of ``variant`` as ``module``'s network, set up as the matcher
    sets it up."""
    model_config, state, _ = load_weights(neuflow_method.WEIGHTS.shipped(variant), 'neuflow')
    net = module.NeuFlowNet(module.config_from_dict(model_config))
    net.load_state_dict(state)
    return net.fold_batch_norm().to(memory_format=torch.channels_last)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rev, repeats = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20
    torch.set_num_threads(1)
    amp = inference_dtype('auto', 'cpu')
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(1, 3, 192, 256, generator=generator)
    target = torch.roll(source, (5, 9), (2, 3))
    source, target = (x.contiguous(memory_format=torch.channels_last) for x in (source, target))
    print(f'autocast: {amp}; {repeats} interleaved calls each, median (min) ms')
    with tempfile.TemporaryDirectory() as folder:
        earlier = earlier_network_module(rev, Path(folder))
        for label, (variant, steps) in NETWORKS.items():
            nets = {'earlier': build(earlier, variant), 'current': build(current, variant)}
            for net in nets.values():
                net.correlation_dtype(amp)
            times = {name: [] for name in nets}
            flows = {}
            with torch.no_grad(), autocast('cpu', amp):
                for name, net in nets.items():
                    flows[name] = net(source, target, iterations=steps, two_way=True).flows[-1]
                for _ in range(repeats):
                    for name, net in nets.items():
                        start = time.perf_counter()
                        net(source, target, iterations=steps, two_way=True)
                        times[name].append(1000.0 * (time.perf_counter() - start))
            gap = float((flows['earlier'].float() - flows['current'].float()).abs().max())
            cells = '  '.join(f'{name} {np.median(t):.1f} ({min(t):.1f})'
                              for name, t in times.items())
            ratio = np.median(times['current']) / np.median(times['earlier'])
            print(f'{label:32s} {cells}  current/earlier {ratio:.2f}  largest flow gap {gap:.1e} px')


if __name__ == '__main__':
    main()
