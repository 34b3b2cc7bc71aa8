"""The dense matcher node: camera images in, flow, matchability and relative pose out.

Console script ``dense-match-node`` (and ``lib/dense_match_ros/dense_match_node`` for
launch files), runnable with ``--ros-args``. All processing is
:class:`dense_match_ros.ros.pipeline.MatchPipeline`; this module only turns messages into
frames, schedules work and reports. The parameters (names, ranges, what a change does at run
time) are the table in :mod:`dense_match_ros.ros.parameters`, the output messages are built
by :mod:`dense_match_ros.ros.messages`, both shared with the offline replay.

Scheduling: subscription callbacks only store the newest message in a one-slot mailbox and
return, so the executor never waits on the model. One worker thread takes whatever is in
the mailbox; a message that is overwritten before the worker got to it is counted as a
stale drop. Bad input is logged (throttled per cause) and skipped; the stream goes on.

Topics (all relative, so remappable and namespaced):

=====================  ==================================================================
inputs, mono           ``image`` (or ``image/compressed``), ``camera_info``
inputs, pair           ``left/image``, ``left/camera_info``, ``right/image``,
                       ``right/camera_info`` (``.../image/compressed`` with compressed)
``flow``               sensor_msgs/Image 32FC2 on the source grid, pixels
``matchability``       sensor_msgs/Image 32FC1 in [0, 1] on the source grid
``flow_color``         sensor_msgs/Image bgr8, Middlebury colour code (only when subscribed)
``relative_pose``      dense_match_ros/RelativePose (also when invalid, with the reason)
``pose``               geometry_msgs/PoseWithCovarianceStamped, valid estimates only
``match_result``       dense_match_ros/MatchResult (flow + matchability atomically)
``/diagnostics``       diagnostic_msgs/DiagnosticArray
=====================  ==================================================================
"""
from __future__ import annotations

import collections
import dataclasses
import sys
import threading
import time
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from dense_match_ros.core.device import retain_freed_memory, set_threads
from dense_match_ros.core.geometry.camera import CameraIntrinsics
from dense_match_ros.ros import convert, messages
from dense_match_ros.ros.convert import FrameRejected
from dense_match_ros.ros.parameters import (STAMP_SOURCES, SYNCHRONIZERS, parameter_table,
                                            pipeline_config_from_params, runtime_change)
from dense_match_ros.ros.pipeline import Frame, MatchPipeline, PipelineOutput
from dense_match_ros.ros.qos import all_reliable, input_profile
from dense_match_ros.ros.runtime import Mailbox, RateMeter, RecentCount, Throttle, bound_heap_growth
from dense_match_ros.ros.sync import ApproximateTimeSynchronizer

NODE_NAME = 'dense_match_node'


@dataclasses.dataclass
class _CameraState:
    """Latest calibration of one camera, or why there is none."""

    topic: str
    intrinsics: CameraIntrinsics | None = None
    error: str = ''
    received: int = 0


FRAMES_LOST_AFTER_S = 5.0
"""A matched publisher that delivers no frame for this long gets the 'no_frames' warning."""


