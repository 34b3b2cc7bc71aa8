"""``dense-match-demo``: the node on a real camera stream over DDS, measured end to end.

1. builds a bag from ``../shared/data/tum_fr3_office`` (``DENSE_MATCH_DATA`` overrides the
   data root; ``--synthetic`` or a missing folder renders a moving-camera sequence instead,
   with its exact trajectory as ground truth);
2. starts ``dense-match-node`` as a separate process in an isolated ROS domain (random
   ``ROS_DOMAIN_ID``, discovery limited to this machine);
3. plays the bag to it at the bag's own rate (``--rate`` scales it) with a small rclpy
   player, since ``ros2 bag play`` is not part of a pip install;
4. records everything the node publishes (raw CDR, written to a bag with ``bag_io``);
5. prints per-frame latency (publish of the image -> receipt of its flow), the frames that
   produced no output (the node's newest-frame worker drops what arrives while it is busy,
   as on a robot), pose errors against the ground truth with AUC, and writes a report
   folder (flow images, error and latency plots, JSON).

6. with ``--compare`` (default: ``dis``, unless that is ``--method``), runs the same demo for
   each named method and prints their figures side by side.

It exits non-zero when something real failed: the node did not start or died, or nothing
came back. Poor pose numbers are results, not failures.
"""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dense_match_ros import paths
from dense_match_ros.core.registry import DEFAULT_METHOD
from dense_match_ros.ros.parameters import OUTPUTS
from dense_match_ros.ros.tools import bag_io, make_bag, node_process, pose_report
from dense_match_ros.ros.tools.trajectory import DEFAULT_MAX_DT, read_tum, write_tum

REPO_ROOT = node_process.REPO_ROOT
NS = 1_000_000_000
IMAGE_TOPIC = '/camera/image'
INFO_TOPIC = '/camera/camera_info'
OUTPUT_NS = '/dense_match'
RECORDED = OUTPUTS
# Recording all six outputs at 640x480 is ~8 MB per pair through one Python process; on a
# 2-core machine that delays their delivery by up to seconds (measured: median latency 1.4 s
# instead of the node's own 0.6 s), so the latency would measure the recorder. The default
# set is what the report needs; --record all takes everything.
DEFAULT_RECORD = ('flow', 'relative_pose', 'pose')
DEMO_KEYFRAME_STRIDE = 1000


def data_root() -> Path:
    return paths.data_root()


@dataclasses.dataclass
class Recorded:
    topic: str
    msgtype: str
    raw: bytes
    wall_ns: int
    """Receipt time on the system clock (the recorded bag's timestamps, as ros2 bag record)."""
    mono_ns: int
    """Receipt time on the monotonic clock the player stamps its publishes with."""
    stamp_ns: int | None
    """Header stamp (None for header-less messages)."""


