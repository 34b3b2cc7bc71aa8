"""The dense matcher node: camera images in, flow, matchability and relative pose out.

Console script ``dense-match-node`` (and ``lib/dense_match_ros/dense_match_node`` for
launch files), runnable with ``--ros-args``. All processing is
:class:`dense_match_ros.ros.pipeline.MatchPipeline`; this module only turns messages into
frames and results into messages, schedules work and reports.

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
import os
import sys
import threading
import time
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import (HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data)
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from dense_match_ros.core.device import resolve_device
from dense_match_ros.core.geometry.camera import CameraIntrinsics
from dense_match_ros.core.registry import available_methods
from dense_match_ros.ros import convert
from dense_match_ros.ros.pipeline import (Frame, FrameRejected, MatchPipeline, PipelineConfig,
                                          PipelineOutput, pose_config_fields)
from dense_match_ros.ros.sync import ApproximateTimeSynchronizer

try:
    import dense_match_ros.msg as dm_msg
except ImportError:  # pragma: no cover - messages not built: standard topics only
    dm_msg = None

NODE_NAME = 'dense_match_node'
INPUT_QOS = ('sensor_data', 'reliable', 'system_default')
SYNCHRONIZERS = ('auto', 'message_filters', 'builtin')
PUBLISH_SWITCHES = ('flow', 'matchability', 'flow_color', 'relative_pose', 'pose',
                    'match_result')
# pose.* parameters that the node itself sets (one threshold for the whole node).
_POSE_SHADOWED = ('matchability_threshold',)


_PIPELINE_PARAMS = ('method', 'weights', 'device', 'method_options', 'mode', 'process_width',
                    'process_height', 'full_resolution_output', 'keyframe_stride',
                    'keyframe_min_matchable', 'matchability_threshold', 'estimate_pose',
                    'min_image_side', 'max_image_pixels', 'max_flow_color')


def pipeline_config_from_params(params: dict[str, Any]) -> PipelineConfig:
    """PipelineConfig from node parameter names and values (flat, ``pose.*`` included).

    The node builds its pipeline with this, and the offline replay calls it with the same
    params file, so both process with identical settings. Node-only names are ignored.
    """
    kwargs = {k: params[k] for k in _PIPELINE_PARAMS if k in params}
    if 'method_options' in kwargs:
        kwargs['method_options'] = parse_method_options(kwargs['method_options'])
    fields = pose_config_fields()
    pose = {}
    for key, value in params.items():
        name = key[5:] if key.startswith('pose.') else None
        if name in fields and name not in _POSE_SHADOWED:
            pose[name] = tuple(value) if isinstance(fields[name], tuple) else value
    kwargs['pose_options'] = pose
    return PipelineConfig(**kwargs)


def parse_method_options(value: str | dict) -> dict[str, Any]:
    """The ``method_options`` parameter: a YAML (or JSON) mapping given as a string, since a
    ROS parameter cannot hold a mapping; '' is no options. Keys go to ``load_matcher``."""
    if isinstance(value, dict):
        options = value
    else:
        import yaml
        try:
            options = yaml.safe_load(value) if str(value).strip() else {}
        except yaml.YAMLError as exc:
            raise ValueError(f'method_options is not YAML: {exc}') from None
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ValueError(f'method_options must be a mapping such as "{{refine: dis}}", '
                         f'got {value!r}')
    return dict(options)


def output_messages(out: PipelineOutput) -> dict[str, Any]:
    """The messages the node publishes for one result, by topic name (relative).

    ``flow_color`` is present only when ``out.flow_color`` was computed, ``relative_pose``
    unless pose estimation is disabled, ``pose`` only for a valid estimate. Flow and
    matchability images carry the TARGET stamp and the SOURCE frame id (their grid).
    """
    stamp, frame_id = out.target_stamp_ns, out.source_frame_id
    msgs: dict[str, Any] = {
        'flow': convert.make_image_msg(out.flow, '32FC2', stamp, frame_id),
        'matchability': convert.make_image_msg(out.matchability, '32FC1', stamp, frame_id)}
    if out.flow_color is not None:
        bgr = np.ascontiguousarray(out.flow_color[..., ::-1])  # RGB -> BGR
        msgs['flow_color'] = convert.make_image_msg(bgr, 'bgr8', stamp, frame_id)
    if dm_msg is not None:
        res = dm_msg.MatchResult()
        res.header.stamp = convert.stamp_msg(out.target_stamp_ns)
        res.header.frame_id = out.target_frame_id
        res.source_stamp = convert.stamp_msg(out.source_stamp_ns)
        res.source_frame_id = out.source_frame_id
        res.flow, res.matchability = msgs['flow'], msgs['matchability']
        res.scale_x, res.scale_y = float(out.scale[0]), float(out.scale[1])
        res.method = out.method
        res.match_time = float(out.timings.get('match', 0.0))
        msgs['match_result'] = res
        if out.pose_status != 'disabled':
            msgs['relative_pose'] = relative_pose_msg(out)
    if out.pose is not None and out.pose.valid:
        msgs['pose'] = pose_msg(out)
    return msgs


def relative_pose_msg(out: PipelineOutput):
    """dense_match_ros/RelativePose for a result (valid=False with the reason if no pose)."""
    msg = dm_msg.RelativePose()
    msg.header.stamp = convert.stamp_msg(out.target_stamp_ns)
    msg.header.frame_id = out.target_frame_id
    msg.source_stamp = convert.stamp_msg(out.source_stamp_ns)
    msg.source_frame_id = out.source_frame_id
    msg.method = out.method
    pose = out.pose
    if pose is None:
        msg.valid = False
        msg.status = out.pose_status
        return msg
    if pose.valid:
        q = Rotation.from_matrix(np.asarray(pose.R, dtype=np.float64)).as_quat()
        msg.rotation.x, msg.rotation.y, msg.rotation.z, msg.rotation.w = map(float, q)
        t = np.asarray(pose.t, dtype=np.float64).reshape(3)
        msg.translation.x, msg.translation.y, msg.translation.z = map(float, t)
    msg.covariance = [float(v) for v in np.asarray(pose.covariance, dtype=np.float64)
                      .reshape(36)]
    msg.essential_matrix = [float(v) for v in np.asarray(pose.E, dtype=np.float64).reshape(9)]
    msg.num_correspondences = int(pose.num_correspondences)
    msg.num_inliers = int(pose.num_inliers)
    msg.valid = bool(pose.valid)
    msg.status = 'ok' if pose.valid else str(pose.status)
    return msg


def pose_msg(out: PipelineOutput) -> PoseWithCovarianceStamped:
    """T_target_source as the pose of the SOURCE camera in the TARGET camera frame.

    position = t (unit norm: the scale is unobservable), orientation = R; covariance over
    (x, y, z, rot_x, rot_y, rot_z) as estimated, or [-1, 0, ...] ("unknown") if not finite.
    """
    pose = out.pose
    msg = PoseWithCovarianceStamped()
    msg.header.stamp = convert.stamp_msg(out.target_stamp_ns)
    msg.header.frame_id = out.target_frame_id
    t = np.asarray(pose.t, dtype=np.float64).reshape(3)
    q = Rotation.from_matrix(np.asarray(pose.R, dtype=np.float64)).as_quat()
    position = msg.pose.pose.position
    position.x, position.y, position.z = map(float, t)
    o = msg.pose.pose.orientation
    o.x, o.y, o.z, o.w = map(float, q)
    cov = np.asarray(pose.covariance, dtype=np.float64).reshape(36)
    if not np.all(np.isfinite(cov)):
        cov = np.zeros(36)
        cov[0] = -1.0
    msg.pose.covariance = [float(v) for v in cov]
    return msg


def _int_range(low: int, high: int) -> list[IntegerRange]:
    return [IntegerRange(from_value=low, to_value=high, step=1)]


def _float_range(low: float, high: float) -> list[FloatingPointRange]:
    return [FloatingPointRange(from_value=float(low), to_value=float(high), step=0.0)]


class _Throttle:
    """One warning per cause per period; the next one says how many were swallowed.

    rclpy's own ``throttle_duration_sec`` keys on the call site, which would let one noisy
    cause (say, a bad encoding at 30 Hz) hide a different one logged from the same line.
    """

    def __init__(self, logger, period_s: float) -> None:
        self._logger = logger
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self.last_message = ''

    def warn(self, reason: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self.period_s:
                self._suppressed[reason] += 1
                return
            self._last[reason] = now
            suppressed = self._suppressed.pop(reason, 0)
            self.last_message = f'{reason}: {message}'
        extra = f' ({suppressed} more since the last report)' if suppressed else ''
        self._logger.warning(f'[{reason}] {message}{extra}')


class _Mailbox:
    """One-slot hand-over from callbacks to the worker: the newest job wins."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._job: Any = None
        self._closed = False

    def put(self, job: Any) -> bool:
        """Store ``job``; True when it replaced one the worker never saw."""
        with self._cond:
            replaced = self._job is not None
            self._job = job
            self._cond.notify()
            return replaced

    def take(self, timeout: float = 0.5) -> Any:
        with self._cond:
            if self._job is None and not self._closed:
                self._cond.wait(timeout)
            job, self._job = self._job, None
            return job

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclasses.dataclass
class _CameraState:
    """Latest calibration of one camera, or why there is none."""

    topic: str
    intrinsics: CameraIntrinsics | None = None
    error: str = ''
    received: int = 0