class DenseMatchNode(Node):
    """ROS wrapper of :class:`MatchPipeline` (see the module docstring for topics)."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        table = parameter_table()
        for param in table:
            self.declare_parameter(param.name, param.default, param.descriptor())
        p = self._param
        self._throttle = Throttle(self.get_logger(), p('warn_throttle_s'))
        self.mode = p('mode')
        self.compressed = p('compressed')
        self.stamp_source = p('stamp_source')
        if self.stamp_source not in STAMP_SOURCES:
            raise ValueError(f'stamp_source must be one of {STAMP_SOURCES}, got {self.stamp_source!r}')
        set_threads(p('threads'))
        retained = retain_freed_memory(p('retain_memory'))
        config = pipeline_config_from_params({param.name: p(param.name) for param in table})
        self.pipeline = MatchPipeline(config, warn=self._throttle.warn)
        self.get_logger().info(
            f'mode={self.mode} method={config.method} options={config.method_options} '
            f'device={self.pipeline.matcher.device} threads={p("threads")} '
            f'retain_memory={retained} '
            f'pose={"on (" + self.pipeline.pose_estimator + ")" if config.estimate_pose else "off"}')

        self._mailbox = Mailbox()
        self._recent_rejected = RecentCount(messages.RECENT_S)
        self._in_rate, self._out_rate = RateMeter(), RateMeter()
        self._latencies: collections.deque = collections.deque(maxlen=200)
        self._stages: collections.deque = collections.deque(maxlen=200)
        self._inlier_ratios: collections.deque = collections.deque(maxlen=50)
        self._last_accept = 0.0
        self._last_input = None
        self._stats_lock = threading.Lock()

        out_qos = QoSProfile(depth=p('output_queue_depth'), reliability=ReliabilityPolicy.RELIABLE,
                             history=HistoryPolicy.KEEP_LAST)
        # No publisher for our own message types when msg/ was not built.
        self._outputs = {
            name: self.create_publisher(msg_type, name, out_qos)
            for name, msg_type in messages.output_types().items() if msg_type is not None}
        self._pub_diag = self.create_publisher(DiagnosticArray, '/diagnostics', 10)

        self.synchronizer = ''
        self._subscribe()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._diag_timer = self.create_timer(p('diagnostics_period'), self._publish_diagnostics)
        self._running = True
        self._worker = threading.Thread(target=self._work, name='dense_match_worker',
                                        daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ parameters
    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _on_set_parameters(self, params) -> SetParametersResult:
        """Validate and apply run-time changes; a refused change keeps the old value."""
        try:
            change = runtime_change({p.name: p.value for p in params}, self.pipeline.config)
            if change.model is not None:
                matcher = self.pipeline.set_matcher(**change.model)
                config = self.pipeline.config
                self.get_logger().info(f'model swapped: method={config.method} '
                                       f'weights={config.weights or "(default)"} '
                                       f'options={config.method_options} '
                                       f'device={matcher.device}')
            if change.pipeline:
                self.pipeline.update(**change.pipeline)
            if 'warn_throttle_s' in change.node:
                self._throttle.period_s = float(change.node['warn_throttle_s'])
        except Exception as exc:  # anything: refuse with the reason, keep the old state
            reason = f'{type(exc).__name__}: {exc}'
            self.get_logger().warning(f'parameter change refused: {reason}')
            return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ inputs
    def _subscribe(self) -> None:
        """The input subscriptions, then once a second the QoS check (:meth:`_recheck_inputs`)."""
        suffix = '/compressed' if self.compressed else ''
        if self.mode == 'mono':
            self._cameras = [_CameraState('camera_info')]
            self._image_topics = ['image' + suffix]
        else:  # pair (MatchPipeline has refused any other mode)
            self._cameras = [_CameraState('left/camera_info'), _CameraState('right/camera_info')]
            self._image_topics = [f'left/image{suffix}', f'right/image{suffix}']
            self._message_filters = self._synchronizer_module()
            self.synchronizer = 'builtin' if self._message_filters is None else 'message_filters'
            self.get_logger().info(f'pair mode: {self.synchronizer} synchronizer, queue '
                                   f'{self._param("sync_queue_size")}, slop {self._param("sync_slop")} s')
        self._input_subs, self._publisher_seen = [], None
        self._subscribe_inputs(None)
        self._recheck_inputs()
        self._qos_timer = self.create_timer(1.0, self._recheck_inputs)

    def _synchronizer_module(self):
        """ROS 2's message_filters when chosen and importable, else None (the built-in one)."""
        choice = self._param('synchronizer')
        if choice not in SYNCHRONIZERS:
            raise ValueError(f'synchronizer must be one of {SYNCHRONIZERS}, got {choice!r}')
        if choice == 'builtin':
            return None
        try:
            import message_filters
            return message_filters
        except ImportError:
            if choice == 'message_filters':
                raise
            return None

    def _subscribe_inputs(self, reliable: bool | None, publishers: int = 0) -> None:
        """(Re)create every input subscription (and the pair synchroniser) with the QoS for
        ``reliable`` publishers."""
        for sub in self._input_subs:
            self.destroy_subscription(sub)
        qos = input_profile(self._param('input_qos'), self._param('input_queue_depth'), reliable)
        image_type = CompressedImage if self.compressed else Image
        self._input_subs = [self.create_subscription(
            CameraInfo, cam.topic, lambda m, i=i: self._on_camera_info(i, m), qos)
            for i, cam in enumerate(self._cameras)]
        topics = self._image_topics
        queue, slop = self._param('sync_queue_size'), self._param('sync_slop')
        if self.mode == 'mono':
            images = [self.create_subscription(image_type, topics[0], self._on_image, qos)]
        elif self._message_filters is not None:
            filters = [self._message_filters.Subscriber(self, image_type, t, qos_profile=qos)
                       for t in topics]
            self._sync = self._message_filters.ApproximateTimeSynchronizer(filters, queue, slop)
            self._sync.registerCallback(self._on_pair)
            images = [f.sub for f in filters]
        else:
            self._sync = ApproximateTimeSynchronizer(2, queue, slop, self._on_pair)
            images = [self.create_subscription(image_type, t, self._sync.input(i), qos)
                      for i, t in enumerate(topics)]
        self._input_subs += images
        self._input_reliable = bool(reliable)
        if self._param('input_qos') == 'auto':
            self.get_logger().info(
                f'input QoS: {"reliable" if reliable else "best effort"} (auto, matching '
                f'{publishers} publisher(s) on {", ".join(s.topic_name for s in images)})')

    def _recheck_inputs(self) -> None:
        """Once a second: with 'auto', follow the publishers of the image topics, as `ros2 bag
        record` does when they come and go (a stereo driver started after the node included);
        always, say when a publisher is matched but no frame arrives."""
        topics = [s.topic_name for s in self._input_subs[-len(self._image_topics):]]
        publishers = [p for t in topics for p in self.get_publishers_info_by_topic(t)]
        now = time.monotonic()
        if not publishers:
            self._publisher_seen = None
            return
        if self._param('input_qos') == 'auto':
            reliable = all_reliable(publishers)
            if reliable != self._input_reliable:
                self._subscribe_inputs(reliable, len(publishers))
                self._publisher_seen = now
        if self._publisher_seen is None:
            self._publisher_seen = now
        last = max(self._publisher_seen, self._last_input or -float('inf'))
        if now - last > FRAMES_LOST_AFTER_S:
            best_effort = not self._input_reliable
            self._throttle.warn(
                'no_frames', f'{len(publishers)} publisher(s) on {", ".join(topics)} but no '
                f'{"frame" if self.mode == "mono" else "pair"} for {now - last:.0f} s. '
                + ('Large best-effort images over Fast DDS travel as fragmented UDP and are '
                   'lost whole on a busy host: publish reliably (input_qos:=auto follows), set '
                   'input_qos:=reliable, use compressed images, or run both processes with '
                   'FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA.' if best_effort else
                   'Check that the publisher is sending and that the QoS settings match.'))

    def _on_camera_info(self, index: int, msg: CameraInfo) -> None:
        cam = self._cameras[index]
        cam.received += 1
        try:
            cam.intrinsics = convert.camera_info_to_intrinsics(msg, self._param('use_rectified'))
            cam.error = ''
        except FrameRejected as exc:
            cam.intrinsics, cam.error = None, str(exc)
            self._throttle.warn(exc.reason, f'{cam.topic}: {exc}; pose is skipped until a '
                                            f'valid camera_info arrives')

    def _accept(self) -> bool:
        """Count an input and apply the rate limit (a frame over the rate is dropped)."""
        now = time.monotonic()
        self._in_rate.tick(now)
        self._last_input = now
        max_rate = self._param('max_rate')
        if max_rate > 0 and now - self._last_accept < 1.0 / max_rate:
            self.pipeline.counters.dropped_rate += 1
            return False
        self._last_accept = now
        return True

    def _on_image(self, msg) -> None:
        if not self._accept():
            return
        job = ('mono', msg, self._cameras[0].intrinsics, time.monotonic())
        if self._mailbox.put(job):
            self.pipeline.counters.dropped_stale += 1

    def _on_pair(self, left, right) -> None:
        if not self._accept():
            return
        job = ('pair', (left, right), (self._cameras[0].intrinsics, self._cameras[1].intrinsics),
               time.monotonic())
        if self._mailbox.put(job):
            self.pipeline.counters.dropped_stale += 1

    # ------------------------------------------------------------------ worker
    def _decode(self, msg, intrinsics, receipt: float, camera: _CameraState) -> Frame:
        try:
            image = convert.decode_image(msg, self.compressed,
                                         max_pixels=self._param('max_image_pixels'),
                                         mono16_max=self._param('mono16_max'))
        except FrameRejected:
            self.pipeline.counters.rejected += 1  # never reaches the pipeline's own count
            raise
        if intrinsics is None and self._param('estimate_pose'):
            why = camera.error or f'no camera_info received on {camera.topic!r}'
            self._throttle.warn('no_camera_info', f'{why}; publishing flow without pose')
        if self.stamp_source == 'receipt':  # node clock at the callback, not at decoding
            stamp_ns = self.get_clock().now().nanoseconds - int((time.monotonic() - receipt) * 1e9)
        else:
            stamp_ns = convert.stamp_to_ns(msg.header.stamp)
        return Frame(image=image, stamp_ns=stamp_ns,
                     frame_id=str(msg.header.frame_id), intrinsics=intrinsics,
                     receipt_time=receipt)

    def _work(self) -> None:
        while self._running:
            job = self._mailbox.take()
            if job is None:
                continue
            kind, msgs, intrinsics, receipt = job
            stages = {'queue': time.monotonic() - receipt}
            built: dict = {}   # this result's flow message, built once for two topics
            outputs = dict(on_flow=lambda out: self._publish_flow(out, built),
                           on_matchability=lambda out: self._publish_matchability(out, built))
            try:
                t0 = time.perf_counter()
                if kind == 'mono':
                    frame = self._decode(msgs, intrinsics, receipt, self._cameras[0])
                    stages['decode'] = time.perf_counter() - t0
                    out = self.pipeline.process(frame, **outputs)
                else:
                    left = self._decode(msgs[0], intrinsics[0], receipt, self._cameras[0])
                    right = self._decode(msgs[1], intrinsics[1], receipt, self._cameras[1])
                    stages['decode'] = time.perf_counter() - t0
                    out = self.pipeline.process_pair(left, right, **outputs)
            except FrameRejected as exc:  # already counted, by _decode or the pipeline
                self._throttle.warn(exc.reason, f'frame dropped: {exc}')
                continue
            except Exception as exc:  # never let one frame kill the worker
                self.pipeline.counters.rejected += 1
                self._throttle.warn('processing_error',
                                    f'frame dropped: {type(exc).__name__}: {exc}')
                continue
            if out is None:
                continue
            try:
                self._publish(out, stages)
            except Exception as exc:
                if not self._running or not rclpy.ok(context=self.context):
                    return
                self._throttle.warn('publish_error', f'{type(exc).__name__}: {exc}')

    # ------------------------------------------------------------------ outputs
    def _on(self, name: str) -> bool:
        return bool(self._param(f'publish_{name}'))

    def _wanted(self, names) -> list[str]:
        """The outputs among ``names`` that are switched on and have a subscriber: a
        640x480 flow message is 2.4 MB to build and serialise, for nobody otherwise."""
        return [n for n in names if n in self._outputs and self._on(n)
                and self._outputs[n].get_subscription_count() > 0]

    def _publish_flow(self, out: PipelineOutput, built: dict) -> None:
        """The flow outputs, as soon as the flow exists (the node's latency is theirs)."""
        def flow_color() -> None:
            if out.flow_color is None and 'flow_color' in self._wanted(('flow_color',)):
                out.flow_color = self.pipeline.flow_color(out.flow)  # only for someone watching
        if self._send('flow', out, messages.FLOW_OUTPUTS, built, flow_color):
            if out.receipt_time is not None:
                with self._stats_lock:
                    self._latencies.append(time.monotonic() - out.receipt_time)
            self._out_rate.tick(time.monotonic())

    def _publish_matchability(self, out: PipelineOutput, built: dict) -> None:
        """The outputs that need the matchability too, before the pose is estimated."""
        self._send('matchability', out, messages.MATCHABILITY_OUTPUTS, built)

    def _send(self, stage: str, out: PipelineOutput, names, built: dict, before=None) -> bool:
        """Build and publish the wanted ones of ``names``, timed as ``<stage>_messages`` and
        ``<stage>_publish``; ``built`` collects the messages for the next stage's reuse.
        False after a failure, which is logged: the later outputs still go out."""
        try:
            t0 = time.perf_counter()
            if before is not None:
                before()
            msgs = messages.output_messages(out, self._wanted(names), built)
            built.update(msgs)
            t1 = time.perf_counter()
            for name, msg in msgs.items():
                self._outputs[name].publish(msg)
            out.timings.update({f'{stage}_messages': t1 - t0,
                                f'{stage}_publish': time.perf_counter() - t1})
            return True
        except Exception as exc:
            if self._running and rclpy.ok(context=self.context):
                self._throttle.warn('publish_error', f'{type(exc).__name__}: {exc}')
            return False

    def _publish(self, out: PipelineOutput, stages: dict[str, float] | None = None) -> None:
        """The pose outputs of a result whose flow outputs went out already."""
        t0 = time.perf_counter()
        built = messages.output_messages(out, self._wanted(messages.POSE_OUTPUTS))
        t1 = time.perf_counter()
        for name, msg in built.items():
            self._outputs[name].publish(msg)
        if stages is not None:
            # Where a frame's time goes, stage by stage (/diagnostics: stage_<name>_ms).
            stages.update({k: v for k, v in out.timings.items() if k != 'total'})
            stages.update(pose_messages=t1 - t0, pose_publish=time.perf_counter() - t1)
            with self._stats_lock:
                self._stages.append(stages)
        if out.pose is not None:
            self._inlier_ratios.append(out.inlier_ratio)

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        c = self.pipeline.counters
        with self._stats_lock:
            lat = np.array(self._latencies, dtype=np.float64)
            stages = list(self._stages)
        ratios = np.array(self._inlier_ratios, dtype=np.float64)
        device = str(getattr(self.pipeline.matcher, 'device', ''))
        values = {
            'mode': self.mode,
            'method': self.pipeline.config.method,
            'device': device,
            'synchronizer': self.synchronizer or '-',
            'input_rate_hz': f'{self._in_rate.rate(now):.2f}',
            'output_rate_hz': f'{self._out_rate.rate(now):.2f}',
            'latency_median_ms': f'{np.median(lat) * 1e3:.1f}' if lat.size else 'nan',
            'latency_p95_ms': f'{np.percentile(lat, 95) * 1e3:.1f}' if lat.size else 'nan',
            'frames_received': str(c.received),
            'outputs': str(c.outputs),
            'dropped_stale': str(c.dropped_stale),
            'dropped_rate': str(c.dropped_rate),
            'rejected': str(c.rejected),
            'resets': str(c.resets),
            'pose_valid': str(c.pose_valid),
            'pose_invalid': str(c.pose_invalid),
            'inlier_ratio_mean': f'{ratios.mean():.3f}' if ratios.size else 'nan',
            **{f'stage_{k}_ms': f'{np.median([st.get(k, np.nan) for st in stages]) * 1e3:.1f}'
               for k in (stages[-1] if stages else {})},
            'pose_estimator': self.pipeline.pose_estimator,
            'pose_estimator_note': self.pipeline.pose_estimator_note or '-',
            'last_warning': self._throttle.recent(messages.RECENT_S) or '-',
        }
        age = None if self._last_input is None else now - self._last_input
        self._pub_diag.publish(messages.diagnostics_msg(
            f'{self.get_fully_qualified_name()}: dense matching', device, values, c, age,
            self.get_clock().now().to_msg(), self._recent_rejected.update(c.rejected, now),
            self._throttle.recent(messages.RECENT_S)))

    # ------------------------------------------------------------------ lifecycle
    def destroy_node(self) -> None:
        self._running = False
        self._mailbox.close()
        if self._worker.is_alive():
            self._worker.join(timeout=5.0)
        super().destroy_node()