class _Recorder:
    """Collects serialized messages with their receipt times (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[Recorded] = []
        self.last_output_mono = 0.0

    def callback(self, topic: str, msgtype: str):
        def on_message(raw: bytes) -> None:
            now = time.monotonic_ns()
            raw = bytes(raw)
            try:
                stamp = bag_io.cdr_header_stamp_ns(raw) if topic != '/diagnostics' else None
            except ValueError:
                stamp = None
            with self.lock:
                self.items.append(Recorded(topic, msgtype, raw, time.time_ns(), now, stamp))
                if topic != '/diagnostics':
                    self.last_output_mono = now / NS
        return on_message

    def snapshot(self) -> list[Recorded]:
        with self.lock:
            return list(self.items)


def build_input(out: Path, synthetic: bool, frames: int, size: str,
                log=print) -> tuple[Path, Path, str]:
    """Write the input bag; (bag, ground-truth trajectory, description)."""
    bag = out / 'input_bag'
    tum = data_root() / 'tum_fr3_office'
    if not synthetic and tum.is_dir():
        src, note = make_bag.folder_frames(tum, 30.0, 0.0)
        intr = make_bag.read_intrinsics(tum / 'intrinsics.txt')
        gt = tum / 'groundtruth.txt'
        # Frames before the motion capture starts could never be scored: leave them out.
        has_gt = read_tum(gt).nearest(np.array([f.stamp_ns / NS for f in src])) >= 0
        skipped = int((~has_gt).sum())
        src = [f for f, keep in zip(src, has_gt) if keep]
        what = f'TUM fr3/long_office_household ({tum}): {note}'
        if skipped:
            what += (f'; {skipped} leading frames without a ground-truth sample within '
                     f'{DEFAULT_MAX_DT * 1e3:.0f} ms left out, {len(src)} played')
    else:
        if not synthetic:
            log(f'{tum} not found: using a synthetic moving-camera sequence')
        src, intr, poses = make_bag.synthetic_sequence(frames, make_bag.parse_size(size), 30.0)
        gt = out / 'groundtruth.txt'
        write_tum(gt, np.array([f.stamp_ns / NS for f in src]), poses)
        what = f'synthetic room, {len(src)} frames {size} at 30 Hz'
    make_bag.write_bag(bag, src, intr, image_topic=IMAGE_TOPIC, camera_info_topic=INFO_TOPIC,
                       overwrite=True)
    return bag, gt, what


def start_node(out: Path, env: dict[str, str], method: str, device: str,
               params: Sequence[str]) -> tuple[subprocess.Popen, Path]:
    defaults = []
    if not any(p.startswith('input_qos:=') for p in params):
        # Best-effort (sensor_data) samples larger than Fast DDS's 512 KiB shared-memory
        # segment go over fragmented UDP and are lost whole: 640x480 rgb8 (900 KiB) never
        # arrives. A reliable subscription still only ever takes the newest frame.
        defaults.append('input_qos:=reliable')
    if not any(p.startswith('keyframe_stride:=') for p in params):
        # Consecutive frames of the TUM clip are 1-2 mm apart, below what an essential matrix
        # can resolve (the pose module refuses them as degenerate_motion); matching every
        # frame against the first one (a keyframe the short clip never replaces) gives the
        # later pairs a measurable baseline. -p keyframe_stride:=1 shows frame-to-frame.
        defaults.append(f'keyframe_stride:={DEMO_KEYFRAME_STRIDE}')
    return node_process.start_node(
        out, env, [f'method:={method}', f'device:={device}', *defaults, *params],
        remaps=[f'__ns:={OUTPUT_NS}', f'image:={IMAGE_TOPIC}', f'camera_info:={INFO_TOPIC}'])


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    env = node_process.ros_env(out, args.domain)
    domain = env['ROS_DOMAIN_ID']
    node_process.adopt_ros_env(env)
    # The node needs seconds to import and build its model: start it first and prepare the
    # bag meanwhile.
    proc, node_log = start_node(out, env, args.method, args.device, args.node_param)
    print(f'node: pid {proc.pid}, ROS_DOMAIN_ID={domain}, log {node_log}')
    try:
        bag, gt_path, what = build_input(out, args.synthetic, args.frames, args.size)
        print(f'input: {what}')
        with bag_io.BagReader(bag) as reader:
            messages = list(reader.messages())
        images = [m for m in messages if m.topic == IMAGE_TOPIC]
        stamps = [bag_io.header_stamp_ns(m.to_ros()) for m in images]
        span = (messages[-1].timestamp - messages[0].timestamp) / NS
        print(f'bag: {bag} ({len(images)} images over {span:.2f} s; playing at rate '
              f'{args.rate:g} -> {span / args.rate:.2f} s)')
    except BaseException:
        node_process.stop_node(proc)
        raise

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from diagnostic_msgs.msg import DiagnosticArray

    try:
        rclpy.init(args=[])
        node = rclpy.create_node('dense_match_demo')
        recorder = _Recorder()
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE,
                         history=HistoryPolicy.KEEP_LAST)
        types = {'flow': bag_io.IMAGE, 'matchability': bag_io.IMAGE, 'flow_color': bag_io.IMAGE,
                 'relative_pose': bag_io.RELATIVE_POSE, 'pose': bag_io.POSE_COV,
                 'match_result': bag_io.MATCH_RESULT}
        subs = {}
        wanted = set(RECORDED) if 'all' in args.record else set(args.record) | {'flow', 'relative_pose'}
        for name in [n for n in RECORDED if n in wanted]:
            topic = f'{OUTPUT_NS}/{name}'
            subs[name] = node.create_subscription(bag_io.ros_class(types[name]), topic,
                                                  recorder.callback(topic, types[name]), qos, raw=True)
        node.create_subscription(DiagnosticArray, '/diagnostics',
                                 recorder.callback('/diagnostics', bag_io.DIAGNOSTICS), 10, raw=True)
        pub_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             history=HistoryPolicy.KEEP_LAST)
        pubs = {IMAGE_TOPIC: node.create_publisher(bag_io.ros_class(images[0].msgtype), IMAGE_TOPIC,
                                                   pub_qos),
                INFO_TOPIC: node.create_publisher(bag_io.ros_class(bag_io.CAMERA_INFO), INFO_TOPIC,
                                                  pub_qos)}
        executor = SingleThreadedExecutor(context=node.context)
        executor.add_node(node)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()

    except BaseException:
        node_process.stop_node(proc)
        rclpy.try_shutdown()
        raise

    failure = ''
    publish_mono: dict[int, int] = {}
    try:
        # 1. wait until the node is up and connected both ways
        deadline = time.monotonic() + args.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                failure = f'the node exited during start-up (code {proc.returncode})'
                break
            if all(p.get_subscription_count() > 0 for p in pubs.values()) and \
                    subs['flow'].get_publisher_count() > 0 and \
                    subs['relative_pose'].get_publisher_count() > 0:
                break
            time.sleep(0.05)
        else:
            failure = f'the node did not appear within {args.startup_timeout:.0f} s'
        if not failure:
            print(f'node ready after {time.monotonic() - t_start:.1f} s; playing')
            time.sleep(0.5)  # let both directions of discovery settle
            # A camera driver publishes camera_info all along: send the first one ahead so
            # the first image already has intrinsics.
            first_info = next(m for m in messages if m.topic == INFO_TOPIC)
            pubs[INFO_TOPIC].publish(first_info.raw)
            time.sleep(0.3)
            # 2. play at the bag's timing
            t0_bag, t0 = messages[0].timestamp, time.monotonic() + 0.05
            image_idx = 0
            for m in messages:
                due = t0 + (m.timestamp - t0_bag) / NS / args.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if proc.poll() is not None:
                    failure = f'the node died during playback (code {proc.returncode})'
                    break
                if m.topic == IMAGE_TOPIC:
                    publish_mono[stamps[image_idx]] = time.monotonic_ns()
                    image_idx += 1
                pubs[m.topic].publish(m.raw)
            play_end = time.monotonic()
            print(f'played {image_idx} images in {play_end - t0:.2f} s')
            # 3. wait for the last results: the final frame's output, or a quiet spell
            last_stamp = stamps[-1]
            while not failure and time.monotonic() - play_end < args.drain_timeout:
                if proc.poll() is not None:
                    failure = f'the node died after playback (code {proc.returncode})'
                    break
                got_last = any(r.topic == f'{OUTPUT_NS}/relative_pose' and r.stamp_ns == last_stamp
                               for r in recorder.snapshot())
                quiet = time.monotonic() - max(recorder.last_output_mono, play_end)
                if got_last or quiet > args.quiet:
                    break
                time.sleep(0.1)
            # one more diagnostics message, for the node's own drop counters
            n_diag = sum(r.topic == '/diagnostics' for r in recorder.snapshot())
            until = time.monotonic() + 1.5  # diagnostics_period is 1 s
            while time.monotonic() < until and proc.poll() is None and \
                    sum(r.topic == '/diagnostics' for r in recorder.snapshot()) <= n_diag:
                time.sleep(0.1)
    finally:
        alive = proc.poll() is None
        code = node_process.stop_node(proc)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        spinner.join(timeout=2.0)
    if not failure and not alive:
        failure = f'the node exited before the end of the run (code {code})'

    recorded = recorder.snapshot()
    rec_bag = out / 'recorded_bag'
    with bag_io.BagWriter(rec_bag, overwrite=True) as writer:
        for r in recorded:
            writer.write(r.topic, r.raw, r.wall_ns, msgtype=r.msgtype)
        counts = dict(writer.counts)
    status = analyse(args, out, recorded, stamps, publish_mono, gt_path, counts, rec_bag, what)
    print(f'total time {time.monotonic() - t_start:.1f} s')
    if failure:
        print(f'dense-match-demo: FAILED: {failure}\n--- node log tail ---\n{node_process.log_tail(node_log)}',
              file=sys.stderr)
        return 1
    return status


def _input_images(bag: Path) -> dict[int, np.ndarray]:
    """The played frames by stamp, as RGB (the figures' source and target)."""
    from dense_match_ros.ros import convert
    images = {}
    with bag_io.BagReader(bag) as reader:
        topics = reader.topics_of_type(bag_io.IMAGE, bag_io.COMPRESSED_IMAGE)
        for m in reader.messages(topics):
            msg = m.to_ros()
            images[convert.stamp_to_ns(msg.header.stamp)] = convert.decode_image(
                msg, m.msgtype == bag_io.COMPRESSED_IMAGE)
    return images


def analyse(args, out: Path, recorded: list[Recorded], stamps: list[int],
            publish_mono: dict[int, int], gt_path: Path, counts: dict[str, int],
            rec_bag: Path, what: str) -> int:
    """Print and write the report; 1 when no output came back."""
    flows: dict[int, Recorded] = {}
    mats: dict[int, Any] = {}
    rel_msgs = []
    diagnostics = None
    for r in recorded:
        msg = bag_io.BagMessage(r.topic, r.msgtype, r.wall_ns, r.raw)
        name = r.topic.rsplit('/', 1)[1]
        if r.topic == '/diagnostics':
            diagnostics = msg.to_ros()
        elif name == 'flow':
            flows.setdefault(r.stamp_ns, r)
        elif name == 'matchability':
            mats.setdefault(r.stamp_ns, msg.decode())
        elif name == 'relative_pose':
            rel_msgs.append(msg.decode())
    # Latency of a frame: its image's publish -> receipt of the flow answering it (the
    # node's first output message for the pair, stamped with the target image's stamp).
    latencies = {s: (f.mono_ns - publish_mono[s]) / 1e6 for s, f in flows.items()
                 if s in publish_mono}
    records = []
    for rel in rel_msgs:
        stamp = bag_io.header_stamp_ns(rel)
        extra = {'latency_ms': latencies[stamp]} if stamp in latencies else {}
        records.append(pose_report.record_from_relative_pose(rel, extra))
    trajectory = read_tum(gt_path)
    rows, summary = pose_report.evaluate(records, trajectory, DEFAULT_MAX_DT)
    n_out = len(flows)
    no_output = max(0, len(stamps) - 1 - n_out)

    print()
    print(pose_report.format_table(rows, [('latency_ms', 'lat ms', '.0f')]))
    lat = np.array(sorted(latencies.values()))
    print(f'frames published: {len(stamps)}; outputs (flow) received: {n_out}; '
          f'frames without output: {no_output} (the first frame is only the reference)')
    diag = {}
    if diagnostics is not None and diagnostics.status:
        diag = {kv.key: kv.value for kv in diagnostics.status[0].values}
        print('node diagnostics: ' + ', '.join(
            f'{k} {diag[k]}' for k in ('frames_received', 'outputs', 'dropped_stale',
                                       'dropped_rate', 'rejected', 'pose_valid',
                                       'pose_invalid', 'latency_median_ms') if k in diag))
    if lat.size:
        print(f'latency (image publish -> flow receipt): median {np.median(lat):.0f} ms, '
              f'min {lat.min():.0f} ms, max {lat.max():.0f} ms over {lat.size} outputs')
    s = summary
    print(f'poses: {len(records)} ({s["valid"]} valid, {s["pairs_with_gt"]} with ground truth '
          f'within {DEFAULT_MAX_DT * 1e3:.0f} ms)')
    if s['pairs_with_gt']:
        print('pose ' + ', '.join(f'AUC@{t}: {s[f"auc@{t}"]:.3f}' for t in pose_report.AUC_THRESHOLDS)
              + (f'; median rotation error {s["median_rotation_error_deg"]:.2f} deg, '
                 f'translation {s["median_translation_error_deg"]:.2f} deg'
                 if s.get('median_rotation_error_deg') is not None else ''))
    invalid = sorted({r['status'].split(':')[0] for r in rows if not r['valid']})
    if invalid:
        print('invalid poses by reason: ' + ', '.join(
            f'{k} x{sum(r["status"].split(":")[0] == k for r in rows)}' for k in invalid))

    report = out / 'report'
    flow_dir = report / 'flow'
    flow_dir.mkdir(parents=True, exist_ok=True)
    for old in flow_dir.glob('*.png'):
        old.unlink()
    files = []
    from dense_match_ros.evaluation import report as figures
    from dense_match_ros.ros import convert
    images = _input_images(out / 'input_bag')
    sources = {convert.stamp_to_ns(m.header.stamp): convert.stamp_to_ns(m.source_stamp)
               for m in rel_msgs}
    for i, stamp in enumerate(sorted(flows)):
        path = flow_dir / f'flow_{i:02d}_{stamp}.png'
        flow = convert.image_to_array(bag_io.BagMessage(
            flows[stamp].topic, flows[stamp].msgtype, 0, flows[stamp].raw).decode())
        source, target = images.get(sources.get(stamp)), images.get(stamp)
        if source is None or target is None:
            continue
        match = convert.image_to_array(mats[stamp]) if stamp in mats else None
        figures.save_match_figure(path, f'{args.method}: pair {i}', source, target, flow, match)
        files.append(str(path.relative_to(report)))
    if rows and any(r['gt'] for r in rows):
        files.append(pose_report.plot_pose_errors(rows, report / 'pose_errors.png',
                                             f'demo: {args.method}, rate {args.rate:g}').name)
    if latencies:
        files.append(pose_report.plot_series({'latency': [latencies[k] for k in sorted(latencies)]},
                                        report / 'latency.png',
                                        'image publish -> flow receipt', 'ms').name)
    pose_report.write_json(report / 'report.json', {
        'input': what, 'rate': args.rate, 'method': args.method, 'device': args.device,
        'node_params': list(args.node_param), 'frames_published': len(stamps),
        'outputs': n_out, 'frames_without_output': no_output, 'node_diagnostics': diag,
        'latency_ms': {'median': float(np.median(lat)) if lat.size else None,
                       'min': float(lat.min()) if lat.size else None,
                       'max': float(lat.max()) if lat.size else None,
                       'per_frame': {str(k): v for k, v in sorted(latencies.items())}},
        'summary': summary, 'pairs': rows, 'recorded_bag': str(rec_bag),
        'recorded_counts': counts, 'files': files})
    print(f'recorded: {rec_bag} ' + ', '.join(f'{t.rsplit("/", 1)[1]}: {n}'
                                               for t, n in sorted(counts.items())))
    print(f'report: {report}/report.json (+ {len(files)} images)')
    if n_out == 0:
        print('dense-match-demo: FAILED: the node published no output', file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='dense-match-demo',
        description='Play a camera bag over DDS to a running dense-match-node, record its '
                    'outputs, print latency, drops and pose errors against ground truth.')
    p.add_argument('--out', type=Path, default=(REPO_ROOT or Path.cwd()) / 'out' / 'demo',
                   help='work and report folder (default: out/demo in the repository)')
    p.add_argument('--rate', type=float, default=1.0,
                   help='playback speed factor (1 = real time; 0.25 leaves the node 4x longer per frame)')
    p.add_argument('--synthetic', action='store_true',
                   help='use the synthetic sequence even when the TUM data is present')
    p.add_argument('--frames', type=int, default=16, help='synthetic: number of frames')
    p.add_argument('--size', default='320x240', help='synthetic: WIDTHxHEIGHT')
    p.add_argument('--method', default=DEFAULT_METHOD,
                   help=f'the node\'s method (default: its default, {DEFAULT_METHOD})')
    p.add_argument('--device', default='cpu')
    p.add_argument('-p', '--node-param', action='append', default=[], metavar='NAME:=VALUE',
                   help='extra node parameter, e.g. -p keyframe_stride:=4 (repeatable)')
    p.add_argument('--record', nargs='+', default=list(DEFAULT_RECORD),
                   choices=RECORDED + ('all',), metavar='TOPIC',
                   help=f'node outputs to record: some of {", ".join(RECORDED)}, or all '
                        f'(default: {" ".join(DEFAULT_RECORD)}; flow and relative_pose always)')
    p.add_argument('--compare', nargs='+', default=['dis'], metavar='METHOD',
                   help='after the run, the same demo with these methods (default: dis, the '
                        'baseline; skipped where it is --method; none: no comparison), and '
                        'their figures side by side')
    p.add_argument('--domain', type=int, default=0, help='ROS_DOMAIN_ID (default: random 1-100)')
    p.add_argument('--startup-timeout', type=float, default=60.0)
    p.add_argument('--drain-timeout', type=float, default=20.0,
                   help='seconds to wait for outputs after playback')
    p.add_argument('--quiet', type=float, default=3.0,
                   help='stop waiting after this many seconds without a new output')
    return p


def compare(args, methods: Sequence[str]) -> int:
    """The same demo for each of ``methods`` too (``out/compare/<method>``), then their
    figures side by side: what a user weighs when choosing the node's method."""
    runs = [(args.method, Path(args.out))]
    status = run(args)
    for method in methods:
        print(f'\n=== the same stream with method {method} ===')
        other = argparse.Namespace(**{**vars(args), 'method': method,
                                      'out': Path(args.out) / 'compare' / method})
        status = max(status, run(other))
        runs.append((method, other.out))
    print('\n' + pose_report.format_runs(runs))
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rate <= 0:
        print('dense-match-demo: error: --rate must be > 0', file=sys.stderr)
        return 2
    others = [m for m in args.compare if m not in ('none', args.method)]
    try:
        return compare(args, others) if others else run(args)
    except KeyboardInterrupt:
        print('dense-match-demo: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
