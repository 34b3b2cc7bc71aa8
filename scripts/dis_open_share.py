#!/usr/bin/env python3
"""How much of each shared pair DIS leaves open: the share of pixels whose round trip (DIS
medium, forward then backward) misses by more than 3 px or leaves the target, the quantity
``neuflow-fast``'s ``settled_share`` compares with 5 %, and the same share among the pixels
whose match stays in view, with the share that leaves it. Flow sets also get DIS's AEPE.

    python scripts/dis_open_share.py [out.json]
"""
import json
import sys

import cv2
import numpy as np

from dense_match_ros.core.dis_presets import create_dis, two_way_flow
from dense_match_ros.core.geometry import grid
from dense_match_ros.data import shared_sets, synthetic
from dense_match_ros.evaluation.cli import SYNTHETIC_SEED, SYNTHETIC_SIZE

cv2.setNumThreads(1)
OPEN_PX = 3.0


def main() -> None:
    sets = {name: shared_sets.load_flow_set(name)
            for name in ('sintel', 'hpatches240', 'hpatches', 'hpatches_viewpoint')}
    sets['synthetic'] = list(synthetic.heldout_pairs(50, size=SYNTHETIC_SIZE, seed=SYNTHETIC_SEED))
    for name in ('tum', 'middlebury'):
        sets[name] = shared_sets.load_pose_set(name)
    dis = create_dis('medium')
    rows = []
    for set_name, pairs in sets.items():
        for index, pair in enumerate(pairs):
            h, w = pair.source.shape[:2]
            forward, backward = two_way_flow(dis, pair.source, pair.target, (w, h))
            error = grid.forward_backward_error(forward, backward)
            leaving = ~grid.in_bounds(forward, pair.target.shape[1::-1])
            row = {'set': set_name, 'pair': str(getattr(pair, 'name', '') or f'{index}'),
                   'open': float(np.mean(error > OPEN_PX)), 'leaving': float(leaving.mean()),
                   'open_in_view': float(np.mean(error[~leaving] > OPEN_PX))
                   if (~leaving).any() else 1.0}
            if getattr(pair, 'flow', None) is not None:
                valid = getattr(pair, 'valid', None)
                valid = np.ones((h, w), bool) if valid is None else valid
                row['dis_aepe'] = float(np.linalg.norm(forward - pair.flow, axis=-1)[valid].mean())
            rows.append(row)
    for set_name in sets:
        shares = sorted(r['open'] for r in rows if r['set'] == set_name)
        print(f'{set_name:20s} open share min {shares[0]:.3f}  max {shares[-1]:.3f}  '
              f'({len(shares)} pairs; at most 0.05: {sum(s <= 0.05 for s in shares)})')
        in_view = sorted((r['open_in_view'], r['leaving'], r['pair']) for r in rows
                         if r['set'] == set_name)
        print(f'{"":20s} in view: min {in_view[0][0]:.3f} max {in_view[-1][0]:.3f}; at most 0.05 '
              f'in view: ' + ', '.join(f'{p} ({o:.3f}, leaving {l:.3f})'
                                       for o, l, p in in_view if o <= 0.05))
    if len(sys.argv) > 1:
        with open(sys.argv[1], 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
