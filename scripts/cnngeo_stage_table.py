#!/usr/bin/env python3
"""The comparison table of cnngeo checkpoints from the records
``scripts/cnngeo_stage_compare.sh`` writes ($OUT/cg_NAME_{tps,affine,200}.json), one column
per checkpoint:

    python scripts/cnngeo_stage_table.py out/s31 shipped m c

Rows: AEPE of ``cnngeo`` and ``cnngeo-affine`` per set, the synthetic set by warp kind and its
Jaccard, the 200-pair synthetic AEPE, and the pose sets' AUC@10 (Middlebury) and AUC@20 (TUM).
"""
import argparse
import json
from pathlib import Path

from stage_columns import print_columns


def column(out: Path, name: str) -> dict[str, str]:
    cells: dict[str, str] = {}
    for tag, method in (('tps', 'cnngeo'), ('affine', 'cnngeo-affine')):
        path = out / f'cg_{name}_{tag}.json'
        if not path.exists():
            continue
        sets = json.loads(path.read_text())['sets']
        for key in ('sintel', 'hpatches240', 'hpatches', 'hpatches_viewpoint'):
            if key in sets:
                cells[f'{method} {key}'] = f"{sets[key]['aepe']:.3f}"
        if 'synthetic' in sets:
            s = sets['synthetic']
            kinds = ' / '.join(f"{s['by_kind'][k]['aepe']:.3f}" for k in ('affine', 'homography', 'tps')
                               if k in s.get('by_kind', {}))
            cells[f'{method} synthetic 50: all / affine / homography / TPS (Jaccard)'] = (
                f"{s['aepe']:.3f} / {kinds} ({s.get('jaccard', float('nan')):.3f})")
        for key, t in (('middlebury', 10), ('tum', 20)):
            if key in sets:
                cells[f'{method} {key} AUC@{t}'] = f"{sets[key][f'auc@{t}']:.3f}"
    path = out / f'cg_{name}_200.json'
    if path.exists():
        s = json.loads(path.read_text())['sets']['synthetic']
        cells['cnngeo synthetic 200 (Jaccard)'] = f"{s['aepe']:.3f} ({s.get('jaccard', float('nan')):.3f})"
    return cells


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('out', type=Path)
    p.add_argument('names', nargs='+')
    args = p.parse_args()
    print_columns(args.names, lambda n: column(args.out, n))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
