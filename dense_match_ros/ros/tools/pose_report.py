"""Scoring and reporting of relative poses against a ground-truth trajectory, shared by the
offline replay and the live demo: per-pair records, rotation/translation-direction errors
and AUC, tables, plots and the JSON report."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from dense_match_ros.evaluation.metrics import (pose_auc, pose_error_deg, rotation_error_deg,
                                                translation_direction_error_deg)
from dense_match_ros.evaluation import report
from dense_match_ros.ros.convert import stamp_to_ns
from dense_match_ros.ros.pipeline import PipelineOutput
from dense_match_ros.ros.tools.trajectory import DEFAULT_MAX_DT, Trajectory

NS = 1_000_000_000
AUC_THRESHOLDS = (5, 10, 20)
VERDICT_DEG = 10.0
"""A valid pose within this max(rotation, translation-direction) error of the ground truth
is reported 'right', beyond it 'WRONG'."""


# --------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class PairRecord:
    """What one output says about a pair, from a PipelineOutput or a RelativePose message."""

    source_stamp_ns: int
    target_stamp_ns: int
    R: np.ndarray | None
    t: np.ndarray | None
    valid: bool
    status: str
    num_correspondences: int = 0
    num_inliers: int = 0
    extra: dict = dataclasses.field(default_factory=dict)
    """Timings, latency ... copied into the report row as they are."""


def record_from_output(out: PipelineOutput, extra: dict | None = None) -> PairRecord:
    pose = out.pose
    return PairRecord(out.source_stamp_ns, out.target_stamp_ns,
                      None if pose is None else np.asarray(pose.R, dtype=np.float64),
                      None if pose is None else np.asarray(pose.t, dtype=np.float64),
                      bool(pose is not None and pose.valid), out.pose_status,
                      int(getattr(pose, 'num_correspondences', 0) or 0),
                      int(getattr(pose, 'num_inliers', 0) or 0), dict(extra or {}))


def record_from_relative_pose(msg: Any, extra: dict | None = None) -> PairRecord:
    """PairRecord from a dense_match_ros/RelativePose (rclpy or rosbags object)."""
    from scipy.spatial.transform import Rotation
    q = msg.rotation
    quat = np.array([q.x, q.y, q.z, q.w], dtype=np.float64)
    R = Rotation.from_quat(quat).as_matrix() if np.linalg.norm(quat) > 1e-9 else None
    t = np.array([msg.translation.x, msg.translation.y, msg.translation.z], dtype=np.float64)
    return PairRecord(stamp_to_ns(msg.source_stamp), stamp_to_ns(msg.header.stamp),
                      R, t, bool(msg.valid), str(msg.status) or ('ok' if msg.valid else ''),
                      int(msg.num_correspondences), int(msg.num_inliers), dict(extra or {}))


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def evaluate(records: Sequence[PairRecord], trajectory: Trajectory | None,
             max_dt: float = DEFAULT_MAX_DT) -> tuple[list[dict], dict]:
    """Per-pair rows and a summary (AUC over the pairs that have ground truth).

    Errors are reported for valid estimates only: an invalid one is a failure whatever
    numbers it carries. Pairs whose stamps have no ground-truth sample within ``max_dt``
    are listed with ``gt: false`` and left out of the AUC.
    """
    rows, errors = [], []
    for rec in records:
        row: dict[str, Any] = {
            'source_stamp': rec.source_stamp_ns / NS, 'target_stamp': rec.target_stamp_ns / NS,
            'dt': (rec.target_stamp_ns - rec.source_stamp_ns) / NS, 'valid': rec.valid,
            'status': rec.status, 'num_correspondences': rec.num_correspondences,
            'num_inliers': rec.num_inliers, 'gt': False, 'rotation_error_deg': None,
            'translation_error_deg': None, 'pose_error_deg': None}
        row.update(rec.extra)
        T = None if trajectory is None else trajectory.relative(
            rec.source_stamp_ns / NS, rec.target_stamp_ns / NS, max_dt)
        if T is not None:
            row['gt'] = True
            row['gt_baseline_m'] = float(np.linalg.norm(T[:3, 3]))
            row['gt_rotation_deg'] = rotation_error_deg(T[:3, :3], np.eye(3))
            r_err = t_err = None
            if rec.valid and rec.R is not None and rec.t is not None:
                r_err = _finite(rotation_error_deg(rec.R, T[:3, :3]))
                t_err = _finite(translation_direction_error_deg(rec.t, T[:3, 3]))
            err = pose_error_deg(r_err, t_err)
            row.update(rotation_error_deg=r_err, translation_error_deg=t_err,
                       pose_error_deg=_finite(err))
            # The estimator's status says whether its own checks passed; this says whether it
            # was right. An 'ok' pose 60 deg off must not read as a success.
            row['verdict'] = ('-' if not rec.valid else
                              'right' if err <= VERDICT_DEG else f'WRONG {err:.0f}°')
            errors.append(err)
        rows.append(row)
    summary: dict[str, Any] = {
        'pairs': len(records), 'pairs_with_gt': len(errors),
        'valid': sum(r.valid for r in records),
        'max_dt_s': max_dt if trajectory is not None else None}
    if trajectory is not None:
        summary.update(pose_auc(errors, AUC_THRESHOLDS))
        for key in ('rotation_error_deg', 'translation_error_deg'):
            vals = [r[key] for r in rows if r[key] is not None]
            summary[f'median_{key}'] = float(np.median(vals)) if vals else None
    return rows, summary


def timing_summary(values_s: Iterable[float]) -> dict[str, float | None]:
    """median / mean / p90 / max in milliseconds (None for no samples)."""
    v = np.asarray([x for x in values_s if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {'n': 0, 'median_ms': None, 'mean_ms': None, 'p90_ms': None, 'max_ms': None}
    return {'n': int(v.size), 'median_ms': float(np.median(v) * 1e3),
            'mean_ms': float(v.mean() * 1e3), 'p90_ms': float(np.percentile(v, 90) * 1e3),
            'max_ms': float(v.max() * 1e3)}


def format_table(rows: Sequence[dict], extra_cols: Sequence[tuple[str, str, str]] = ()) -> str:
    """Fixed-width per-pair table for the terminal.

    ``extra_cols``: (key, header, format) of additional columns (e.g. latency).
    """
    def fmt(v, spec):
        return '-' if v is None else format(v, spec)
    head = (f'{"#":>3} {"source":>17} {"target":>17} {"dt ms":>6} {"base mm":>7} '
            f'{"rot°":>6} {"trans°":>6} {"inl":>5} ' +
            ''.join(f'{h:>9} ' for _, h, _ in extra_cols) + f'{"vs gt":>10} status')
    lines = [head]
    for i, r in enumerate(rows):
        base = r.get('gt_baseline_m')
        lines.append(
            f'{i:>3} {r["source_stamp"]:>17.6f} {r["target_stamp"]:>17.6f} {r["dt"] * 1e3:>6.1f} '
            f'{fmt(None if base is None else base * 1e3, ".1f"):>7} '
            f'{fmt(r["rotation_error_deg"], ".2f"):>6} {fmt(r["translation_error_deg"], ".2f"):>6} '
            f'{r["num_inliers"]:>5} ' +
            ''.join(f'{fmt(r.get(k), spec):>9} ' for k, _, spec in extra_cols) +
            f'{r.get("verdict", "no gt"):>10} ' +
            (r['status'] if r['gt'] else f'{r["status"]} (no ground truth)'))
    return '\n'.join(lines)


def plot_pose_errors(rows: Sequence[dict], path: Path, title: str) -> Path | None:
    """Per-pair rotation/translation errors and the cumulative error curve behind the AUC."""
    plt = report.pyplot()
    scored = [r for r in rows if r['gt']]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    idx = np.arange(len(scored))
    rot = [np.nan if r['rotation_error_deg'] is None else r['rotation_error_deg'] for r in scored]
    tra = [np.nan if r['translation_error_deg'] is None else r['translation_error_deg'] for r in scored]
    ax1.plot(idx, rot, 'o-', label='rotation')
    ax1.plot(idx, tra, 's-', label='translation direction')
    failed = [i for i, r in enumerate(scored) if r['pose_error_deg'] is None]
    if failed:
        ax1.scatter(failed, [0] * len(failed), marker='x', color='red', zorder=3,
                    label='invalid / failed')
    ax1.set_xlabel('pair')
    ax1.set_ylabel('error (deg)')
    ax1.set_title('per-pair pose error')
    ax1.legend(fontsize=8)
    errs = np.sort([np.inf if r['pose_error_deg'] is None else r['pose_error_deg'] for r in scored])
    ths = np.linspace(0, 20, 201)
    recall = [(errs <= t).mean() if errs.size else 0 for t in ths]
    ax2.plot(ths, recall)
    ax2.set_xlabel('threshold (deg) on max(rot, trans) error')
    ax2.set_ylabel('fraction of pairs')
    ax2.set_ylim(0, 1.02)
    ax2.set_title('cumulative pose error (AUC = area / threshold)')
    fig.suptitle(title)
    return report.save_figure(fig, path, dpi=90)


def plot_series(series: dict[str, Sequence[float]], path: Path, title: str, ylabel: str) -> Path:
    """One line per named series over the pair index (timings, latencies)."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, values in series.items():
        ax.plot(np.arange(len(values)), values, 'o-', label=name)
    ax.set_xlabel('pair')
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return report.save_figure(fig, path, dpi=90)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f'not JSON serialisable: {type(o)}')


