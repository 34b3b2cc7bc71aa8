"""``dense-match-replay BAG``: run the node's processing path over a rosbag2 and score it.

The bag's image and camera_info messages are decoded with the node's own conversion
functions (:mod:`dense_match_ros.ros.convert`) into :class:`~dense_match_ros.ros.pipeline.Frame`
objects and fed to :class:`~dense_match_ros.ros.pipeline.MatchPipeline`, the class the node's
worker calls, configured from the node's parameter table
(:mod:`dense_match_ros.ros.parameters`); the outputs become the node's messages
(:mod:`dense_match_ros.ros.messages`) and go to a new bag. Nothing is dropped
here (every frame is processed in order, unlike a live node under load), so the report
measures the method, not the machine's speed; the timings tell what the speed would be.

Given a TUM ground-truth trajectory, each output pair is scored: rotation and translation
direction errors of the estimated T_target_source against
``inv(T_w_target) @ T_w_source``, and pose AUC@5/10/20 over all pairs with ground truth
(an invalid pose counts as a failure, i.e. infinite error). The report is a JSON file plus
PNG plots; the same scoring serves the live demo (:mod:`dense_match_ros.ros.tools.demo`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from dense_match_ros.evaluation.metrics import (pose_auc, pose_error_deg, rotation_error_deg,
                                                translation_direction_error_deg)
from dense_match_ros.evaluation import report
from dense_match_ros.ros import convert
from dense_match_ros.ros.convert import FrameRejected, stamp_to_ns
from dense_match_ros.ros.parameters import load_params, pipeline_config_from_params
from dense_match_ros.ros.pipeline import Frame, MatchPipeline, PipelineConfig, PipelineOutput
from dense_match_ros.ros.tools import bag_io
from dense_match_ros.ros.tools.trajectory import DEFAULT_MAX_DT, Trajectory, read_tum

NS = 1_000_000_000
AUC_THRESHOLDS = (5, 10, 20)


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
            ''.join(f'{h:>9} ' for _, h, _ in extra_cols) + 'status')
    lines = [head]
    for i, r in enumerate(rows):
        base = r.get('gt_baseline_m')
        lines.append(
            f'{i:>3} {r["source_stamp"]:>17.6f} {r["target_stamp"]:>17.6f} {r["dt"] * 1e3:>6.1f} '
            f'{fmt(None if base is None else base * 1e3, ".1f"):>7} '
            f'{fmt(r["rotation_error_deg"], ".2f"):>6} {fmt(r["translation_error_deg"], ".2f"):>6} '
            f'{r["num_inliers"]:>5} ' +
            ''.join(f'{fmt(r.get(k), spec):>9} ' for k, _, spec in extra_cols) +
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


def save_flow_png(flow_color_rgb: np.ndarray, path: Path) -> Path:
    import cv2
    cv2.imwrite(str(path), cv2.cvtColor(flow_color_rgb, cv2.COLOR_RGB2BGR))
    return path


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


@dataclasses.dataclass
class ReplayResult:
    out_bag: Path
    rows: list[dict]
    summary: dict
    counts: dict[str, int]
    rejected: dict[str, int]
    timings: dict[str, dict]
    report_dir: Path | None


def detect_topics(reader: bag_io.BagReader, image_topic: str | None,
                  info_topic: str | None) -> tuple[str, str | None]:
    """The image and camera_info topics: the given ones, or the bag's only candidates."""
    if image_topic is None:
        images = reader.topics_of_type(bag_io.IMAGE, bag_io.COMPRESSED_IMAGE)
        if len(images) != 1:
            raise ValueError(f'{reader.path}: {len(images)} image topics '
                             f'({", ".join(images) or "none"}); choose one with --image-topic')
        image_topic = images[0]
    elif image_topic not in reader.topics:
        raise ValueError(f'{reader.path}: no topic {image_topic}; topics: '
                         f'{", ".join(sorted(reader.topics))}')
    if info_topic is None:
        infos = reader.topics_of_type(bag_io.CAMERA_INFO)
        ns = image_topic.rsplit('/', 2 if image_topic.endswith('/compressed') else 1)[0]
        near = [t for t in infos if t.rsplit('/', 1)[0] == ns]
        if len(near) == 1:
            info_topic = near[0]
        elif len(infos) == 1:
            info_topic = infos[0]
        elif infos:
            raise ValueError(f'{reader.path}: several camera_info topics ({", ".join(infos)}); '
                             f'choose one with --camera-info-topic')
    elif info_topic not in reader.topics:
        raise ValueError(f'{reader.path}: no topic {info_topic}')
    return image_topic, info_topic


