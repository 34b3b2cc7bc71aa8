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
import bisect
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dense_match_ros.core.device import DEFAULT_THREADS, set_threads
from dense_match_ros.evaluation import report
from dense_match_ros.ros import convert
from dense_match_ros.ros.convert import FrameRejected, stamp_to_ns
from dense_match_ros.ros.parameters import load_params, pipeline_config_from_params
from dense_match_ros.ros.pipeline import Frame, MatchPipeline, PipelineConfig
from dense_match_ros.ros.tools import bag_io
from dense_match_ros.ros.tools.pose_report import (AUC_THRESHOLDS, PairRecord, evaluate,
                                                   format_table, plot_pose_errors, plot_series,
                                                   record_from_output,
                                                   timing_summary, write_json)
from dense_match_ros.ros.tools.trajectory import DEFAULT_MAX_DT, read_tum

@dataclasses.dataclass
class ReplayResult:
    out_bag: Path
    rows: list[dict]
    summary: dict
    counts: dict[str, int]
    rejected: dict[str, int]
    timings: dict[str, dict]
    report_dir: Path | None
    corrupt: list[dict] = dataclasses.field(default_factory=list)
    """Messages skipped because they did not decode: topic, bag time (ns), reason."""


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


class _InfoByStamp:
    """camera_info of a stream by stamp: the one with the image's stamp, else the latest one
    before it, else the first one (recorders store an image's camera_info before or after it)."""

    def __init__(self, stamped: list[tuple[int, Any]]) -> None:
        stamped.sort(key=lambda item: item[0])
        self.stamps = [s for s, _ in stamped]
        self.values = [v for _, v in stamped]

    def at(self, stamp: int):
        if not self.stamps:
            return None
        i = bisect.bisect_right(self.stamps, stamp) - 1
        return self.values[max(i, 0)]


REPORT_FIGURES = 30
"""Pairs drawn into the report (source, target, flow with its legend, matchability)."""


def _camera_infos(reader, info_topic: str | None, decode, count, rectified: bool) -> _InfoByStamp:
    """Every usable camera_info of the topic (small messages: read in a first pass)."""
    stamped = []
    for m in (reader.messages([info_topic]) if info_topic else []):
        msg = decode(m)
        if msg is None:
            continue
        try:
            stamped.append((stamp_to_ns(msg.header.stamp),
                            convert.camera_info_to_intrinsics(msg, rectified=rectified)))
        except FrameRejected as err:
            count(err.reason)
    return _InfoByStamp(stamped)


