"""The tables dense-match-eval prints: one per set (a row per pair) and the overview."""
from __future__ import annotations

import math
from typing import Any, Sequence

# Columns of the printed table: (key in a row, header, width, format spec).
FLOW_COLUMNS = (('aepe', 'AEPE', 8, '.3f'), ('pck@1', 'PCK@1', 6, '.3f'),
                 ('pck@3', 'PCK@3', 6, '.3f'), ('pck@5', 'PCK@5', 6, '.3f'),
                 ('pck@10', 'PCK@10', 6, '.3f'), ('fl', 'Fl', 6, '.3f'),
                 ('noc_aepe', 'nocAEPE', 8, '.3f'), ('jaccard', 'Jacc', 6, '.3f'),
                 ('match_time_s', 'time_s', 7, '.3f'))
POSE_COLUMNS = (('rotation_error_deg', 'R_err', 7, '.2f'),
                 ('translation_error_deg', 't_err', 7, '.2f'),
                 ('num_correspondences', 'corresp', 8, '.0f'),
                 ('num_inliers', 'inliers', 8, '.0f'), ('status', 'status', 20, ''),
                 ('match_time_s', 'time_s', 7, '.3f'))



def fmt(value: Any, width: int, spec: str) -> str:
    """One right-aligned cell; '-' for a missing or non-finite number."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '-'.rjust(width)
    if isinstance(value, str):
        value = value.split(':')[0]  # the reason after ':' does not fit a table cell
    if isinstance(value, (int, float)) and not isinstance(value, bool) and spec:
        return format(value, spec).rjust(width)
    return str(value)[:width].rjust(width)


def format_table(rows: Sequence[dict], columns, summary: dict | None, name_width: int = 50,
                 summary_label: str = 'mean', summary_keys: dict[str, str] | None = None
                 ) -> str:
    """Fixed-width text table: one line per pair, then the set summary.

    ``summary_keys`` renames columns for the summary line (pose sets show median errors).
    """
    summary_keys = summary_keys or {}
    head = 'pair'.ljust(name_width) + ' '.join(h.rjust(w) for _, h, w, _ in columns)
    lines = [head, '-' * len(head)]
    for r in rows:
        lines.append(r['pair'][-name_width:].ljust(name_width)
                     + ' '.join(fmt(r.get(k), w, f) for k, _, w, f in columns))
    if summary is not None:
        lines.append('-' * len(head))
        lines.append(summary_label.ljust(name_width) + ' '.join(
            fmt(summary.get(summary_keys.get(k, k)) if k != 'status' else '', w, f)
            for k, _, w, f in columns))
    return '\n'.join(lines)


def format_overview(sets: dict[str, dict], pose_sets: Sequence[str]) -> str:
    """One line per evaluated set: the headline numbers side by side (AUCs for ``pose_sets``)."""
    lines = []
    for name, summ in sets.items():
        n = summ.get('num_pairs', 0)
        if name.split('/')[0] in pose_sets:
            body = '  '.join(f'{k.upper()} {fmt(summ.get(k), 5, ".3f")}'
                             for k in ('auc@5', 'auc@10', 'auc@20'))
            body += (f'  median R {fmt(summ.get("median_rotation_error_deg"), 6, ".2f")} deg'
                     f'  t {fmt(summ.get("median_translation_error_deg"), 6, ".2f")} deg')
            if summ.get('num_seeds'):
                body += f'  [{summ["num_seeds"]} seeds, mean +- sd: ' + '  '.join(
                    f'{k[3:]} {summ[f"{k}_seed_mean"]:.3f} +- {summ[f"{k}_seed_std"]:.3f}'
                    for k in ('auc@5', 'auc@10', 'auc@20') if f'{k}_seed_mean' in summ) + ']'
        else:
            body = _flow_headline(summ)
        body += f'  {fmt(summ.get("match_time_s"), 6, ".3f")} s/pair'
        lines.append(f'{name:<14} {n:4d} pairs  {body}')
        for kind, part in (summ.get('by_kind') or {}).items():
            lines.append(f'{"  " + kind:<14} {part["num_pairs"]:4d} pairs  '
                         + _flow_headline(part))
    return '\n'.join(lines)


FLOW_HEADLINE = (('aepe', 'AEPE', 7, '.3f'), ('pck@1', 'PCK@1', 5, '.3f'),
                 ('pck@5', 'PCK@5', 5, '.3f'), ('fl', 'Fl', 5, '.3f'), ('jaccard', 'Jacc', 5, '.3f'))
"""(key, label, width, format) of a flow set's overview line, and of each warp kind's."""


def _flow_headline(summary: dict) -> str:
    return '  '.join(f'{label} {fmt(summary.get(k), width, spec)}'
                     for k, label, width, spec in FLOW_HEADLINE)
