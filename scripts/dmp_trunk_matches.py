#!/usr/bin/env python3
"""How far ``dmp-scratch`` can start: nearest-neighbour matches of the frozen trunk's own
features (the shipped ``hilm`` trunk, no adaptation) on the HPatches pair at 240x240, per
pyramid level, against the true flow averaged over each cell.

    python scripts/dmp_trunk_matches.py [--weights W]

``--weights`` takes any checkpoint holding ``backbone.*`` (e.g. ``cnngeo_cpu.pt``, whose trunk
was fine-tuned with a matching loss on pool4), to see whether another trunk starts better.

Iteration 0 of ``dmp-scratch`` is the soft-argmax of these correlations, so where about half
of the cells' best matches are off by more than a cell the per-pair loss has no good start to
refine (README, "dmp-scratch").
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

from dense_match_ros.core.methods.dmp import scratch_network
from dense_match_ros.core.networks.backbone import STRIDES
from dense_match_ros.core.networks.dmp import cell_centres
from dense_match_ros.data.shared_sets import hpatches_pair

LEVELS = ('pool4', 'conv4', 'conv3')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--weights', default=None, help='checkpoint whose trunk to probe '
                        '(default: the shipped hilm)')
    args = parser.parse_args()
    torch.set_num_threads(1)
    pair = hpatches_pair(size=(240, 240))
    net, trunk = scratch_network(args.weights)
    as_tensor = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        src = net.trunk(as_tensor(pair.source), levels=LEVELS)
        tgt = net.trunk(as_tensor(pair.target), levels=LEVELS)
    truth = torch.from_numpy(np.nan_to_num(pair.flow)).permute(2, 0, 1)[None]
    valid = torch.from_numpy(pair.valid.astype(np.float32))[None, None]
    print(f'trunk: {trunk}')
    for level in LEVELS:
        s, t = F.normalize(src[level], dim=1)[0], F.normalize(tgt[level], dim=1)[0]
        h, w = s.shape[-2:]
        stride = STRIDES[level]
        scores = torch.einsum('chw,cij->hwij', s, t).flatten(2)
        centres = cell_centres(h, w, stride, 'cpu')
        flow = centres.flatten(1)[:, scores.argmax(-1)] - centres
        cell_truth = F.adaptive_avg_pool2d(truth, (h, w))[0]
        inside = F.adaptive_avg_pool2d(valid, (h, w))[0, 0] > 0.99
        error = (flow - cell_truth).norm(dim=0)[inside]
        best = scores.topk(2, -1).values
        print(f'{level:6s} {h}x{w} cells of {stride} px: nearest-neighbour error median '
              f'{error.median():.1f} px, mean {error.mean():.1f} px, within a cell '
              f'{(error < stride).float().mean():.2f}; cosine of the best {best[..., 0].mean():.3f}, '
              f'second {best[..., 1].mean():.3f}, all {scores.mean():.3f}')


if __name__ == '__main__':
    main()