def replay(bag: Path, out_bag: Path, config: PipelineConfig, *, image_topic: str | None = None,
           info_topic: str | None = None, output_ns: str = '/dense_match',
           storage: str = 'sqlite3', rectified: bool = False,
           groundtruth: Path | None = None, max_dt: float = DEFAULT_MAX_DT,
           report_dir: Path | None = None, copy_inputs: bool = False,
           mono16_max: float = 65535.0, progress: bool = True, log=print,
           overwrite: bool = False) -> ReplayResult:
    """Replay ``bag`` through MatchPipeline, write ``out_bag``, score against ``groundtruth``.

    A message that does not decode is skipped, counted (``corrupt_message``) and named in
    the report's ``corrupt`` list (topic, bag time, reason); the rest replays. camera_info is
    matched to each image by stamp, whatever their order in the file.
    """
    from tqdm import tqdm
    from dense_match_ros.ros.messages import output_messages  # the ROS message classes
    trajectory = read_tum(groundtruth) if groundtruth is not None else None
    config = dataclasses.replace(config, color_output=True)
    rejected: dict[str, int] = {}

    corrupt: list[dict] = []

    def count(reason: str) -> None:
        rejected[reason] = rejected.get(reason, 0) + 1

    def decode(m):
        """The rosbags message, or None (counted and named) when its bytes do not decode."""
        try:
            return m.to_ros()
        except Exception as err:  # any deserialiser failure: the message is damaged
            count('corrupt_message')
            corrupt.append({'topic': m.topic, 'timestamp_ns': int(m.timestamp),
                            'reason': f'{type(err).__name__}: {err}'[:300]})
            return None

    def warn(reason: str, message: str) -> None:
        count(f'warning:{reason}')
        log(f'warning: {message}')

    ns = '/' + output_ns.strip('/') if output_ns.strip('/') else ''
    records: list[PairRecord] = []
    decode_s: list[float] = []
    process_s: list[float] = []
    figures: list[tuple] = []          # (source, target, flow, matchability) of early pairs
    images: dict[int, np.ndarray] = {}  # decoded frames by stamp, while figures are wanted
    t_start = time.perf_counter()
    if Path(out_bag).exists() and not overwrite:
        raise FileExistsError(f'{out_bag} exists; choose another --out or pass --overwrite')
    with bag_io.BagReader(bag) as reader:
        image_topic, info_topic = detect_topics(reader, image_topic, info_topic)
        infos = _camera_infos(reader, info_topic, decode, count, rectified)
        # Only now (after the cheap checks) load the model and create the output bag.
        pipeline = MatchPipeline(config, warn=warn)
        with bag_io.BagWriter(out_bag, storage=storage, overwrite=True) as writer:
            if info_topic is None:
                log('warning: no camera_info topic: flow only, no pose')
            topics = [image_topic] + ([info_topic] if info_topic and copy_inputs else [])
            n_images = reader.topics[image_topic].count
            bar = tqdm(total=n_images, desc='replay', unit='frame', disable=not progress,
                       file=sys.stderr)
            for m in reader.messages(topics):
                if copy_inputs:
                    writer.write(m.topic, m.raw, m.timestamp, msgtype=m.msgtype)
                if m.topic == info_topic:
                    continue  # copied above; matched to images by stamp
                bar.update(1)
                msg = decode(m)
                if msg is None:
                    continue
                t0 = time.perf_counter()
                try:
                    rgb = convert.decode_image(msg, m.msgtype == bag_io.COMPRESSED_IMAGE,
                                               max_pixels=config.max_image_pixels,
                                               mono16_max=mono16_max)
                except FrameRejected as err:
                    count(err.reason)
                    continue
                stamp = stamp_to_ns(msg.header.stamp)
                frame = Frame(rgb, stamp, str(msg.header.frame_id), infos.at(stamp),
                              receipt_time=time.monotonic())
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
                if len(figures) < REPORT_FIGURES:
                    images[stamp] = rgb
                    if out.source_stamp_ns in images:
                        figures.append((images[out.source_stamp_ns], rgb, out.flow,
                                        out.matchability))
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
    summary['corrupt_messages'] = len(corrupt)
    result = ReplayResult(out_bag, rows, summary, counts, rejected, timings, report_dir, corrupt)
    if report_dir is not None:
        write_report(result, report_dir, bag, config, figures, image_topic)
    return result


def write_report(result: ReplayResult, report_dir: Path, bag: Path, config: PipelineConfig,
                 figures: Sequence[tuple], image_topic: str) -> None:
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
    for i, (source, target, flow, matchability) in enumerate(figures):
        path = report.save_match_figure(flows / f'pair_{i:03d}.png', f'{title}: pair {i}',
                                        source, target, flow, matchability)
        files.append(f'flow/{path.name}')
    write_json(report_dir / 'report.json', {
        'bag': str(bag), 'out_bag': str(result.out_bag), 'image_topic': image_topic,
        'config': dataclasses.asdict(config), 'summary': result.summary,
        'timings': result.timings, 'rejected': result.rejected, 'counts': result.counts,
        'corrupt': result.corrupt,
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
    p.add_argument('--overwrite', action='store_true', help='replace an existing output bag')
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
        set_threads(int(params.get('threads', DEFAULT_THREADS)))
        config = pipeline_config_from_params(params)
        result = replay(bag, out, config, image_topic=args.image_topic,
                        info_topic=args.camera_info_topic, output_ns=args.output_ns,
                        storage=args.storage,
                        rectified=args.rectified or bool(params.get('use_rectified', False)),
                        mono16_max=float(params.get('mono16_max', 65535.0)),
                        groundtruth=args.groundtruth, max_dt=args.max_dt, report_dir=report_dir,
                        copy_inputs=args.copy_inputs, progress=not args.no_progress,
                        overwrite=args.overwrite)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        print(f'dense-match-replay: error: {err}', file=sys.stderr)
        return 2
    except Exception as err:  # an unreadable bag (truncated, damaged, not a bag): one line
        print(f'dense-match-replay: error: cannot read {args.bag}: {type(err).__name__}: {err}',
              file=sys.stderr)
        return 2
    print_summary(result)
    if not result.rows:
        print('dense-match-replay: no output pairs (fewer than two usable frames?)', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