def write_json(path: Path, data: dict) -> Path:
    def clean(v):  # NaN/inf are not JSON: null
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    path.write_text(json.dumps(clean(data), indent=2, default=_json_default))
    return path


# --------------------------------------------------------------------------- replay


def format_runs(runs: Sequence[tuple[str, Path]]) -> str:
    """One line per demo run (method, its folder), from its ``report/report.json``: methods
    side by side on one stream."""
    header = ('method', 'outputs', 'no output', 'latency ms', *[f'AUC@{t}' for t in
                                                               AUC_THRESHOLDS],
              'rot err deg', 'dir err deg')
    rows = [header]
    for method, out in runs:
        path = out / 'report' / 'report.json'
        if not path.is_file():
            rows.append((method, 'failed', *[''] * (len(header) - 2)))
            continue
        rep = json.loads(path.read_text())
        s = rep['summary']

        def fmt(value, spec):
            return '-' if value is None else format(value, spec)
        rows.append((method, str(rep['outputs']), str(rep['frames_without_output']),
                     fmt(rep['latency_ms']['median'], '.0f'),
                     *[fmt(s.get(f'auc@{t}'), '.3f') for t in AUC_THRESHOLDS],
                     fmt(s.get('median_rotation_error_deg'), '.2f'),
                     fmt(s.get('median_translation_error_deg'), '.2f')))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return '\n'.join('  '.join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) for r in rows)
