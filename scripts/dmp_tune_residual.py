#!/usr/bin/env python3
"""Choose ``dmp``'s DIS residual settings (``refine_preset``, ``refine_max_cells``, ``polish``) on held-out
calibration pairs (held-out photos, seed 7: no evaluation set), at 240x240 and at Sintel's
1024x436, from one optimised flow per pair (20 iterations, no time budget, so the load does
not move the figures).

    python scripts/dmp_tune_residual.py [PAIRS] [OUT.json]

Prints the mean AEPE of every (preset, limit) per size, limit 0 being no limit, and of the
``medium`` rows followed by the variational polish (``polish`` 5 and 10 iterations).
"""
import json
import sys

import numpy as np
import torch

from dense_match_ros.core.dis_presets import PRESETS
from dense_match_ros.core.refine import apply_residual, residual_of, variational_polish
from dense_match_ros.core.registry import load_matcher
from dense_match_ros.evaluation import metrics
from dense_match_ros.evaluation.calibrate import calibration_pairs

SIZES = ((240, 240), (436, 1024))
LIMITS = (0, 2, 3, 4, 6, 8, 12)
POLISH = (5, 10)


def aepe(flow: np.ndarray, pair) -> float:
    return metrics.aepe(flow, pair.flow, pair.valid)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    out_path = sys.argv[2] if len(sys.argv) > 2 else None
    torch.set_num_threads(1)
    matcher = load_matcher('dmp', device='cpu', refine='none', polish=0, iterations=20,
                           time_budget_s=0)
    results = {}
    for size in SIZES:
        rows = []
        for pair in calibration_pairs(n, size=size):
            flow, _ = matcher.match(pair.source, pair.target)
            scale = max(size) / max(matcher.input_size)
            row = {'none': aepe(flow, pair)}
            for preset in PRESETS:
                residual = residual_of(pair.source, pair.target, flow, preset)
                for limit in LIMITS:
                    refined = apply_residual(flow, residual, limit * scale or None)
                    row[f'{preset}/{limit}'] = aepe(refined, pair)
                    if preset == 'medium':
                        for its in POLISH:
                            polished = variational_polish(pair.source, pair.target, refined, iterations=its)
                            row[f'medium+polish{its}/{limit}'] = aepe(polished, pair)
            rows.append(row)
        name = f'{size[1]}x{size[0]}'
        results[name] = rows
        means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        print(f'{name}, {n} pairs: no residual {means.pop("none"):.3f}')
        for preset in (*PRESETS, *(f'medium+polish{its}' for its in POLISH)):
            print(f'  {preset:15s} ' + '  '.join(f'{limit or "-"}: {means[f"{preset}/{limit}"]:.3f}'
                                              for limit in LIMITS), flush=True)
    if out_path:
        with open(out_path, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
