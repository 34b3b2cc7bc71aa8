"""The matcher node's whole processing path, without ROS: frames in, match results out.

The node and the offline replay tool both convert their messages to :class:`Frame` and call
:meth:`MatchPipeline.process` (mono: each frame against the previous one or a keyframe) or
:meth:`MatchPipeline.process_pair` (two synchronised cameras). Keeping every decision that
affects the numbers here -- input validation, resizing, keyframe policy, intrinsics scaling,
pose estimation -- means a replay report measures exactly what the robot would have run.

Nothing here raises on bad input streams except for the frame at hand: a refused frame
raises :class:`~dense_match_ros.ros.convert.FrameRejected` (with a stable ``reason`` code for
throttled logging; the same exception as for an undecodable message) and the pipeline state
stays usable; stream discontinuities (size change, stamps going backwards)
reset the reference frame and are reported through the ``warn`` callback.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable

import cv2
import numpy as np

from dense_match_ros.core.geometry import grid
from dense_match_ros.core.geometry import essential_ransac, pose as _pose
from dense_match_ros.core.flowviz import flow_to_color as _flow_to_color
from dense_match_ros.core.registry import DEFAULT_METHOD, Matcher, load_matcher
from dense_match_ros.core.geometry.camera import CameraIntrinsics
from dense_match_ros.ros.convert import FrameRejected

_log = logging.getLogger(__name__)

MODES = ('mono', 'pair')
# PipelineConfig fields that make up the model: changed with set_matcher(), not update().
MODEL_FIELDS = ('method', 'weights', 'device', 'method_options')
# PipelineOutput.pose_status with pose estimation switched off, and while the pose is still
# being estimated (what the on_flow and on_matchability callbacks see). The other statuses are
# core.geometry.pose.STATUS_* (the strings of RelativePose.STATUS_*).
STATUS_DISABLED = 'disabled'
STATUS_PENDING = 'pending'


@dataclasses.dataclass
class Frame:
    """One decoded camera image with what the pipeline needs to know about it."""

    image: np.ndarray
    """RGB uint8 (H, W, 3)."""
    stamp_ns: int
    frame_id: str = ''
    intrinsics: CameraIntrinsics | None = None
    """Calibration of this image (None: no camera_info received, pose is skipped)."""
    receipt_time: float | None = None
    """time.monotonic() when the message arrived; carried through for latency."""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.image.shape[1]), int(self.image.shape[0])


Callback = Callable[['PipelineOutput'], None]
"""What :meth:`MatchPipeline.process` hands a result to as it grows."""

MIN_PROCESS_SIDE = 16
"""Smallest processing width or height: every method works at this size (DIS needs 12)."""


@dataclasses.dataclass
class PipelineConfig:
    """Everything that decides what the pipeline computes (the node's parameters)."""

    method: str = DEFAULT_METHOD
    weights: str = ''
    device: str = 'auto'
    method_options: dict = dataclasses.field(default_factory=dict)
    mode: str = 'mono'
    process_width: int = 0
    """Matching resolution; 0 and 0 = the input size, one of them 0 = keep the aspect ratio."""
    process_height: int = 0
    full_resolution_output: bool = False
    """Resample flow and matchability back to the input grid before output."""
    keyframe_stride: int = 1
    """Mono: match each frame against a keyframe replaced every N frames (1 = previous)."""
    keyframe_min_matchable: float = 0.0
    """Mono: also replace the keyframe when fewer pixels than this fraction are matchable."""
    matchability_threshold: float = 0.5
    """Pixels at or above this count as matchable (statistics, keyframe replacement); the
    pose selects its input with its own ``pose_options['matchability_threshold']``."""
    estimate_pose: bool = True
    pose_options: dict = dataclasses.field(default_factory=dict)
    """Fields of core.geometry.pose.PoseConfig (unknown keys are refused)."""
    min_image_side: int = 16
    max_image_pixels: int = 4096 * 4096
    """Refuse larger frames (0 = no limit): a mis-set driver must not exhaust memory."""
    color_output: bool = False
    """Also compute a colour-coded flow image (RGB) for visualisation."""
    max_flow_color: float = 0.0
    """Flow magnitude mapped to full saturation in the colour image (0 = per image)."""

    def __post_init__(self) -> None:
        # The ROS range (0..8192) cannot say "0 or at least MIN_PROCESS_SIDE"; a size every
        # method fails on must be refused when set, not discovered frame by frame.
        for name in ('process_width', 'process_height'):
            value = int(getattr(self, name))
            if value != 0 and value < MIN_PROCESS_SIDE:
                raise ValueError(f'{name} must be 0 (input size) or at least '
                                 f'{MIN_PROCESS_SIDE} px, got {value}')


@dataclasses.dataclass
class Counters:
    """Running totals of what happened to frames; the node adds the drop counts."""

    received: int = 0
    processed: int = 0
    outputs: int = 0
    rejected: int = 0
    resets: int = 0
    dropped_stale: int = 0
    dropped_rate: int = 0
    pose_valid: int = 0
    pose_invalid: int = 0


@dataclasses.dataclass
class PipelineOutput:
    """One match result, ready to be turned into messages."""

    source_stamp_ns: int
    source_frame_id: str
    target_stamp_ns: int
    target_frame_id: str
    flow: np.ndarray
    """float32 (h, w, 2) on the source output grid, pointing into the target output grid."""
    matchability: np.ndarray | None
    """float32 (h, w) in [0, 1]; None while it is still being computed (what an ``on_flow``
    callback sees)."""
    scale: tuple[float, float]
    """(sx, sy): input-resolution pixels per output-grid pixel (1, 1 at full resolution)."""
    pose: Any | None
    """core.geometry.pose.PoseEstimate, or None when no estimate was attempted (see pose_status)."""
    pose_status: str
    """'ok' or the reason the pose is missing or invalid (RelativePose.STATUS_* strings)."""
    matchable_fraction: float
    """Of the pixels, those at or above ``matchability_threshold`` (NaN until the
    matchability exists)."""
    timings: dict[str, float]
    counters: dict[str, int]
    method: str
    device: str
    flow_color: np.ndarray | None = None
    """RGB uint8 colour-coded flow when config.color_output is set."""
    receipt_time: float | None = None
    """time.monotonic() at which the target frame's message arrived."""

    @property
    def inlier_ratio(self) -> float:
        if self.pose is None or not getattr(self.pose, 'num_correspondences', 0):
            return 0.0
        return float(self.pose.num_inliers) / float(self.pose.num_correspondences)


def process_size(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """The matching resolution for an input of ``size`` (w, h) under the size settings."""
    w, h = size
    if width <= 0 and height <= 0:
        return w, h
    if width > 0 and height > 0:
        return width, height
    if width > 0:
        return width, max(2, round(h * width / w))
    return max(2, round(w * height / h)), height


class MatchPipeline:
    """Matcher + keyframe state + pose estimation for one stream (mono) or camera pair.

    Thread safety: :meth:`process`, :meth:`process_pair` and :meth:`set_matcher` take one
    lock, so a parameter change from the ROS executor can swap the model while the worker
    thread is between frames.
    """

    def __init__(self, config: PipelineConfig | None = None, matcher: Matcher | None = None,
                 warn: Callable[[str, str], None] | None = None) -> None:
        self.config = config or PipelineConfig()
        if self.config.mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {self.config.mode!r}')
        self._warn_cb = warn
        self.pose_estimator_note = ''
        self._lock = threading.RLock()
        self.counters = Counters()
        self._pose_config = self._make_pose_config(self.config.pose_options)
        self.matcher = matcher if matcher is not None else self._build_matcher(
            self.config.method, self.config.weights, self.config.device,
            self.config.method_options)
        self._key: Frame | None = None          # mono reference frame (resized)
        self._key_original_size: tuple[int, int] | None = None
        self._frames_since_key = 0
        self._last_stamp_ns: int | None = None

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _build_matcher(method: str, weights: str, device: str, options: dict) -> Matcher:
        # The node's start-up and run-time swaps both come here: load_matcher's ValueError
        # (unknown method, option or weights) becomes the node's refusal reason.
        return load_matcher(method, device=device, weights=weights or None, **(options or {}))

    def set_matcher(self, method: str | None = None, weights: str | None = None,
                    device: str | None = None, options: dict | None = None) -> Matcher:
        """Build and swap in a new model; on any error the old one stays and it re-raises.

        The reference frame is kept: the next frame is matched against it by the new model.
        """
        method = self.config.method if method is None else method
        weights = self.config.weights if weights is None else weights
        device = self.config.device if device is None else device
        options = self.config.method_options if options is None else options
        matcher = self._build_matcher(method, weights, device, options)
        with self._lock:
            self.matcher = matcher
            self.config.method, self.config.weights = method, weights
            self.config.device, self.config.method_options = device, dict(options)
        return matcher

    def _make_pose_config(self, options: dict):
        config = _pose.config_from_dict(dict(options))
        missing = essential_ransac.missing_package(config.estimator)
        self.pose_estimator_note = ''
        if missing:
            # A robot install without the pip-only package must still publish poses: say so
            # once and use the estimator OpenCV always provides.
            self.pose_estimator_note = (f'{config.estimator} unavailable (python package '
                                        f'{missing!r} not installed); using '
                                        f'{essential_ransac.FALLBACK}')
            self._warn('pose_estimator_fallback', self.pose_estimator_note)
            config = dataclasses.replace(config, estimator=essential_ransac.FALLBACK)
        return config

    @property
    def pose_estimator(self) -> str:
        """The estimator actually in use (after any fallback)."""
        return self._pose_config.estimator

    def update(self, **changes: Any) -> None:
        """Apply new values of PipelineConfig fields other than the model's, atomically.

        Invalid values raise ValueError and change nothing. A new processing size resets the
        reference frame (it would be matched at another resolution with other intrinsics).
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(PipelineConfig)}
        model = set(MODEL_FIELDS) & set(changes)
        if unknown or model or 'mode' in changes:
            raise ValueError(f'cannot update {sorted(unknown | model | ({"mode"} & set(changes)))}'
                             f' with update(); use set_matcher() for the model')
        with self._lock:
            candidate = dataclasses.replace(self.config, **changes)
            pose_config = self._make_pose_config(candidate.pose_options)
            resize = ((candidate.process_width, candidate.process_height)
                      != (self.config.process_width, self.config.process_height))
            self.config = candidate
            self._pose_config = pose_config
            if resize:
                self.reset('processing size changed')

    def set_pose_options(self, options: dict) -> None:
        """Validate and apply new PoseConfig fields (ValueError keeps the old ones)."""
        self.update(pose_options=dict(options))

    def reset(self, reason: str = '') -> None:
        """Forget the reference frame (mono): the next frame starts a new sequence."""
        with self._lock:
            if self._key is not None:
                self.counters.resets += 1
            self._key = None
            self._key_original_size = None
            self._frames_since_key = 0
            self._last_stamp_ns = None
            if reason:
                _log.debug('pipeline reset: %s', reason)

    def _warn(self, reason: str, message: str) -> None:
        if self._warn_cb is not None:
            self._warn_cb(reason, message)
        else:
            _log.warning('%s', message)

    def flow_color(self, flow: np.ndarray) -> np.ndarray:
        """RGB uint8 colour code of ``flow``, saturated at ``max_flow_color`` (0: per image)."""
        max_flow = self.config.max_flow_color
        return _flow_to_color(flow, max_flow if max_flow > 0 else None)

    # ------------------------------------------------------------------ validation
    def check_frame(self, frame: Frame) -> None:
        """Raise FrameRejected when the frame cannot be matched at all."""
        image = frame.image
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
                or image.shape[2] != 3:
            raise FrameRejected('bad_image', f'frame image must be RGB uint8 HxWx3, got '
                                             f'{getattr(image, "dtype", type(image))} '
                                             f'{getattr(image, "shape", "")}')
        w, h = frame.size
        low = max(2, int(self.config.min_image_side))
        if w < low or h < low:
            raise FrameRejected('image_too_small', f'image {w}x{h} is smaller than '
                                                   f'min_image_side={low}')
        limit = int(self.config.max_image_pixels)
        if limit > 0 and w * h > limit:
            raise FrameRejected('image_too_large', f'image {w}x{h} ({w * h} pixels) exceeds '
                                                   f'max_image_pixels={limit}')

    def _receive(self, *frames: Frame) -> None:
        """Count one input (a frame or a pair) and check it; a refusal counts as rejected."""
        self.counters.received += 1
        try:
            for frame in frames:
                self.check_frame(frame)
        except FrameRejected:
            self.counters.rejected += 1
            raise

    # ------------------------------------------------------------------ processing
    def _prepare(self, frame: Frame) -> Frame:
        """Resize to the processing resolution and bring the intrinsics along."""
        size = frame.size
        target = process_size(size, self.config.process_width, self.config.process_height)
        image = frame.image
        if target != size:
            shrink = target[0] * target[1] < size[0] * size[1]
            image = cv2.resize(image, target,
                               interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        intrinsics = frame.intrinsics
        if intrinsics is not None:
            calib = intrinsics.size or size
            if calib != size and calib[0] * size[1] != calib[1] * size[0]:
                self._warn('camera_info_size', f'camera_info is for {calib[0]}x{calib[1]} but '
                                               f'the image is {size[0]}x{size[1]} (aspect '
                                               f'differs); scaling anyway')
            intrinsics = intrinsics.scaled(calib, target)
        return dataclasses.replace(frame, image=image, intrinsics=intrinsics)

    def process(self, frame: Frame, on_flow: Callback | None = None,
                on_matchability: Callback | None = None) -> PipelineOutput | None:
        """Mono mode: match the reference frame against ``frame``.

        Returns None for the first frame of a sequence (nothing to match against yet).
        The result is handed out as it grows, so each output can leave as soon as it exists
        (the node's latency is the flow's): ``on_flow`` once the flow does (matchability
        still None, where the method computes it after the flow: ``dis``'s backward flow),
        ``on_matchability`` once that does too, both before the pose is estimated (its pose
        is None, its status :data:`STATUS_PENDING`); the same object is completed and returned.
        Raises FrameRejected for an unusable frame; the reference frame is kept then.
        """
        with self._lock:
            self._receive(frame)
            if self._last_stamp_ns is not None:
                if frame.stamp_ns < self._last_stamp_ns:
                    self._warn('stamp_backwards',
                               f'stamp went backwards by '
                               f'{(self._last_stamp_ns - frame.stamp_ns) / 1e9:.3f} s '
                               f'(bag loop?); resetting the reference frame')
                    self.reset('stamp went backwards')
                elif frame.stamp_ns == self._last_stamp_ns:
                    self.counters.rejected += 1
                    hint = (' (header.stamp is 0: the camera driver leaves it unset; '
                            'stamp_source:=receipt stamps frames on arrival)'
                            if frame.stamp_ns == 0 else '')
                    raise FrameRejected('duplicate_stamp',
                                        f'frame with the same stamp as the previous one '
                                        f'({frame.stamp_ns} ns) ignored{hint}')
            if self._key is not None and frame.size != self._key_original_size:
                old = self._key_original_size
                self._warn('size_changed', f'image size changed from {old[0]}x{old[1]} to '
                                           f'{frame.size[0]}x{frame.size[1]}; resetting '
                                           f'the reference frame')
                self.reset('size changed')
            self._last_stamp_ns = frame.stamp_ns
            t0 = time.perf_counter()
            current = self._prepare(frame)
            t_prep = time.perf_counter() - t0
            if self._key is None:
                self._set_key(current, frame.size)
                return None
            out = self._match(self._key, current, self._key_original_size, frame.size, t_prep,
                              on_flow, on_matchability)
            self._frames_since_key += 1
            stride = max(1, int(self.config.keyframe_stride))
            if (self._frames_since_key >= stride
                    or out.matchable_fraction < self.config.keyframe_min_matchable):
                self._set_key(current, frame.size)
            return out

    def _set_key(self, prepared: Frame, original_size: tuple[int, int]) -> None:
        self._key = prepared
        self._key_original_size = original_size
        self._frames_since_key = 0

    def process_pair(self, source: Frame, target: Frame, on_flow: Callback | None = None,
                     on_matchability: Callback | None = None) -> PipelineOutput:
        """Pair mode: match ``source`` (left camera) against ``target`` (right camera);
        ``on_flow`` and ``on_matchability`` as for :meth:`process`."""
        with self._lock:
            self._receive(source, target)
            t0 = time.perf_counter()
            src, tgt = self._prepare(source), self._prepare(target)
            return self._match(src, tgt, source.size, target.size, time.perf_counter() - t0,
                               on_flow, on_matchability)

    def _match(self, source: Frame, target: Frame, source_input_size: tuple[int, int],
               target_input_size: tuple[int, int], t_prep: float,
               on_flow: Callback | None = None, on_matchability: Callback | None = None
               ) -> PipelineOutput:
        timings = {'prepare': t_prep}
        t0 = time.perf_counter()
        staged = self.matcher.match_staged(source.image, target.image)
        timings['match'] = time.perf_counter() - t0
        flow = staged.flow
        self.counters.processed += 1

        t0 = time.perf_counter()
        out_size = source_input_size if self.config.full_resolution_output else source.size
        scale = (source_input_size[0] / out_size[0], source_input_size[1] / out_size[1])

        def to_output_grid(matchability: np.ndarray | None):
            if not self.config.full_resolution_output:
                return flow, matchability
            # The target goes back to its own input size too (in pair mode it may have been
            # scaled differently from the source).
            return grid.to_source_grid(flow, matchability, out_size, target.size,
                                       target_input_size)

        out_flow, _ = to_output_grid(None)
        color = self.flow_color(out_flow) if self.config.color_output else None
        timings['output'] = time.perf_counter() - t0
        out = PipelineOutput(
            source_stamp_ns=source.stamp_ns, source_frame_id=source.frame_id,
            target_stamp_ns=target.stamp_ns, target_frame_id=target.frame_id,
            flow=out_flow, matchability=None, scale=scale, pose=None,
            pose_status=STATUS_PENDING, matchable_fraction=float('nan'), timings=timings,
            counters={}, method=self.matcher.name or self.config.method,
            device=str(getattr(self.matcher, 'device', '')), flow_color=color,
            receipt_time=target.receipt_time)
        if on_flow is not None:
            on_flow(out)  # flow consumers wait neither for the matchability nor the pose

        t0 = time.perf_counter()
        matchability = staged.matchability()
        timings['matchability'] = time.perf_counter() - t0
        out.matchable_fraction = float(np.mean(matchability >= self.config.matchability_threshold))
        out.matchability = to_output_grid(matchability)[1]
        if on_matchability is not None:
            on_matchability(out)

        t0 = time.perf_counter()
        out.pose, out.pose_status = self._estimate_pose(flow, matchability, source, target)
        timings['pose'] = time.perf_counter() - t0
        if out.pose is not None:
            if out.pose.valid:
                self.counters.pose_valid += 1
            else:
                self.counters.pose_invalid += 1
        timings['total'] = sum(timings.values())
        self.counters.outputs += 1
        out.counters = dataclasses.asdict(self.counters)
        return out

    def _estimate_pose(self, flow: np.ndarray, matchability: np.ndarray, source: Frame,
                       target: Frame) -> tuple[Any | None, str]:
        """(estimate or None, status) on the processing grid; never raises."""
        if not self.config.estimate_pose:
            return None, STATUS_DISABLED
        if source.intrinsics is None or target.intrinsics is None:
            return None, _pose.STATUS_NO_CAMERA_INFO
        src_k, tgt_k = source.intrinsics, target.intrinsics
        try:
            pose = _pose.estimate_relative_pose(
                flow, matchability, src_k.K, tgt_k.K,
                dist_source=src_k.D if src_k.has_distortion else None,
                dist_target=tgt_k.D if tgt_k.has_distortion else None,
                config=self._pose_config)
        except Exception as exc:  # a pose failure must not lose the flow output
            self._warn('pose_error', f'pose estimation raised {type(exc).__name__}: {exc}')
            return None, f'{_pose.STATUS_ESTIMATION_FAILED}: {type(exc).__name__}: {exc}'
        return pose, (_pose.STATUS_OK if pose.valid
                      else pose.status or _pose.STATUS_ESTIMATION_FAILED)
