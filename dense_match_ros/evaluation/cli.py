"""``dense-match-eval``: one registered method on the shared real data and the held-out
synthetic set, as a table, a JSON record and (optionally) PNG figures.

Every method goes through :func:`load_matcher`, so the numbers of a learned network and
of the ``dis`` baseline come from exactly the same code path. Flow sets give AEPE,
PCK, Acc@10, KITTI Fl and the matchability Jaccard index (on all valid pixels and, where
occlusion is known, on non-occluded ones); pose sets give rotation / translation errors
and AUC@5/10/20. Sets whose data is missing
are skipped with a message, never failed, so the command is useful on any checkout.

Example::

    dense-match-eval --method dis --sets sintel,hpatches240 --json /tmp/dis.json --report /tmp/dis
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dense_match_ros.core.device import DEFAULT_THREADS, set_threads
from dense_match_ros.core.geometry import grid
from dense_match_ros.core.geometry.pose import PoseConfig
from dense_match_ros.core.registry import LEVELS, available_methods, load_matcher
from dense_match_ros.data import shared_sets, synthetic
from dense_match_ros.evaluation import metrics, pose_eval
from dense_match_ros.evaluation.summary import (PCK_CURVE_THRESHOLDS, seed_aucs, summarise_flow,
                                                summarise_pose)
from dense_match_ros.evaluation.summary import pose_errors as errors_per_pair
from dense_match_ros.evaluation.tables import (FLOW_COLUMNS, POSE_COLUMNS, fmt,
                                               format_overview, format_table)

FLOW_SET_NAMES = ('sintel', 'hpatches240', 'hpatches', 'hpatches_viewpoint', 'synthetic')
POSE_SET_NAMES = ('tum', 'middlebury')
ALL_SETS = FLOW_SET_NAMES + POSE_SET_NAMES
SYNTHETIC_SIZE = (240, 240)
SYNTHETIC_SEED = 2026

class SetUnavailable(Exception):
    """A set cannot be evaluated here (its data is absent)."""


# --------------------------------------------------------------------------- loading


def _flow_pairs(name: str, root: Path, synthetic_n: int) -> list[Any]:
    if name == 'synthetic':
        return list(synthetic.heldout_pairs(synthetic_n, size=SYNTHETIC_SIZE,
                                            seed=SYNTHETIC_SEED))
    try:
        return shared_sets.load_flow_set(name, root)
    except FileNotFoundError as exc:
        raise SetUnavailable(f'data absent: {exc}')


def _pose_pairs(name: str, root: Path) -> list[Any]:
    try:
        return shared_sets.load_pose_set(name, root)
    except FileNotFoundError as exc:
        raise SetUnavailable(f'data absent: {exc}')


def _pair_name(pair: Any, index: int, set_name: str) -> str:
    """The pair's own name, else set/index (plus the kind of warp for synthetic pairs)."""
    name = getattr(pair, 'name', None)
    if name:
        return str(name)
    kind = getattr(pair, 'kind', None)
    return f'{set_name}/{index:03d}' + (f'-{kind}' if kind else '')


# --------------------------------------------------------------------------- evaluating


