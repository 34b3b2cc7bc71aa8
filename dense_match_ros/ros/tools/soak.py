"""``dense-match-soak``: the node under a camera-rate stream for minutes or hours, measured.

A robot runs the node for hours; a leak of a few MB per minute or a bad message that kills
the worker shows only then. The soak:

1. times one bare OpenCV DIS-medium call at the stream's size (the latency yardstick, with
   the node's thread count, before the node starts so nothing competes with it);
2. starts ``dense-match-node`` as a separate process (its own ROS domain) and plays a moving
   camera (a textured scene under a slowly turning, panning view) to it at ``--rate`` Hz
   with camera_info, as a reliable driver would;
3. every ``--bad-every`` seconds sends the next entry of :data:`BAD_INPUTS` (the node's
   bad-input catalogue: unknown encoding, wrong data size, size change, zero K, stamps
   backwards, duplicate stamp, 1x1, 8000x8000) and checks that the node names it in its log
   and goes on producing flow, without a restart;
4. every ``--sample`` seconds records the node's RSS, latency percentiles (image publish ->
   flow receipt), outputs, drops and its ``/diagnostics`` per-stage breakdown;
5. writes ``soak.json``, ``samples.csv`` and ``soak.png`` (RSS, latency, output rate over time)
   and exits 1 when the node died, stopped answering, missed a bad input or grew its RSS by
   more than ``--max-rss-growth`` % after the warm-up.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import threading
import time
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from dense_match_ros.core.dis_presets import create_dis
from dense_match_ros.core.registry import DEFAULT_METHOD
from dense_match_ros.ros.tools import node_process
from dense_match_ros.ros.tools.soak_inputs import (BAD_INPUTS, camera_frames, image_msg, info_msg,
                                                   set_stamp)

IMAGE_TOPIC = '/soak/image'
INFO_TOPIC = '/soak/camera_info'
OUTPUT_NS = '/soak_dm'
BAD_PAUSE_S = 1.0
"""Good frames wait this long after a bad input, so the node's newest-frame mailbox hands
the bad one to the worker instead of replacing it."""


# ------------------------------------------------------------------------------ measuring


def dis_reference_ms(frames: Sequence[np.ndarray], threads: int, repeats: int = 15) -> float:
    """Median time of one bare OpenCV DIS-medium call (grey, one direction) on the frames."""
    previous = cv2.getNumThreads()
    if threads > 0:
        cv2.setNumThreads(threads)
    try:
        dis = create_dis('medium')
        grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames[:2]]
        dis.calc(grey[0], grey[1], None)  # first call allocates
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dis.calc(grey[0], grey[1], None)
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e3)
    finally:
        cv2.setNumThreads(previous)


@dataclasses.dataclass
class Sample:
    t_s: float
    rss_mb: float | None
    published: int
    outputs: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    node_received: int
    node_dropped_stale: int
    node_rejected: int


class _Listener:
    """Flow receipts (stamp -> monotonic time) and the node's latest /diagnostics values."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.published: dict[int, float] = {}
        self.latencies: list[tuple[float, float]] = []   # (receipt time, latency s)
        self.output_stamps: list[tuple[float, int]] = []
        self.diag: dict[str, str] = {}

    def mark_published(self, stamp_ns: int) -> None:
        with self.lock:
            self.published[stamp_ns] = time.monotonic()
            if len(self.published) > 2000:  # frames the node dropped never come back
                for key in sorted(self.published)[:1000]:
                    del self.published[key]

    def on_flow(self, raw: bytes) -> None:
        from dense_match_ros.ros.tools.bag_io import cdr_header_stamp_ns
        now = time.monotonic()
        stamp = cdr_header_stamp_ns(bytes(raw[:16]))
        with self.lock:
            sent = self.published.pop(stamp, None)
            self.output_stamps.append((now, stamp))
            if sent is not None:
                self.latencies.append((now, now - sent))

    def on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.name.startswith(OUTPUT_NS):
                with self.lock:
                    self.diag = {kv.key: kv.value for kv in status.values}


def _int(diag: dict[str, str], key: str) -> int:
    try:
        return int(diag.get(key, 0))
    except ValueError:
        return 0


