"""rosbag2 reading and writing (sqlite3 and mcap) without a ROS install, through ``rosbags``.

Messages are stored as CDR bytes, the same bytes DDS carries, so one bag serves three kinds
of user: ``rosbags`` objects for offline tools (:meth:`BagMessage.decode`), real rclpy
messages for everything that shares code with the node (:meth:`BagMessage.to_ros`; the
replay tool feeds those to the node's own conversion functions, so it runs exactly the node's
path), and raw bytes for the demo's recorder, which writes what it received untouched.

The type store is ROS 2 Kilted's (message definitions and RIHS01 hashes are what
``ros2 bag`` checks), extended with this package's messages parsed from ``msg/*.msg``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore, get_types_from_msg
from rosbags.typesys.store import Typestore

from dense_match_ros import paths
from dense_match_ros.ros.convert import stamp_to_ns

PACKAGE = 'dense_match_ros'
CUSTOM_MESSAGES = ('RelativePose', 'MatchResult')
STORAGES = {'sqlite3': StoragePlugin.SQLITE3, 'mcap': StoragePlugin.MCAP}
DISTROS = {'kilted': Stores.ROS2_KILTED, 'jazzy': Stores.ROS2_JAZZY}
BAG_VERSION = 9

# Well-known types, so callers can name them briefly and the tests can list what we cover.
IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE = 'sensor_msgs/msg/CompressedImage'
CAMERA_INFO = 'sensor_msgs/msg/CameraInfo'
POSE_COV = 'geometry_msgs/msg/PoseWithCovarianceStamped'
DIAGNOSTICS = 'diagnostic_msgs/msg/DiagnosticArray'
RELATIVE_POSE = f'{PACKAGE}/msg/RelativePose'
MATCH_RESULT = f'{PACKAGE}/msg/MatchResult'


def msg_dirs() -> list[Path]:
    """Where this package's .msg files may be: the source tree, then installed prefixes."""
    root = paths.repo_root()
    dirs = [root / 'msg'] if root is not None else []
    prefixes = [sys.prefix] + [p for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p]
    dirs += [Path(p) / 'share' / PACKAGE / 'msg' for p in prefixes]
    return dirs


@functools.lru_cache(maxsize=4)
def typestore(distro: str = 'kilted') -> Typestore:
    """The distro's type store plus dense_match_ros/msg/* (cached: parsing takes ~0.1 s).

    A missing .msg file only leaves our types unregistered: standard topics still work, and
    using a custom type then fails with rosbags' own 'type not found' error.
    """
    if distro not in DISTROS:
        raise ValueError(f'unknown distro {distro!r}; one of {", ".join(DISTROS)}')
    store = get_typestore(DISTROS[distro])
    types: dict = {}
    for name in CUSTOM_MESSAGES:
        for d in msg_dirs():
            f = d / f'{name}.msg'
            if f.is_file():
                types.update(get_types_from_msg(f.read_text(), f'{PACKAGE}/msg/{name}'))
                break
    if types:
        store.register(types)
    return store


def msgtype_of(msg: Any) -> str:
    """'pkg/msg/Name' of an rclpy message class/instance or a rosbags message object."""
    rosbags_type = getattr(msg, '__msgtype__', None)
    if isinstance(rosbags_type, str):
        return rosbags_type
    cls = msg if isinstance(msg, type) else type(msg)
    parts = cls.__module__.split('.')
    # rclpy classes live in modules such as sensor_msgs.msg._image
    if len(parts) >= 2 and parts[1] in ('msg', 'srv', 'action'):
        return f'{parts[0]}/{parts[1]}/{cls.__name__}'
    raise TypeError(f'cannot tell the ROS message type of {cls!r}')


def ros_class(msgtype: str) -> type:
    """The rclpy message class for 'pkg/msg/Name' (imports the generated module)."""
    pkg, kind, name = _split(msgtype)
    return getattr(importlib.import_module(f'{pkg}.{kind}'), name)


def _split(msgtype: str) -> tuple[str, str, str]:
    parts = msgtype.split('/')
    if len(parts) == 2:
        parts = [parts[0], 'msg', parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f'message type must look like pkg/msg/Name, got {msgtype!r}')
    return parts[0], parts[1], parts[2]


def normalize_msgtype(msgtype: str) -> str:
    """'sensor_msgs/Image' -> 'sensor_msgs/msg/Image'."""
    return '/'.join(_split(msgtype))


def serialize(msg: Any, msgtype: str | None = None, distro: str = 'kilted') -> tuple[bytes, str]:
    """(CDR bytes, msgtype) of an rclpy message, a rosbags object, or bytes with a msgtype."""
    if isinstance(msg, (bytes, bytearray, memoryview)):
        if msgtype is None:
            raise ValueError('raw bytes need an explicit msgtype')
        return bytes(msg), normalize_msgtype(msgtype)
    msgtype = normalize_msgtype(msgtype) if msgtype else msgtype_of(msg)
    if isinstance(getattr(msg, '__msgtype__', None), str):
        return bytes(typestore(distro).serialize_cdr(msg, msgtype)), msgtype
    from rclpy.serialization import serialize_message  # only needed for rclpy messages
    return serialize_message(msg), msgtype


