"""The node's output messages, built from a :class:`~dense_match_ros.ros.pipeline.PipelineOutput`.

The node publishes these and the offline replay writes the very same objects into its bag,
so a replayed run can be compared message by message with a live one. Conventions (see
msg/*.msg): flow and matchability lie on the SOURCE grid, so their images carry the source
frame id but the TARGET stamp (the moment the result became possible); poses are
T_target_source in the target camera frame.
"""
from __future__ import annotations

from typing import Any, Collection

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseWithCovarianceStamped
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import Image

from dense_match_ros.core.geometry.pose import STATUS_OK
from dense_match_ros.ros import convert
from dense_match_ros.ros.parameters import OUTPUTS
from dense_match_ros.ros.pipeline import STATUS_DISABLED, Counters, PipelineOutput

try:
    import dense_match_ros.msg as dm_msg
except ImportError:  # pragma: no cover - messages not built: standard topics only
    dm_msg = None

# Seconds without an input message after which /diagnostics says STALE.
STALE_AFTER_S = 5.0
# Rejected frames and warnings count towards WARN for this long; then the level recovers.
RECENT_S = 30.0


def output_types() -> dict[str, type | None]:
    """Message class of each output topic (None for ours when msg/ was not built)."""
    types = {'flow': Image, 'matchability': Image, 'flow_color': Image,
             'relative_pose': dm_msg.RelativePose if dm_msg else None,
             'pose': PoseWithCovarianceStamped,
             'match_result': dm_msg.MatchResult if dm_msg else None}
    return {name: types[name] for name in OUTPUTS}


FLOW_OUTPUTS = ('flow', 'flow_color')
"""The outputs that exist as soon as the flow does (the node publishes them first)."""
MATCHABILITY_OUTPUTS = ('matchability', 'match_result')
"""The outputs that also need the matchability (published next, before the pose)."""
POSE_OUTPUTS = ('relative_pose', 'pose')


def output_messages(out: PipelineOutput, which: Collection[str] = OUTPUTS,
                    built: dict[str, Any] | None = None) -> dict[str, Any]:
    """The messages for one result, by topic name (relative), for the topics in ``which``.

    ``flow_color`` is present only when ``out.flow_color`` was computed, ``relative_pose``
    unless pose estimation is disabled, ``pose`` only for a valid estimate. ``built``:
    messages of this result built before (the flow published first), reused, not rebuilt.
    """
    stamp, frame_id = out.target_stamp_ns, out.source_frame_id
    msgs: dict[str, Any] = dict(built or {})
    if {'flow', 'match_result'} & set(which) and 'flow' not in msgs:
        msgs['flow'] = convert.make_image_msg(out.flow, '32FC2', stamp, frame_id)
    if {'matchability', 'match_result'} & set(which):
        msgs['matchability'] = convert.make_image_msg(out.matchability, '32FC1', stamp, frame_id)
    if out.flow_color is not None and 'flow_color' in which:
        bgr = np.ascontiguousarray(out.flow_color[..., ::-1])  # RGB -> BGR
        msgs['flow_color'] = convert.make_image_msg(bgr, 'bgr8', stamp, frame_id)
    if dm_msg is not None:
        if 'match_result' in which:
            msgs['match_result'] = match_result_msg(out, msgs['flow'], msgs['matchability'])
        if out.pose_status != STATUS_DISABLED and 'relative_pose' in which:
            msgs['relative_pose'] = relative_pose_msg(out)
    if out.pose is not None and out.pose.valid and 'pose' in which:
        msgs['pose'] = pose_msg(out)
    return {name: msg for name, msg in msgs.items() if name in which}


def _pair_header(msg, out: PipelineOutput):
    """Fill the target header and the source stamp/frame of a MatchResult or RelativePose."""
    msg.header.stamp = convert.stamp_msg(out.target_stamp_ns)
    msg.header.frame_id = out.target_frame_id
    msg.source_stamp = convert.stamp_msg(out.source_stamp_ns)
    msg.source_frame_id = out.source_frame_id
    return msg


def match_result_msg(out: PipelineOutput, flow: Image, matchability: Image):
    """dense_match_ros/MatchResult: both images of one result in one message."""
    res = _pair_header(dm_msg.MatchResult(), out)
    res.flow, res.matchability = flow, matchability
    res.scale_x, res.scale_y = float(out.scale[0]), float(out.scale[1])
    res.method = out.method
    res.match_time = float(out.timings.get('match', 0.0) + out.timings.get('matchability', 0.0))
    return res


def relative_pose_msg(out: PipelineOutput):
    """dense_match_ros/RelativePose for a result (valid=False with the reason if no pose)."""
    msg = _pair_header(dm_msg.RelativePose(), out)
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
    msg.status = STATUS_OK if pose.valid else str(pose.status)
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


def diagnostics_msg(name: str, hardware_id: str, values: dict[str, str], counters: Counters,
                    input_age_s: float | None, stamp, recent_rejected: int = 0,
                    recent_warning: str = '') -> DiagnosticArray:
    """One DiagnosticStatus in a DiagnosticArray stamped ``stamp`` (the node's clock).

    The level is what an operator's monitor should show now: STALE when no input arrived
    for :data:`STALE_AFTER_S` (``input_age_s`` None: never); WARN while frames were rejected
    or a warning was logged in the last :data:`RECENT_S` (``recent_*``, counted by the node);
    OK otherwise. Stale drops are the newest-frame policy at work, not a fault: they are
    counted in the message but never raise the level, and a past problem does not hold WARN
    forever.
    """
    status = DiagnosticStatus()
    status.name = name
    status.hardware_id = hardware_id
    status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
    c = counters
    if input_age_s is None or input_age_s > STALE_AFTER_S:
        status.level, status.message = DiagnosticStatus.STALE, 'no input'
    elif recent_rejected or recent_warning:
        status.level = DiagnosticStatus.WARN
        status.message = (f'{recent_rejected} frames rejected in the last {RECENT_S:.0f} s'
                          if recent_rejected else recent_warning)
    else:
        status.level = DiagnosticStatus.OK
        status.message = (f'ok ({c.dropped_stale} frames skipped for newer ones)'
                          if c.dropped_stale else 'ok')
    msg = DiagnosticArray()
    msg.header.stamp = stamp
    msg.status = [status]
    return msg