def replay(bag: Path, out_bag: Path, config: PipelineConfig, *, image_topic: str | None = None,
           info_topic: str | None = None, output_ns: str = '/dense_match',
           storage: str = 'sqlite3', rectified: bool = False,
           groundtruth: Path | None = None, max_dt: float = DEFAULT_MAX_DT,
           report_dir: Path | None = None, copy_inputs: bool = False,
           mono16_max: float = 65535.0, progress: bool = True, log=print) -> ReplayResult:
    """Replay ``bag`` through MatchPipeline, write ``out_bag``, score against ``groundtruth``."""
    from tqdm import tqdm
    from dense_match_ros.ros.messages import output_messages  # the ROS message classes
    trajectory = read_tum(groundtruth) if groundtruth is not None else None
    config = dataclasses.replace(config, color_output=True)
    rejected: dict[str, int] = {}

    def count(reason: str) -> None:
        rejected[reason] = rejected.get(reason, 0) + 1

    def warn(reason: str, message: str) -> None:
        count(f'warning:{reason}')
        log(f'warning: {message}')

    ns = '/' + output_ns.strip('/') if output_ns.strip('/') else ''
    records: list[PairRecord] = []
    decode_s: list[float] = []
    process_s: list[float] = []
    flow_colors: list[np.ndarray] = []
    t_start = time.perf_counter()
    with bag_io.BagReader(bag) as reader:
        image_topic, info_topic = detect_topics(reader, image_topic, info_topic)
        # Only now (after the cheap checks) load the model and create the output bag.
        pipeline = MatchPipeline(config, warn=warn)
        with bag_io.BagWriter(out_bag, storage=storage, overwrite=True) as writer:
            if info_topic is None:
                log('warning: no camera_info topic: flow only, no pose')
            topics = [image_topic] + ([info_topic] if info_topic else [])
            n_images = reader.topics[image_topic].count
            intrinsics = None
            bar = tqdm(total=n_images, desc='replay', unit='frame', disable=not progress,
                       file=sys.stderr)
            for m in reader.messages(topics):
                if copy_inputs:
                    writer.write(m.topic, m.raw, m.timestamp, msgtype=m.msgtype)
                msg = m.to_ros()
                if m.topic == info_topic:
                    try:
                        intrinsics = convert.camera_info_to_intrinsics(msg, rectified=rectified)
                    except FrameRejected as err:
                        count(err.reason)
                        intrinsics = None
                    continue
                bar.update(1)
                t0 = time.perf_counter()
                try:
                    rgb = convert.decode_image(msg, m.msgtype == bag_io.COMPRESSED_IMAGE,
                                               max_pixels=config.max_image_pixels,
                                               mono16_max=mono16_max)
                except FrameRejected as err:
                    count(err.reason)
                    continue
                frame = Frame(rgb, stamp_to_ns(msg.header.stamp), str(msg.header.frame_id),
                              intrinsics, receipt_time=time.monotonic())
                decode_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                try:
                    out = pipeline.process(frame)
                except FrameRejected as err:
                    count(err.reason)
                    continue
                except Exception as err:  # the node's worker survives anything; so does replay
                    count('processing_error')
                    log(f'warning: frame dropped: {type(err).__name__}: {err}')
                    continue
                if out is None:
                    continue
                process_s.append(time.perf_counter() - t0)
                for name, out_msg in output_messages(out).items():
                    writer.write(f'{ns}/{name}', out_msg, m.timestamp)
                if out.flow_color is not None:
                    flow_colors.append(out.flow_color)
                extra = {f'{k}_ms': v * 1e3 for k, v in out.timings.items()}
                extra['process_ms'] = process_s[-1] * 1e3
                records.append(record_from_output(out, extra))
            bar.close()
        counts = dict(writer.counts)
    wall = time.perf_counter() - t_start
    rows, summary = evaluate(records, trajectory, max_dt)
    timings = {'decode': timing_summary(decode_s), 'process': timing_summary(process_s)}
    for key in ('match', 'pose', 'total'):
        timings[key] = timing_summary([r.extra.get(f'{key}_ms', np.nan) / 1e3 for r in records])
    summary['frames'] = n_images
    summary['wall_s'] = wall
    summary['throughput_fps'] = n_images / wall if wall > 0 else None
    result = ReplayResult(out_bag, rows, summary, counts, rejected, timings, report_dir)
    if report_dir is not None:
        write_report(result, report_dir, bag, config, flow_colors, image_topic)
    return result