class _RateMeter:
    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._times: collections.deque = collections.deque()

    def tick(self, now: float) -> None:
        self._times.append(now)

    def rate(self, now: float) -> float:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        span = max(now - self._times[0], 1e-9)
        return (len(self._times) - 1) / span if span > 0 else 0.0


class DenseMatchNode(Node):
    """ROS wrapper of :class:`MatchPipeline` (see the module docstring for topics)."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        self._declare_parameters()
        p = self._param
        self._throttle = _Throttle(self.get_logger(), p('warn_throttle_s'))
        self.mode = p('mode')
        self.compressed = p('compressed')
        names = [*_PIPELINE_PARAMS, *(f'pose.{k}' for k in pose_config_fields())]
        config = pipeline_config_from_params(
            {n: self._param(n) for n in names if self.has_parameter(n)})
        self.pipeline = MatchPipeline(config, warn=self._throttle.warn)
        self.get_logger().info(
            f'mode={self.mode} method={config.method} options={config.method_options} '
            f'device={self.pipeline.matcher.device} '
            f'pose={"on" if config.estimate_pose else "off"}')

        self._mailbox = _Mailbox()
        self._in_rate, self._out_rate = _RateMeter(), _RateMeter()
        self._latencies: collections.deque = collections.deque(maxlen=200)
        self._inlier_ratios: collections.deque = collections.deque(maxlen=50)
        self._last_accept = 0.0
        self._last_input = None
        self._stats_lock = threading.Lock()

        out_qos = QoSProfile(depth=p('output_queue_depth'),
                             reliability=ReliabilityPolicy.RELIABLE,
                             history=HistoryPolicy.KEEP_LAST)
        self._pub_flow = self.create_publisher(Image, 'flow', out_qos)
        self._pub_match = self.create_publisher(Image, 'matchability', out_qos)
        self._pub_color = self.create_publisher(Image, 'flow_color', out_qos)
        self._pub_pose = self.create_publisher(PoseWithCovarianceStamped, 'pose', out_qos)
        self._pub_rel = (self.create_publisher(dm_msg.RelativePose, 'relative_pose', out_qos)
                         if dm_msg else None)
        self._pub_result = (self.create_publisher(dm_msg.MatchResult, 'match_result', out_qos)
                            if dm_msg else None)
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

    def _declare(self, name: str, default: Any, description: str, *, read_only: bool = False,
                 ints: tuple[int, int] | None = None,
                 floats: tuple[float, float] | None = None, constraints: str = '') -> None:
        kwargs: dict[str, Any] = {'name': name, 'description': description,
                                  'read_only': read_only, 'additional_constraints': constraints}
        if ints is not None:
            kwargs['integer_range'] = _int_range(*ints)
        if floats is not None:
            kwargs['floating_point_range'] = _float_range(*floats)
        self.declare_parameter(name, default, ParameterDescriptor(**kwargs))

    def _declare_parameters(self) -> None:
        methods = available_methods()
        d = self._declare
        d('method', 'dis', 'Matching method; changing it swaps the model at run time.',
          constraints=f'one of: {", ".join(methods)}')
        d('weights', '', 'Checkpoint of a learned method (empty: the shipped one).')
        d('device', 'auto', 'Where the model runs.', constraints='auto, cpu, cuda or cuda:N')
        d('method_options', '', 'Options of the method for load_matcher, a YAML mapping in a '
                                'string, e.g. "{refine: dis}" for dgc; changing it rebuilds the '
                                'model. Give them with the method they belong to.',
          constraints='a YAML mapping or empty')
        d('mode', 'mono', 'mono: each frame against the previous/key frame; pair: left vs '
                          'right camera.', read_only=True, constraints='mono or pair')
        d('compressed', False, 'Subscribe to <image>/compressed (sensor_msgs/CompressedImage, '
                               'jpeg/png) instead of raw images.', read_only=True)
        d('use_rectified', False, 'Take intrinsics from CameraInfo.P (rectified streams) '
                                  'instead of K and D.')
        d('process_width', 0, 'Matching width in pixels (0: input width, or keep aspect).',
          ints=(0, 8192))
        d('process_height', 0, 'Matching height in pixels (0: input height, or keep aspect).',
          ints=(0, 8192))
        d('full_resolution_output', False, 'Resample outputs to the input grid.')
        d('keyframe_stride', 1, 'Mono: replace the keyframe every N frames (1 = previous '
                                'frame).', ints=(1, 1000))
        d('keyframe_min_matchable', 0.0, 'Mono: also replace the keyframe when the matchable '
                                         'pixel fraction falls below this.', floats=(0.0, 1.0))
        d('matchability_threshold', 0.5, 'Pixels at or above it count as matched (pose input, '
                                         'statistics).', floats=(0.0, 1.0))
        d('estimate_pose', True, 'Estimate the relative pose (needs camera_info).')
        d('min_image_side', 16, 'Refuse images with a smaller side.', ints=(2, 100000))
        d('max_image_pixels', 4096 * 4096, 'Refuse larger images (0: no limit).',
          ints=(0, 2 ** 40))
        d('mono16_max', 65535.0, 'mono16 value shown as white.', floats=(1.0, 65535.0))
        d('max_rate', 0.0, 'Process at most this many frames (pairs) per second; 0: no limit.',
          floats=(0.0, 1000.0))
        d('input_qos', 'sensor_data', 'QoS of the image and camera_info subscriptions.',
          read_only=True, constraints=', '.join(INPUT_QOS))
        d('input_queue_depth', 5, 'History depth of the input subscriptions.', read_only=True,
          ints=(1, 1000))
        d('output_queue_depth', 5, 'History depth of the (reliable) output publishers.',
          read_only=True, ints=(1, 1000))
        d('synchronizer', 'auto', 'Pair mode: message_filters when importable (auto), or the '
                                  'built-in one with the same semantics.', read_only=True,
          constraints=', '.join(SYNCHRONIZERS))
        d('sync_queue_size', 10, 'Pair mode: messages kept per camera while pairing.',
          read_only=True, ints=(1, 1000))
        d('sync_slop', 0.02, 'Pair mode: largest stamp difference of a pair, seconds.',
          read_only=True, floats=(0.0, 10.0))
        d('max_flow_color', 0.0, 'Flow magnitude (px) drawn fully saturated in flow_color; '
                                 '0: per image.', floats=(0.0, 10000.0))
        d('warn_throttle_s', 5.0, 'At most one warning per cause per this many seconds.',
          floats=(0.0, 3600.0))
        d('diagnostics_period', 1.0, 'Seconds between /diagnostics messages.', read_only=True,
          floats=(0.05, 3600.0))
        for name in PUBLISH_SWITCHES:
            d(f'publish_{name}', True, f'Publish the {name} topic.')
        for name, default in pose_config_fields().items():
            if name in _POSE_SHADOWED:
                continue
            if isinstance(default, tuple):
                default = [int(v) for v in default]
            if isinstance(default, (bool, int, float, str, list)):
                d(f'pose.{name}', default, f'core.geometry.pose.PoseConfig.{name}.')

    def _pose_options(self) -> dict:
        out = {}
        for name, default in pose_config_fields().items():
            if name in _POSE_SHADOWED or not self.has_parameter(f'pose.{name}'):
                continue
            value = self._param(f'pose.{name}')
            out[name] = tuple(value) if isinstance(default, tuple) else value
        return out

    def _on_set_parameters(self, params) -> SetParametersResult:
        """Validate and apply run-time changes; a refused change keeps the old value."""
        changes = {p.name: p.value for p in params}
        try:
            if 'device' in changes:
                resolve_device(changes['device'])
            if {'method', 'weights', 'device', 'method_options'} & set(changes):
                method = changes.get('method', self.pipeline.config.method)
                if method not in available_methods():
                    raise ValueError(f'unknown method {method!r}; available: '
                                     f'{", ".join(available_methods())}')
                weights = changes.get('weights', self.pipeline.config.weights)
                if weights and not os.path.isfile(weights):
                    raise ValueError(f'weights file {weights!r} does not exist')
                options = (parse_method_options(changes['method_options'])
                           if 'method_options' in changes else None)
                matcher = self.pipeline.set_matcher(method=method, weights=weights,
                                                    device=changes.get('device'),
                                                    options=options)
                self.get_logger().info(f'model swapped: method={method} '
                                       f'weights={weights or "(default)"} '
                                       f'options={self.pipeline.config.method_options} '
                                       f'device={matcher.device}')
            update: dict[str, Any] = {}
            for name in ('process_width', 'process_height', 'full_resolution_output',
                         'keyframe_stride', 'keyframe_min_matchable', 'matchability_threshold',
                         'estimate_pose', 'min_image_side', 'max_image_pixels',
                         'max_flow_color'):
                if name in changes:
                    update[name] = changes[name]
            pose_changes = {k[5:]: v for k, v in changes.items() if k.startswith('pose.')}
            if pose_changes:
                fields = pose_config_fields()
                options = dict(self.pipeline.config.pose_options)
                for k, v in pose_changes.items():
                    options[k] = tuple(v) if isinstance(fields.get(k), tuple) else v
                update['pose_options'] = options
            if update:
                self.pipeline.update(**update)
            if 'warn_throttle_s' in changes:
                self._throttle.period_s = float(changes['warn_throttle_s'])
        except Exception as exc:  # anything: refuse with the reason, keep the old state
            reason = f'{type(exc).__name__}: {exc}'
            self.get_logger().warning(f'parameter change refused: {reason}')
            return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ inputs
    def _input_qos(self) -> QoSProfile:
        kind, depth = self._param('input_qos'), self._param('input_queue_depth')
        if kind == 'sensor_data':
            qos = QoSProfile(depth=depth)
            qos.reliability = qos_profile_sensor_data.reliability
            qos.durability = qos_profile_sensor_data.durability
            qos.history = HistoryPolicy.KEEP_LAST
            return qos
        if kind == 'reliable':
            return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE,
                              history=HistoryPolicy.KEEP_LAST)
        if kind == 'system_default':
            return QoSProfile(depth=depth)
        raise ValueError(f'input_qos must be one of {INPUT_QOS}, got {kind!r}')

    def _subscribe(self) -> None:
        qos = self._input_qos()
        image_type = CompressedImage if self.compressed else Image
        suffix = '/compressed' if self.compressed else ''
        if self.mode == 'mono':
            self._cameras = [_CameraState('camera_info')]
            self.create_subscription(image_type, 'image' + suffix, self._on_image, qos)
            self.create_subscription(CameraInfo, 'camera_info',
                                     lambda m: self._on_camera_info(0, m), qos)
            return
        if self.mode != 'pair':
            raise ValueError(f"mode must be 'mono' or 'pair', got {self.mode!r}")
        self._cameras = [_CameraState('left/camera_info'), _CameraState('right/camera_info')]
        for i, side in enumerate(('left', 'right')):
            self.create_subscription(CameraInfo, f'{side}/camera_info',
                                     lambda m, i=i: self._on_camera_info(i, m), qos)
        topics = [f'left/image{suffix}', f'right/image{suffix}']
        queue, slop = self._param('sync_queue_size'), self._param('sync_slop')
        choice = self._param('synchronizer')
        if choice not in SYNCHRONIZERS:
            raise ValueError(f'synchronizer must be one of {SYNCHRONIZERS}, got {choice!r}')
        message_filters = None
        if choice in ('auto', 'message_filters'):
            try:
                import message_filters
            except ImportError:
                if choice == 'message_filters':
                    raise
        if message_filters is not None:
            subs = [message_filters.Subscriber(self, image_type, t, qos_profile=qos)
                    for t in topics]
            self._sync = message_filters.ApproximateTimeSynchronizer(subs, queue, slop)
            self._sync.registerCallback(self._on_pair)
            self._sync_subs = subs
            self.synchronizer = 'message_filters'
        else:
            self._sync = ApproximateTimeSynchronizer(2, queue, slop, self._on_pair)
            for i, t in enumerate(topics):
                self.create_subscription(image_type, t, self._sync.input(i), qos)
            self.synchronizer = 'builtin'
        self.get_logger().info(f'pair mode: {self.synchronizer} synchronizer, '
                               f'queue {queue}, slop {slop} s')

    def _on_camera_info(self, index: int, msg: CameraInfo) -> None:
        cam = self._cameras[index]
        cam.received += 1
        try:
            cam.intrinsics = convert.camera_info_to_intrinsics(msg, self._param('use_rectified'))
            cam.error = ''
        except convert.ConversionError as exc:
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
        limit, mono16_max = self._param('max_image_pixels'), self._param('mono16_max')
        if self.compressed:
            image = convert.compressed_to_rgb(msg, max_pixels=limit, mono16_max=mono16_max)
        else:
            image = convert.image_to_rgb(msg, max_pixels=limit, mono16_max=mono16_max)
        if intrinsics is None and self._param('estimate_pose'):
            why = camera.error or f'no camera_info received on {camera.topic!r}'
            self._throttle.warn('no_camera_info', f'{why}; publishing flow without pose')
        return Frame(image=image, stamp_ns=convert.stamp_to_ns(msg.header.stamp),
                     frame_id=str(msg.header.frame_id), intrinsics=intrinsics,
                     receipt_time=receipt)

    def _work(self) -> None:
        while self._running:
            job = self._mailbox.take()
            if job is None:
                continue
            kind, msgs, intrinsics, receipt = job
            try:
                if kind == 'mono':
                    frame = self._decode(msgs, intrinsics, receipt, self._cameras[0])
                    out = self.pipeline.process(frame)
                else:
                    left = self._decode(msgs[0], intrinsics[0], receipt, self._cameras[0])
                    right = self._decode(msgs[1], intrinsics[1], receipt, self._cameras[1])
                    out = self.pipeline.process_pair(left, right)
            except (convert.ConversionError, FrameRejected) as exc:
                if isinstance(exc, convert.ConversionError):
                    self.pipeline.counters.rejected += 1
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
                self._publish(out)
            except Exception as exc:
                if not self._running or not rclpy.ok(context=self.context):
                    return
                self._throttle.warn('publish_error', f'{type(exc).__name__}: {exc}')

    # ------------------------------------------------------------------ outputs
    def _on(self, name: str) -> bool:
        return bool(self._param(f'publish_{name}'))

    def _publish(self, out: PipelineOutput) -> None:
        if (out.flow_color is None and self._on('flow_color')
                and self._pub_color.get_subscription_count() > 0):
            out.flow_color = self._flow_color(out)  # only for someone watching
        msgs = output_messages(out)
        publishers = {'flow': self._pub_flow, 'matchability': self._pub_match,
                      'flow_color': self._pub_color, 'match_result': self._pub_result,
                      'relative_pose': self._pub_rel, 'pose': self._pub_pose}
        for name, msg in msgs.items():
            if publishers.get(name) is not None and self._on(name):
                publishers[name].publish(msg)
        if out.pose is not None:
            self._inlier_ratios.append(out.inlier_ratio)
        if out.receipt_time is not None:
            with self._stats_lock:
                self._latencies.append(time.monotonic() - out.receipt_time)
        self._out_rate.tick(time.monotonic())

    def _flow_color(self, out: PipelineOutput) -> np.ndarray | None:
        """RGB colour-coded flow, or None without core.flowviz."""
        try:
            from dense_match_ros.core.flowviz import flow_to_color
        except ImportError:
            return None
        max_flow = self.pipeline.config.max_flow_color
        return flow_to_color(out.flow, max_flow if max_flow > 0 else None)

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        c = self.pipeline.counters
        with self._stats_lock:
            lat = np.array(self._latencies, dtype=np.float64)
        ratios = np.array(self._inlier_ratios, dtype=np.float64)
        status = DiagnosticStatus()
        status.name = f'{self.get_fully_qualified_name()}: dense matching'
        status.hardware_id = str(getattr(self.pipeline.matcher, 'device', ''))
        values = {
            'mode': self.mode,
            'method': self.pipeline.config.method,
            'device': status.hardware_id,
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
            'last_warning': self._throttle.last_message,
        }
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        if self._last_input is None or now - self._last_input > 5.0:
            status.level, status.message = DiagnosticStatus.STALE, 'no input'
        elif c.rejected or c.dropped_stale:
            status.level = DiagnosticStatus.WARN
            status.message = f'{c.rejected} rejected, {c.dropped_stale} stale frames dropped'
        else:
            status.level, status.message = DiagnosticStatus.OK, 'ok'
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [status]
        self._pub_diag.publish(msg)

    # ------------------------------------------------------------------ lifecycle
    def destroy_node(self) -> None:
        self._running = False
        self._mailbox.close()
        if self._worker.is_alive():
            self._worker.join(timeout=5.0)
        super().destroy_node()


def main(argv: list[str] | None = None) -> int:
    """Run the node until Ctrl-C / shutdown; ``argv`` as on the command line (--ros-args)."""
    args = sys.argv if argv is None else [sys.argv[0], *argv]
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