def _percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    if not len(values):
        return (float('nan'),) * 3
    p = np.percentile(np.asarray(values) * 1e3, [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


# ------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class Injection:
    reason: str
    t_s: float
    resumed_after_s: float | None = None
    named_in_log: bool = False


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = args.size
    frames = camera_frames(args.frames, size)
    dis_ms = dis_reference_ms(frames, args.threads)
    dis_all_ms = dis_reference_ms(frames, 0)
    print(f'bare DIS-medium call at {size[0]}x{size[1]}: {dis_ms:.1f} ms with the node\'s '
          f'{args.threads} thread(s), {dis_all_ms:.1f} ms with OpenCV\'s default threads')
    env = node_process.ros_env(out, args.domain, args.large_data)
    node_process.adopt_ros_env(env)
    params = [f'method:={args.method}', f'threads:={args.threads}', *args.node_param]
    proc, node_log = node_process.start_node(
        out, env, params, remaps=[f'__ns:={OUTPUT_NS}', f'image:={IMAGE_TOPIC}',
                                  f'camera_info:={INFO_TOPIC}'])
    print(f'node: pid {proc.pid}, ROS_DOMAIN_ID={env["ROS_DOMAIN_ID"]}, log {node_log}')

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image

    listener = _Listener()
    rclpy.init(args=[])
    node = rclpy.create_node('dense_match_soak')
    reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE,
                          history=HistoryPolicy.KEEP_LAST)
    pubs = {'image': node.create_publisher(Image, IMAGE_TOPIC, reliable),
            'info': node.create_publisher(CameraInfo, INFO_TOPIC, reliable)}
    flow_sub = node.create_subscription(Image, f'{OUTPUT_NS}/flow', listener.on_flow, reliable,
                                        raw=True)
    node.create_subscription(DiagnosticArray, '/diagnostics', listener.on_diagnostics, 10)
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    samples: list[Sample] = []
    injections: list[Injection] = []
    failure = ''
    published = 0
    try:
        deadline = time.monotonic() + args.startup_timeout
        while not failure:
            if proc.poll() is not None:
                failure = f'the node exited during start-up (code {proc.returncode})'
            elif (pubs['image'].get_subscription_count() and flow_sub.get_publisher_count()):
                break
            elif time.monotonic() > deadline:
                failure = f'the node did not appear within {args.startup_timeout:.0f} s'
            time.sleep(0.05)
        msgs = [image_msg(f, 0) for f in frames]
        info = info_msg(size, 0)
        t0 = time.monotonic()
        end = t0 + args.minutes * 60.0
        next_frame, next_sample = t0, t0 + args.sample
        next_bad = t0 + args.bad_every if args.bad_every > 0 else float('inf')
        last_stamp, index, bad_index = 0, 0, 0
        warm = warmup_s(args)
        print(f'playing {size[0]}x{size[1]} at {args.rate:g} Hz for {args.minutes:g} min')
        while not failure and time.monotonic() < end:
            now = time.monotonic()
            if proc.poll() is not None:
                failure = f'the node died after {now - t0:.0f} s (code {proc.returncode})'
                break
            if now >= next_sample:
                samples.append(_sample(now - t0, proc.pid, published, listener, args.sample))
                next_sample += args.sample
                if args.verbose:
                    print(_format_sample(samples[-1]), flush=True)
            if now >= next_bad:
                cycle = [b for b in BAD_INPUTS if now - t0 < warm or not b.warmup_only]
                bad = cycle[bad_index % len(cycle)]
                bad_index += 1
                time.sleep(BAD_PAUSE_S)  # let the last good frame through first
                stamp = max(time.time_ns(), last_stamp + 1)
                for topic, msg in bad.make(frames[index % len(frames)], size, stamp, last_stamp):
                    pubs[topic].publish(msg)
                injections.append(Injection(bad.reason, time.monotonic() - t0))
                time.sleep(BAD_PAUSE_S)
                next_bad += args.bad_every
                next_frame = time.monotonic()
                continue
            if now < next_frame:
                time.sleep(min(next_frame - now, 0.05))
                continue
            # The camera loops through the frames back and forth: no jump at the wrap.
            k = index % (2 * len(frames) - 2) if len(frames) > 1 else 0
            msg = msgs[k if k < len(frames) else 2 * len(frames) - 2 - k]
            stamp = max(time.time_ns(), last_stamp + 1)
            set_stamp(info, stamp)
            set_stamp(msg, stamp)
            pubs['info'].publish(info)
            listener.mark_published(stamp)
            pubs['image'].publish(msg)
            last_stamp, index, published = stamp, index + 1, published + 1
            next_frame = max(next_frame + 1.0 / args.rate, time.monotonic() - 1.0 / args.rate)
        if not failure:
            samples.append(_sample(time.monotonic() - t0, proc.pid, published, listener,
                                   args.sample))
            time.sleep(2.0)  # the answers to the last frames
    finally:
        code = node_process.stop_node(proc)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        spinner.join(timeout=2.0)
    summary = summarise(args, t0, samples, injections, listener, node_log,
                        (dis_ms, dis_all_ms), published, failure, code)
    write_report(out, summary, samples)
    print(format_summary(summary))
    if summary['failures']:
        print('dense-match-soak: FAILED: ' + '; '.join(summary['failures']))
        print('--- node log tail ---\n' + node_process.log_tail(node_log))
        return 1
    return 0


def _sample(t_s: float, pid: int, published: int, listener: _Listener,
            window_s: float) -> Sample:
    since = time.monotonic() - window_s
    with listener.lock:
        window = [lat for when, lat in listener.latencies if when >= since]
        outputs = len(listener.output_stamps)
        diag = dict(listener.diag)
    p50, p95, p99 = _percentiles(window)
    return Sample(round(t_s, 2), node_process.rss_mb(pid), published, outputs, p50, p95, p99,
                  _int(diag, 'frames_received'), _int(diag, 'dropped_stale'),
                  _int(diag, 'rejected'))


def _format_sample(s: Sample) -> str:
    rss = f'{s.rss_mb:.1f}' if s.rss_mb is not None else '-'
    return (f'{s.t_s:7.1f} s  rss {rss} MB  published {s.published}  outputs {s.outputs}  '
            f'latency p50 {s.latency_p50_ms:.0f} / p95 {s.latency_p95_ms:.0f} ms')


# ------------------------------------------------------------------------------ the verdict


def warmup_s(args) -> float:
    """Seconds before RSS growth and latency count (at most half the run)."""
    return min(args.warmup, 0.5 * args.minutes * 60.0)


def rss_growth_pct(samples: Sequence[Sample], warm_s: float, edge: int = 3) -> float | None:
    """RSS growth after the warm-up in percent: the median of the last ``edge`` samples over
    the median of the first ``edge`` after the warm-up. A single sample moves by a frame's
    buffers (+-6 MB at 640x480, depending on what is allocated at that instant); a leak
    moves the medians."""
    rss = [s.rss_mb for s in samples if s.t_s >= warm_s and s.rss_mb is not None]
    if len(rss) < 2:
        return None
    k = max(1, min(edge, len(rss) // 2))
    first, last = float(np.median(rss[:k])), float(np.median(rss[-k:]))
    return 100.0 * (last - first) / first


def summarise(args, t0: float, samples: list[Sample], injections: list[Injection],
              listener: _Listener, node_log: Path, dis_ms: tuple[float, float], published: int,
              failure: str, exit_code: int | None) -> dict:
    """Everything the soak measured, with the list of what failed (empty: passed).

    ``t0`` is the monotonic time the stream started: samples and bad inputs are timed from it.
    """
    failures = [failure] if failure else []
    log = node_log.read_text(errors='replace') if node_log.is_file() else ''
    with listener.lock:
        receipts = np.array([when - t0 for when, _ in listener.output_stamps])
        latencies = [(when - t0, lat) for when, lat in listener.latencies]
        diag = dict(listener.diag)
    for inj in injections:
        inj.named_in_log = f'[{inj.reason}]' in log
        if not inj.named_in_log:
            failures.append(f'bad input {inj.reason!r} at {inj.t_s:.0f} s not named in the log')
    # When did flow come again after each bad input?
    if receipts.size and samples:
        for inj in injections:
            later = receipts[receipts > inj.t_s + BAD_PAUSE_S]
            inj.resumed_after_s = float(later[0] - inj.t_s) if later.size else None
            if inj.resumed_after_s is None and inj.t_s < samples[-1].t_s - 10.0:
                failures.append(f'no flow after bad input {inj.reason!r} at {inj.t_s:.0f} s')
    warm = warmup_s(args)
    after = [s for s in samples if s.t_s >= warm and s.rss_mb is not None]
    growth = rss_growth_pct(samples, warm)
    if growth is not None:
        if growth > args.max_rss_growth:
            failures.append(f'RSS grew {growth:.2f} % after the warm-up (limit '
                            f'{args.max_rss_growth:g} %)')
    if not receipts.size:
        failures.append('the node published no flow')
    if exit_code not in (0, -2, 130) and not failure:
        failures.append(f'the node exited with code {exit_code} when stopped')
    steady = [lat for when, lat in latencies if when >= warm]
    p50, p95, p99 = _percentiles(steady)
    return {
        'method': args.method, 'size': list(args.size), 'rate_hz': args.rate,
        'minutes': args.minutes, 'threads': args.threads, 'node_params': list(args.node_param),
        'large_data': bool(args.large_data),
        'warmup_s': warm, 'published': published, 'outputs': len(receipts),
        'answered_fraction': len(receipts) / published if published else 0.0,
        'latency_ms': {'p50': p50, 'p95': p95, 'p99': p99,
                       'max': max((lat for lat in steady), default=float('nan')) * 1e3},
        'dis_medium_call_ms': dis_ms[0],
        'latency_over_dis_call': p50 / dis_ms[0] if dis_ms[0] > 0 else None,
        'dis_medium_call_default_threads_ms': dis_ms[1],
        'latency_over_dis_call_default_threads': p50 / dis_ms[1] if dis_ms[1] > 0 else None,
        'rss_mb': {'first': samples[0].rss_mb if samples else None,
                   'after_warmup': after[0].rss_mb if after else None,
                   'last': after[-1].rss_mb if after else None,
                   'max': max((s.rss_mb for s in after), default=None),
                   'growth_after_warmup_pct': growth},
        'node_diagnostics': diag,
        'stages_ms': {k[len('stage_'):-len('_ms')]: float(v) for k, v in diag.items()
                      if k.startswith('stage_') and k.endswith('_ms') and v != 'nan'},
        'bad_inputs': [dataclasses.asdict(i) for i in injections],
        'failures': failures,
    }


def format_summary(summary: dict) -> str:
    lat, rss = summary['latency_ms'], summary['rss_mb']
    growth = rss['growth_after_warmup_pct']
    lines = [
        f"{summary['method']} {summary['size'][0]}x{summary['size'][1]} at "
        f"{summary['rate_hz']:g} Hz, {summary['minutes']:g} min: {summary['published']} frames "
        f"published, {summary['outputs']} flows ({100 * summary['answered_fraction']:.0f} %)",
        f"latency (publish -> flow receipt, after warm-up): p50 {lat['p50']:.1f} ms, p95 "
        f"{lat['p95']:.1f}, p99 {lat['p99']:.1f}, max {lat['max']:.1f}",
        f"one bare DIS-medium call: {summary['dis_medium_call_ms']:.1f} ms with the node's "
        f"threads ({summary['threads']}) -> p50 = "
        f"{summary['latency_over_dis_call'] or float('nan'):.2f}x; "
        f"{summary['dis_medium_call_default_threads_ms']:.1f} ms with OpenCV's default threads "
        f"-> {summary['latency_over_dis_call_default_threads'] or float('nan'):.2f}x",
        'node stages (median ms): ' + ', '.join(f'{k} {v:.1f}'
                                                for k, v in summary['stages_ms'].items()),
        f"RSS: {rss['after_warmup']} MB after warm-up -> {rss['last']} MB "
        f"({'n/a' if growth is None else f'{growth:+.2f} %'}), max {rss['max']}",
    ]
    if summary['bad_inputs']:
        named = sum(b['named_in_log'] for b in summary['bad_inputs'])
        resumed = sum(b['resumed_after_s'] is not None for b in summary['bad_inputs'])
        lines.append(f"bad inputs: {len(summary['bad_inputs'])} sent, {named} named in the "
                     f"node log, flow resumed after {resumed}")
    return '\n'.join(lines)


def write_report(out: Path, summary: dict, samples: list[Sample]) -> None:
    from dense_match_ros.evaluation import report
    from dense_match_ros.ros.tools.pose_report import write_json
    write_json(out / 'soak.json', summary)
    with open(out / 'samples.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(Sample)])
        writer.writeheader()
        for s in samples:
            writer.writerow(dataclasses.asdict(s))
    if len(samples) < 2:
        return
    plt = report.pyplot()
    t = np.array([s.t_s for s in samples]) / 60.0
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(t, [s.rss_mb or np.nan for s in samples], 'o-', ms=3)
    axes[0].set_ylabel('node RSS (MB)')
    axes[1].plot(t, [s.latency_p50_ms for s in samples], label='p50')
    axes[1].plot(t, [s.latency_p95_ms for s in samples], label='p95')
    axes[1].set_ylabel('latency (ms)')
    axes[1].legend(fontsize=8)
    dt = np.diff([s.t_s for s in samples])
    rate = np.diff([s.outputs for s in samples]) / np.maximum(dt, 1e-6)
    axes[2].plot(t[1:], rate, 'o-', ms=3)
    axes[2].set_ylabel('flows / s')
    axes[2].set_xlabel('minutes')
    for inj in summary['bad_inputs']:
        for ax in axes:
            ax.axvline(inj['t_s'] / 60.0, color='0.8', lw=0.8, zorder=0)
    axes[0].set_title(f"{summary['method']} {summary['size'][0]}x{summary['size'][1]} at "
                      f"{summary['rate_hz']:g} Hz (grey lines: bad inputs)")
    report.save_figure(fig, out / 'soak.png', dpi=90)


# ------------------------------------------------------------------------------ CLI


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected WIDTHxHEIGHT, got {text!r}') from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f'size must be at least 16x16, got {text!r}')
    return w, h


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='dense-match-soak',
        description='Play a camera stream to dense-match-node for N minutes; record latency, '
                    'drops, outputs and RSS; replay the bad-input catalogue without a restart.')
    p.add_argument('--minutes', type=float, default=2.0)
    p.add_argument('--rate', type=float, default=30.0, help='frames per second (Hz)')
    p.add_argument('--size', type=_size, default=(640, 480), help='WIDTHxHEIGHT (640x480)')
    p.add_argument('--method', default=DEFAULT_METHOD, help="the node's method parameter")
    p.add_argument('--threads', type=int, default=1, help="the node's threads parameter")
    p.add_argument('--node-param', action='append', default=[], metavar='NAME:=VALUE',
                   help='another node parameter (repeatable)')
    p.add_argument('--bad-every', type=float, default=15.0,
                   help='seconds between bad inputs (0: none)')
    p.add_argument('--sample', type=float, default=10.0, help='seconds between samples')
    p.add_argument('--warmup', type=float, default=60.0,
                   help='seconds before RSS growth and latency count (at most half the run)')
    p.add_argument('--max-rss-growth', type=float, default=2.0,
                   help='percent of RSS growth after the warm-up that fails the soak')
    p.add_argument('--frames', type=int, default=30, help='distinct camera frames (looped)')
    p.add_argument('--startup-timeout', type=float, default=60.0)
    p.add_argument('--domain', type=int, default=0, help='ROS_DOMAIN_ID (0: random)')
    p.add_argument('--large-data', action='store_true',
                   help='run the node and this process with FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA')
    p.add_argument('--out', type=Path, default=Path('out') / 'soak')
    p.add_argument('--verbose', action='store_true', help='print every sample')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rate <= 0 or args.minutes <= 0 or args.sample <= 0 or args.frames < 2:
        _parser().error('--rate, --minutes and --sample must be > 0, --frames at least 2')
    try:
        return run(args)
    except KeyboardInterrupt:
        print('dense-match-soak: interrupted')
        return 130


if __name__ == '__main__':
    raise SystemExit(main())