def write_report(result: ReplayResult, report_dir: Path, bag: Path, config: PipelineConfig,
                 flow_colors: Sequence[np.ndarray], image_topic: str) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    title = f'{bag.name}: {config.method}'
    files = []
    if any(r['gt'] for r in result.rows):
        files.append(plot_pose_errors(result.rows, report_dir / 'pose_errors.png', title).name)
    if result.rows:
        files.append(plot_series(
            {k: [r.get(f'{k}_ms', np.nan) for r in result.rows] for k in ('match', 'pose', 'total')},
            report_dir / 'timing.png', f'{title}: time per pair', 'ms').name)
    flows = report_dir / 'flow'
    flows.mkdir(exist_ok=True)
    for i, img in enumerate(flow_colors):
        files.append(f'flow/{save_flow_png(img, flows / f"pair_{i:03d}.png").name}')
    write_json(report_dir / 'report.json', {
        'bag': str(bag), 'out_bag': str(result.out_bag), 'image_topic': image_topic,
        'config': dataclasses.asdict(config), 'summary': result.summary,
        'timings': result.timings, 'rejected': result.rejected, 'counts': result.counts,
        'pairs': result.rows, 'files': files})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='dense-match-replay',
        description="Run the matcher node's processing path over a rosbag2 (sqlite3 or mcap), "
                    'write its outputs to a new bag and, with --groundtruth, a pose report.')
    p.add_argument('bag', type=Path)
    p.add_argument('-o', '--out', type=Path, help='output bag (default: BAG_replay next to BAG)')
    p.add_argument('--storage', choices=sorted(bag_io.STORAGES), default='sqlite3')
    p.add_argument('--image-topic', help='default: the bag\'s only Image/CompressedImage topic')
    p.add_argument('--camera-info-topic', help='default: the CameraInfo topic beside the image topic')
    p.add_argument('--rectified', action='store_true', help='intrinsics from P (rectified images)')
    p.add_argument('--output-ns', default='/dense_match', help='namespace of the output topics')
    p.add_argument('--params', type=Path, help='node parameters YAML (config/*.yaml)')
    p.add_argument('-p', '--param', action='append', default=[], metavar='KEY=VALUE',
                   help='override one node parameter (repeatable)')
    p.add_argument('--method', help='shorthand for -p method=NAME')
    p.add_argument('--device', help='shorthand for -p device=auto|cpu|cuda')
    p.add_argument('--groundtruth', type=Path, help='TUM trajectory (camera-to-world)')
    p.add_argument('--max-dt', type=float, default=DEFAULT_MAX_DT,
                   help='ground-truth association tolerance in seconds')
    p.add_argument('--report', type=Path, help='report folder (default: OUT_report)')
    p.add_argument('--copy-inputs', action='store_true', help='also copy the input topics')
    p.add_argument('--no-progress', action='store_true')
    return p


def print_summary(result: ReplayResult, log=print) -> None:
    log(format_table(result.rows, [('match_ms', 'match ms', '.0f'), ('pose_ms', 'pose ms', '.0f')]))
    s = result.summary
    log(f'pairs: {s["pairs"]} ({s["valid"]} valid poses, {s["pairs_with_gt"]} with ground truth); '
        f'frames: {s["frames"]} in {s["wall_s"]:.1f} s ({s["throughput_fps"]:.2f} frames/s)')
    if 'auc@5' in s:
        auc = ', '.join(f'AUC@{t}: {s[f"auc@{t}"]:.3f}' for t in AUC_THRESHOLDS
                        if s.get(f'auc@{t}') is not None)
        log(f'pose {auc}')
    for key, t in result.timings.items():
        if t['n']:
            log(f'time {key:>7}: median {t["median_ms"]:.1f} ms, mean {t["mean_ms"]:.1f} ms, '
                f'p90 {t["p90_ms"]:.1f} ms, max {t["max_ms"]:.1f} ms (n={t["n"]})')
    if result.rejected:
        log('rejected/warnings: ' + ', '.join(f'{k}: {v}' for k, v in sorted(result.rejected.items())))
    log(f'output bag: {result.out_bag} ' + ', '.join(f'{t}: {n}' for t, n in result.counts.items()))
    if result.report_dir is not None:
        log(f'report: {result.report_dir}/report.json')


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = list(args.param)
    if args.method:
        overrides.append(f'method={args.method}')
    if args.device:
        overrides.append(f'device={args.device}')
    bag = args.bag.resolve() if args.bag.exists() else args.bag
    out = args.out or bag.with_name(bag.name.rstrip('/') + '_replay')
    report_dir = args.report or out.with_name(out.name + '_report')
    try:
        params = load_params(args.params, overrides)
        config = pipeline_config_from_params(params)
        result = replay(bag, out, config, image_topic=args.image_topic,
                        info_topic=args.camera_info_topic, output_ns=args.output_ns,
                        storage=args.storage,
                        rectified=args.rectified or bool(params.get('use_rectified', False)),
                        mono16_max=float(params.get('mono16_max', 65535.0)),
                        groundtruth=args.groundtruth, max_dt=args.max_dt, report_dir=report_dir,
                        copy_inputs=args.copy_inputs, progress=not args.no_progress)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f'dense-match-replay: error: {err}', file=sys.stderr)
        return 2
    print_summary(result)
    if not result.rows:
        print('dense-match-replay: no output pairs (fewer than two usable frames?)', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