@dataclasses.dataclass(frozen=True)
class BagMessage:
    """One stored message: topic, type, the bag's timestamp (ns) and its CDR bytes."""

    topic: str
    msgtype: str
    timestamp: int
    raw: bytes
    distro: str = 'kilted'

    def decode(self) -> Any:
        """As a rosbags object (numpy arrays for data fields; no rclpy needed)."""
        return typestore(self.distro).deserialize_cdr(self.raw, self.msgtype)

    def to_ros(self) -> Any:
        """As the rclpy message the node would receive for these bytes."""
        from rclpy.serialization import deserialize_message
        return deserialize_message(self.raw, ros_class(self.msgtype))


@dataclasses.dataclass(frozen=True)
class TopicSummary:
    msgtype: str
    count: int


class BagReader:
    """Messages of a rosbag2 directory (or a bare .db3/.mcap file) in timestamp order."""

    def __init__(self, path: str | Path, distro: str = 'kilted') -> None:
        self.path = Path(path)
        self.distro = distro
        self._reader = Reader(self.path)
        self._reader.open()

    def close(self) -> None:
        if self._reader.is_open:
            self._reader.close()

    def __enter__(self) -> 'BagReader':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def topics(self) -> dict[str, TopicSummary]:
        return {name: TopicSummary(info.msgtype or '', info.msgcount)
                for name, info in self._reader.topics.items()}

    @property
    def start_time(self) -> int:
        return self._reader.start_time

    @property
    def end_time(self) -> int:
        return self._reader.end_time

    @property
    def message_count(self) -> int:
        return self._reader.message_count

    def topics_of_type(self, *msgtypes: str) -> list[str]:
        """Topics carrying any of the given types, sorted (for auto-detecting inputs)."""
        wanted = {normalize_msgtype(t) for t in msgtypes}
        return sorted(t for t, s in self.topics.items() if s.msgtype in wanted)

    def messages(self, topics: Iterable[str] | None = None, start: int | None = None,
                 stop: int | None = None) -> Iterator[BagMessage]:
        """Messages on ``topics`` (all when None) with start <= timestamp < stop."""
        connections = self._reader.connections
        if topics is not None:
            wanted = set(topics)
            missing = wanted - {c.topic for c in connections}
            if missing:
                raise KeyError(f'{self.path}: no topic {", ".join(sorted(missing))}; '
                               f'topics: {", ".join(sorted(self.topics)) or "none"}')
            connections = [c for c in connections if c.topic in wanted]
            if not connections:
                return
        for conn, stamp, raw in self._reader.messages(connections=connections, start=start, stop=stop):
            yield BagMessage(conn.topic, conn.msgtype, stamp, bytes(raw), self.distro)


class BagWriter:
    """A new rosbag2 (version 9) in sqlite3 or mcap storage.

    Topics are created on first write from the message's type; pass ``msgtype`` with raw
    bytes. ``overwrite`` removes an existing bag directory first (rosbags refuses to write
    into one), which the replay tool and the demo use for their output bags.
    """

    def __init__(self, path: str | Path, storage: str = 'sqlite3', overwrite: bool = False,
                 distro: str = 'kilted') -> None:
        if storage not in STORAGES:
            raise ValueError(f'storage must be one of {", ".join(STORAGES)}, got {storage!r}')
        self.path = Path(path)
        self.storage = storage
        self.distro = distro
        if self.path.exists():
            if not overwrite:
                raise FileExistsError(f'{self.path} exists (use overwrite)')
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = Writer(self.path, version=BAG_VERSION, storage_plugin=STORAGES[storage])
        self._writer.open()
        self._connections: dict[str, Any] = {}
        self._open = True
        self.counts: dict[str, int] = {}

    def add_topic(self, topic: str, msgtype: str) -> None:
        """Declare a topic (also done implicitly on first write)."""
        msgtype = normalize_msgtype(msgtype)
        known = self._connections.get(topic)
        if known is not None:
            if known.msgtype != msgtype:
                raise ValueError(f'topic {topic} already holds {known.msgtype}, not {msgtype}')
            return
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, typestore=typestore(self.distro))
        self.counts[topic] = 0

    def write(self, topic: str, msg: Any, timestamp: int, msgtype: str | None = None) -> None:
        """Store ``msg`` (rclpy message, rosbags object, or CDR bytes + msgtype) at ``timestamp`` ns."""
        raw, msgtype = serialize(msg, msgtype, self.distro)
        self.add_topic(topic, msgtype)
        self._writer.write(self._connections[topic], int(timestamp), raw)
        self.counts[topic] += 1

    def close(self) -> None:
        if self._open:
            self._open = False
            self._writer.close()

    def __enter__(self) -> 'BagWriter':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cdr_header_stamp_ns(raw: bytes) -> int:
    """Stamp of a serialized message whose first field is a std_msgs/Header, without decoding.

    The demo's recorder uses it to match multi-megabyte flow messages to the frame they
    answer while they arrive; a full decode would cost more than the lookup is worth.
    """
    if len(raw) < 12 or raw[0] != 0 or raw[1] not in (0, 1):
        raise ValueError('not a plain CDR message')
    order = '<' if raw[1] == 1 else '>'
    sec, nanosec = struct.unpack_from(f'{order}iI', raw, 4)
    return sec * 1_000_000_000 + nanosec


def header_stamp_ns(msg: Any) -> int | None:
    """Header stamp of a message in ns, None for header-less types."""
    header = getattr(msg, 'header', None)
    return None if header is None else stamp_to_ns(header.stamp)