def _json_value(v: Any) -> Any:
    """Recursively make ``v`` JSON-safe: numpy -> Python, NaN/inf -> None (JSON has neither)."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return str(v)


def evaluate_flow_pair(matcher, pair: Any, levels: bool = False) -> tuple[dict, Any]:
    """Metrics of one flow pair; also returns the MatchResult (for figures).

    ``levels``: also the AEPE of every pyramid level of a coarse-to-fine matcher (one with
    the ``LEVELS`` capability), each level's flow on the full source grid (an extra forward pass,
    not counted in the match time).
    """
    t0 = time.perf_counter()
    result = matcher.match(pair.source, pair.target)
    dt = time.perf_counter() - t0
    gt = np.asarray(pair.flow, dtype=np.float32)
    valid = np.asarray(pair.valid, bool)
    occluded = getattr(pair, 'occluded', None)
    visible = valid if occluded is None else valid & ~np.asarray(occluded, bool)
    # A pixel is truly matchable only if its match is visible AND inside the target:
    # Sintel's occlusion masks do not mark motion out of the frame.
    th, tw = pair.target.shape[:2]
    matchable = visible & grid.in_bounds(gt, (tw, th))
    row: dict[str, Any] = metrics.flow_metrics(result.flow, gt, valid, result.matchability,
                                               matchable=matchable)
    if occluded is not None:
        noc = metrics.flow_metrics(result.flow, gt, visible)
        row.update({f'noc_{k}': v for k, v in noc.items()})
    row['pck_curve'] = metrics.pck_curve(result.flow, gt, valid, PCK_CURVE_THRESHOLDS).tolist()
    # Reliability: is a pixel's matchability the probability that its match is right (within
    # CORRECT_PX)? Every pixel counts: one that cannot be matched (occluded, out of frame) is
    # never right.
    epe = np.linalg.norm(result.flow - np.nan_to_num(gt), axis=-1)
    row['reliability'] = metrics.reliability_counts(result.matchability,
                                                    matchable & (epe < metrics.CORRECT_PX))
    row['mean_matchability'] = float(np.mean(result.matchability))
    row['match_time_s'] = dt
    # Matchers that work per pair (DMP's optimisation) say how: iterations, stop reason, ...
    for key, value in (getattr(matcher, 'last_run', None) or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[f'run_{key}'] = value
    if levels:
        flows = matcher.level_flows(pair.source, pair.target)
        row['aepe_levels'] = [float(np.linalg.norm(f - gt, axis=-1)[valid].mean())
                              if valid.any() else None for f in flows]
        row['level_labels'] = list(matcher.level_labels(pair.source))
    return row, result


def _versions() -> dict[str, str]:
    import cv2
    from dense_match_ros import __version__
    out = {'dense_match_ros': __version__, 'python': platform.python_version(),
           'numpy': np.__version__, 'opencv': cv2.__version__, 'platform': platform.platform()}
    torch = sys.modules.get('torch')
    if torch is not None:
        out['torch'] = torch.__version__
    return out


# --------------------------------------------------------------------------- main


def _heldout_photos() -> dict[str, Any]:
    """Which photos the held-out synthetic set was drawn from: its figures depend on them."""
    import hashlib
    from dense_match_ros.data.photos import PhotoSource
    photos = PhotoSource(split='heldout')
    return {'root': str(photos.root), 'count': len(photos),
            'keys_sha256': hashlib.sha256('\n'.join(photos.keys).encode()).hexdigest()[:16]}


def parse_sets(text: str) -> list[str]:
    """'all' or a comma list of known set names, in the order given, without repeats."""
    names = list(ALL_SETS) if text.strip() == 'all' else [
        s.strip() for s in text.split(',') if s.strip()]
    unknown = [s for s in names if s not in ALL_SETS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f'unknown set(s) {", ".join(unknown)}; known: {", ".join(ALL_SETS)}, all')
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='dense-match-eval', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', required=True,
                   help=f'registered method ({", ".join(available_methods())}), or a comma list '
                        'of them: each evaluated in turn, then compared')
    p.add_argument('--weights', default=None, help='checkpoint for learned methods')
    p.add_argument('--device', default='auto', help="auto, cpu, cuda or cuda:N")
    p.add_argument('--sets', type=parse_sets, default=parse_sets('sintel,hpatches240'),
                   help=f'comma list of {",".join(ALL_SETS)}, or all (default: sintel,hpatches240)')
    p.add_argument('--threads', type=int, default=DEFAULT_THREADS,
                   help=f'torch and OpenCV CPU threads (default {DEFAULT_THREADS}; 0: library defaults)')
    p.add_argument('--data-root', type=Path, default=None,
                   help='shared data folder (default: $DENSE_MATCH_DATA or ../shared/data)')
    p.add_argument('--synthetic-n', type=int, default=50, help='held-out synthetic pairs')
    p.add_argument('--limit', type=int, default=0, help='at most N pairs per set (0: all)')
    p.add_argument('--json', type=Path, default=None, help='write the full record here')
    p.add_argument('--report', type=Path, default=None, help='write PNG figures here')
    p.add_argument('--report-pairs', type=int, default=3,
                   help='flow figures per set with --report (default 3)')
    p.add_argument('--option', dest='options', action='append', default=[], metavar='KEY=VALUE',
                   help='matcher option passed to load_matcher, e.g. mode=pyramid (repeatable)')
    p.add_argument('--pose-option', dest='pose_options', action='append', default=[],
                   metavar='KEY=VALUE', help='PoseConfig field for the pose sets, e.g. '
                   'rank_by_matchability=true (as the node\'s pose.* parameters)')
    p.add_argument('--pose-seeds', type=int, default=1, metavar='N',
                   help='also run the robust estimator with N-1 more seeds on the same flow '
                        'and report the mean and spread of the AUCs (default 1: seed 0 only)')
    p.add_argument('--levels', action='store_true',
                   help='also the AEPE of every pyramid level (coarse-to-fine matchers: dgc)')
    p.add_argument('--no-progress', action='store_true', help='no tqdm progress bar')
    return p


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE strings as keyword arguments; values are read as JSON where they parse
    (numbers, true/false, null), as plain strings otherwise."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.strip():
            raise ValueError(f'--option wants KEY=VALUE, got {item!r}')
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _run_flow_set(matcher, set_name: str, pairs: Sequence[Any], progress, args,
                  report_dir: Path | None, figures: list[str]) -> list[dict]:
    """Per-pair rows of one flow set; figures for the first ``--report-pairs`` pairs."""
    rows = []
    for i, pair in enumerate(progress(pairs)):
        name = _pair_name(pair, i, set_name)
        row, result = evaluate_flow_pair(matcher, pair, levels=args.levels)
        if report_dir is not None and i < args.report_pairs:
            from dense_match_ros.evaluation import report
            figures.append(str(report.save_flow_figure(
                report_dir / f'{set_name}_{safe(name)}.png', f'{args.method}: {name}',
                pair.source, pair.target, np.asarray(pair.flow),
                np.asarray(pair.valid, bool), result.flow, result.matchability)))
        kind = getattr(pair, 'kind', None)
        rows.append({'set': set_name, 'pair': name, **({'kind': kind} if kind else {}),
                     **_json_value(row)})
    return rows


def _run_pose_set(matcher, set_name: str, pairs: Sequence[Any], progress,
                  evaluate_pose: Callable[[Any, Any], dict]) -> list[dict]:
    """Per-pair rows of one pose set, from evaluation.pose_eval."""
    rows = []
    for i, pair in enumerate(progress(pairs)):
        t0 = time.perf_counter()
        out = dict(evaluate_pose(matcher, pair))
        total = time.perf_counter() - t0
        out['total_time_s'] = total
        # The evaluator matches, then estimates; matching is what differs between
        # methods, so it is the time shown (derived here if the evaluator omits it).
        out.setdefault('match_time_s', total - float(out.get('estimate_time_s') or 0.0))
        rows.append({'set': set_name, 'pair': _pair_name(pair, i, set_name),
                     **_json_value(out)})
    return rows


def _add_block(record: dict, tables: list[str], name: str, rows: list[dict], summary: dict,
               table: str, aucs: str) -> None:
    record['sets'][name] = summary
    record['rows'].extend(rows)
    block = f'\n== {name} ({len(rows)} pairs) {aucs}\n{table}'
    print(block)
    tables.append(block)


def main(argv: Sequence[str] | None = None) -> int:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv_list)
    methods = [m.strip() for m in args.method.split(',') if m.strip()]
    if len(methods) > 1:
        return compare(methods, args, argv_list)
    return evaluate(args, argv_list)[0]


def compare(methods: Sequence[str], args: argparse.Namespace, argv_list: Sequence[str]) -> int:
    """Several methods on the same sets, one after the other (each with its own JSON record,
    ``NAME_METHOD.json``, and figure folder), then their summaries side by side."""
    if args.weights:
        print('dense-match-eval: --weights names one checkpoint; give it with one method',
              file=sys.stderr)
        return 2
    summaries, worst = [], 0
    for method in methods:
        one = copy.copy(args)
        one.method = method
        if args.json is not None:
            one.json = args.json.with_name(f'{args.json.stem}_{safe(method)}{args.json.suffix}')
        if args.report is not None:
            one.report = args.report / safe(method)
        rc, record = evaluate(one, [*argv_list, '--method', method])
        worst = max(worst, rc)
        overview = format_overview(record.get('sets', {}), POSE_SET_NAMES) if record else ''
        summaries.append(f'-- {method}\n{overview or "(nothing evaluated)"}')
    print('\n== comparison\n' + '\n'.join(summaries))
    return worst


def evaluate(args: argparse.Namespace, argv_list: Sequence[str]) -> tuple[int, dict]:
    """One method: (exit status, the JSON record)."""
    root = args.data_root if args.data_root is not None else shared_sets.data_root()
    from tqdm import tqdm

    set_threads(args.threads)
    try:
        options = parse_options(args.options)
        pose_config = PoseConfig(**parse_options(args.pose_options))
        matcher = load_matcher(args.method, device=args.device, weights=args.weights, **options)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as exc:
        # Unknown method, bad device, or weights that do not fit: a usage error, not a crash.
        print(f'dense-match-eval: {exc}', file=sys.stderr)
        return 2, {}
    print(f'method {args.method} on {matcher.device}; data root {root}')
    if 'synthetic' in args.sets:
        held = _heldout_photos()
        print(f'synthetic held-out pairs from {held["count"]} photos under {held["root"]} '
              f'(keys {held["keys_sha256"]})')
    if args.levels and not matcher.supports(LEVELS):
        print(f'[note] --levels: {args.method} has no pyramid levels; ignored')
        args.levels = False
    report_dir = args.report
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)

    record: dict[str, Any] = {
        'method': args.method, 'weights': args.weights, 'options': options,
        'device': matcher.device,
        'command': 'dense-match-eval ' + shlex.join(argv_list), 'data_root': str(root),
        'versions': _versions(), 'sets': {}, 'skipped': {}, 'rows': [], 'figures': [],
        'threads': args.threads, 'pose_options': parse_options(args.pose_options),
        'synthetic_photos': _heldout_photos() if 'synthetic' in args.sets else None,
    }
    pose_errors: dict[str, list[float]] = {}
    tables: list[str] = []

    for set_name in args.sets:
        is_pose = set_name in POSE_SET_NAMES
        try:
            evaluate_pose = (functools.partial(pose_eval.evaluate_pose_pair, config=pose_config,
                                               seeds=max(1, args.pose_seeds))
                             if is_pose else None)
            pairs = (_pose_pairs(set_name, root) if is_pose
                     else _flow_pairs(set_name, root, args.synthetic_n))
        except SetUnavailable as exc:
            print(f'[skip] {set_name}: {exc}')
            record['skipped'][set_name] = str(exc)
            continue
        if args.limit > 0:
            pairs = pairs[:args.limit]

        def progress(items, desc=set_name):
            return tqdm(items, desc=desc, unit='pair', leave=False, disable=args.no_progress,
                        file=sys.stderr)

        if is_pose:
            variants = [(set_name, evaluate_pose)]
            if all(getattr(p, 'depth_source', None) is not None for p in pairs):
                # The upper bound: correspondences from depth + ground-truth pose through the
                # same selection and estimator, so the gap to it is the matcher's share.
                variants.append((f'{set_name}/gt-upper-bound',
                                 lambda _matcher, pair: pose_eval.evaluate_gt_upper_bound(pair)))
            for name, evaluate in variants:
                rows = _run_pose_set(matcher, name, pairs, progress, evaluate)
                summary = summarise_pose(rows)
                pose_errors[name] = errors_per_pair(rows)
                table = format_table(rows, POSE_COLUMNS, summary,
                                     summary_label='median errors (valid pairs), mean others',
                                     summary_keys={k: f'median_{k}' for k in
                                                   ('rotation_error_deg', 'translation_error_deg')})
                aucs = '  '.join(f'{k.upper()} {fmt(summary.get(k), 5, ".3f")}'
                                 for k in summary if k.startswith('auc@')
                                 and '_seed_' not in k) + seed_aucs(summary)
                _add_block(record, tables, name, rows, summary, table, aucs)
        else:
            rows = _run_flow_set(matcher, set_name, pairs, progress, args, report_dir,
                                 record['figures'])
            summary = summarise_flow(rows)
            table = format_table(rows, FLOW_COLUMNS, summary)
            if summary.get('aepe_levels'):
                table += '\nAEPE per level: ' + '  '.join(
                    f'{label} {fmt(v, 1, ".3f")}'
                    for label, v in zip(summary['level_labels'], summary['aepe_levels']))
            _add_block(record, tables, set_name, rows, summary, table, '')

    overview = format_overview(record['sets'], POSE_SET_NAMES)
    if overview:
        print(f'\n== summary: {args.method} on {matcher.device}\n{overview}')
        tables.append(f'\n== summary\n{overview}')

    if report_dir is not None:
        from dense_match_ros.evaluation import report
        curves = {s: (v['pck_curve']['thresholds_px'], v['pck_curve']['values'])
                  for s, v in record['sets'].items() if 'pck_curve' in v}
        if curves:
            record['figures'].append(str(report.save_pck_curves(
                report_dir / 'pck_curves.png', curves, f'{args.method}: PCK per set')))
        reliability = {s: v['reliability'] for s, v in record['sets'].items() if v.get('reliability')}
        if reliability:
            record['figures'].append(str(report.save_reliability(
                report_dir / 'reliability.png', reliability,
                f'{args.method}: matchability vs right within {metrics.CORRECT_PX:g} px')))
        levels = {s: (v['level_labels'], v['aepe_levels'])
                  for s, v in record['sets'].items() if v.get('aepe_levels')}
        if levels:
            record['figures'].append(str(report.save_level_aepe(
                report_dir / 'aepe_levels.png', levels, f'{args.method}: AEPE per level')))
        if pose_errors:
            record['figures'].append(str(report.save_pose_error_curves(
                report_dir / 'pose_errors.png', pose_errors, title=f'{args.method}: pose error')))
        (report_dir / 'tables.txt').write_text('\n'.join(tables) + '\n')
        print(f'figures in {report_dir}')

    record = _json_value(record)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, allow_nan=False))
        print(f'wrote {args.json}')
    if not record['sets']:
        print(f'dense-match-eval: nothing was evaluated: no data for {", ".join(args.sets)} under '
              f'{root} (set $DENSE_MATCH_DATA or --data-root); --sets synthetic needs no shared '
              f'data', file=sys.stderr)
        return 1, record
    return 0, record


def safe(name: str) -> str:
    """Pair name as a file-name component (kept here so the CLI works without report)."""
    return ''.join(c if c.isalnum() or c in '-_.@' else '_' for c in name)


if __name__ == '__main__':
    sys.exit(main())
