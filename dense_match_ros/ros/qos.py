"""The input QoS: what the node subscribes with, and how ``auto`` follows the publishers.

``ros2 bag record`` and ``ros2 topic echo`` look at the publishers' offered QoS before they
subscribe; a node that always subscribes best effort turns a reliable camera driver's large
frames into fragmented UDP that a busy host loses whole, and one that always subscribes
reliably matches no best-effort driver at all.
"""
from __future__ import annotations

from typing import Iterable

from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

from dense_match_ros.ros.parameters import INPUT_QOS


def input_profile(kind: str, depth: int, reliable: bool | None = None) -> QoSProfile:
    """The subscriptions' profile for ``input_qos`` = ``kind``; with ``auto``, reliable only
    when ``reliable`` says every publisher is (else REP-2003's sensor-data profile)."""
    if kind == 'auto':
        kind = 'reliable' if reliable else 'sensor_data'
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


def all_reliable(publishers: Iterable) -> bool:
    """True when there are publishers (``TopicEndpointInfo``) and every one is reliable: a
    reliable subscription would not match a best-effort publisher."""
    publishers = list(publishers)
    return bool(publishers) and all(p.qos_profile.reliability == ReliabilityPolicy.RELIABLE
                                    for p in publishers)
