#!/usr/bin/env python3
"""The comparison table of dmp stages from the records ``scripts/dmp_stage_compare.sh`` writes
($OUT/cmp_NAME.json and $OUT/cmp_NAME_it0.json), one column per stage:

    python scripts/dmp_stage_table.py out/s29 s2 s3b s3c s4d1 s4d2

Rows: AEPE per flow set (pre-trained output in brackets where measured), the viewpoint set
without the 90 and 180 degree copies (which no stage matches, so they rule its mean), the
synthetic Jaccard, the pose AUCs over the seeds, and on how many Sintel pairs and held-out
synthetic pairs optimisation beats the pre-trained output.
"""
import argparse
import json
from pathlib import Path

from stage_columns import print_columns

import numpy as np

UNSOLVED = ('/rot90', '/rot180')


def rows(record: dict, name: str) -> dict[str, float]:
    return {r['pair']: r['aepe'] for r in record['rows'] if r['set'] == name}


def column(out: Path, name: str) -> dict[str, str]:
    opt = json.loads((out / f'cmp_{name}.json').read_text())
    it0_path = out / f'cmp_{name}_it0.json'
    it0 = json.loads(it0_path.read_text()) if it0_path.exists() else None
    sets, cells = opt['sets'], {}
    for key in ('sintel', 'hpatches240', 'hpatches', 'hpatches_viewpoint', 'synthetic'):
        if key not in sets:
            continue
        cell = f"{sets[key]['aepe']:.3f}"
        if it0 and key in it0['sets']:
            cell += f" ({it0['sets'][key]['aepe']:.3f})"
        cells[key] = cell
    view = rows(opt, 'hpatches_viewpoint')
    if view:
        kept = [v for k, v in view.items() if not k.endswith(UNSOLVED)]
        cells['viewpoint without 90/180'] = f'{np.mean(kept):.3f}'
    if 'synthetic' in sets:
        cells['synthetic Jaccard'] = f"{sets['synthetic'].get('jaccard', float('nan')):.3f}"
    for key in ('tum', 'middlebury'):
        if key in sets:
            s = sets[key]
            cells[f'{key} AUC@5/10/20, seed mean'] = ' / '.join(
                f"{s.get(f'auc@{t}_seed_mean', s[f'auc@{t}']):.3f}" for t in (5, 10, 20))
            if 'auc@20_seed_std' in s:
                cells[f'{key} AUC@20 seed std'] = f"{s['auc@20_seed_std']:.3f}"
    if it0:
        for key in ('sintel', 'synthetic'):
            a, b = rows(opt, key), rows(it0, key)
            if a and b:
                better = sum(a[k] < b[k] for k in a if k in b)
                cells[f'{key}: pairs optimisation improves'] = f'{better} of {len(a)}'
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out', type=Path)
    p.add_argument('names', nargs='+')
    args = p.parse_args()
    print_columns(args.names, lambda n: column(args.out, n), missing='')


if __name__ == '__main__':
    main()
