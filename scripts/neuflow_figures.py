"""One line of the README's neuflow table per evaluated checkpoint folder.

    python scripts/neuflow_figures.py METHOD DIR...   (DIR as written by scripts/eval_neuflow.sh)

Sintel AEPE / PCK@1, the HPatches pair at 240 and full size, the worst viewpoint copy, the
held-out synthetic AEPE, Middlebury AUC@10 (seed 0; 20-seed mean) and TUM AUC@20 (likewise).
"""
import json
import sys
from pathlib import Path


def line(folder: Path, method: str) -> str:
    record = json.loads((folder / f'{method}_a.json').read_text())
    a = record['sets']
    b_path = folder / f'{method}_b.json'
    b = json.loads(b_path.read_text())['sets'] if b_path.exists() else {}
    view = max(r['aepe'] for r in record['rows']
               if r.get('set') == 'hpatches_viewpoint') if a.get('hpatches_viewpoint') else float('nan')
    cells = [f"{a['sintel']['aepe']:.3f} / {a['sintel']['pck@1']:.5f}",
             f"{a['hpatches240']['aepe']:.3f} / {a['hpatches']['aepe']:.3f}", f'{view:.3f}']
    if b:
        m, t = b['middlebury'], b['tum']
        cells += [f"{b['synthetic']['aepe']:.3f}",
                  f"{m['auc@10']:.3f}; {m['auc@10_seed_mean']:.3f}",
                  f"{t['auc@20']:.4f}; {t['auc@20_seed_mean']:.4f}"]
    return f'| {folder} | ' + ' | '.join(cells) + ' |'


if __name__ == '__main__':
    method = sys.argv[1]
    print('| checkpoint | Sintel AEPE / PCK@1 | HP 240 / full | viewpoint worst | synthetic | '
          'Middlebury AUC@10 s0; 20 seeds | TUM AUC@20 s0; 20 seeds |')
    print('|---|---|---|---|---|---|---|')
    for d in sys.argv[2:]:
        print(line(Path(d), method))