def usage() -> str:
    """What ``dense-match-node --help`` prints: how to start it and every parameter."""
    lines = [f'usage: {NODE_NAME.replace("_", "-")} [--ros-args --params-file FILE '
             '-p NAME:=VALUE -r TOPIC:=NEW ...]', '',
             'Dense correspondence node: subscribes to image (+ camera_info), or left/ and right/ '
             'in mode:=pair, and publishes flow, matchability, flow_color, relative_pose, pose, '
             'match_result and /diagnostics. Parameters (default; * = fixed at start-up):', '']
    for p in parameter_table():
        limits = (f' [{p.range[0]}..{p.range[1]}]' if p.range else '') + \
            (f' ({p.constraints})' if p.constraints else '')
        lines.append(f'  {p.name}{"*" if p.read_only else ""} = {p.default!r}{limits}')
        lines.append(f'      {p.description}')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the node until Ctrl-C / shutdown; ``argv`` as on the command line (--ros-args)."""
    args = sys.argv if argv is None else [sys.argv[0], *argv]
    if '-h' in args[1:] or '--help' in args[1:]:
        # Before rclpy.init: its own --ros-args --help parsing ends in a traceback.
        print(usage())
        return 0
    bound_heap_growth()  # before DDS and the model allocate anything
    rclpy.init(args=args)
    node = None
    try:
        try:
            node = DenseMatchNode()
        except Exception as exc:  # bad start-up parameters: say why and exit non-zero
            rclpy.logging.get_logger(NODE_NAME).fatal(f'cannot start: {type(exc).__name__}: '
                                                      f'{exc}')
            return 2
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
