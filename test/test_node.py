"""The matcher node over real DDS: outputs, encodings, stamps, pair mode, parameters, latency.

The node runs as a subprocess (``python -m dense_match_ros.ros.node``) so that its log can be
read from stderr; the test side is an rclpy node in its own Context. Frames are paced -- the
next one is sent once the previous output arrived -- and inputs are reliable, so no frame is
dropped by design and every count is exact. The harness here is also used by
test_node_robustness.py.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# An isolated ROS graph for this test session; set before any rclpy.init in this process.
os.environ.setdefault('ROS_DOMAIN_ID', str(random.Random(os.getpid()).randint(1, 100)))
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ.setdefault('ROS_LOG_DIR', tempfile.mkdtemp(prefix='dense_match_roslog_'))

rclpy = pytest.importorskip('rclpy')
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402
from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402

dm_msg = pytest.importorskip('dense_match_ros.msg')
from dense_match_ros.ros import convert  # noqa: E402
from dense_match_ros.core.registry import DEFAULT_METHOD  # noqa: E402

F, CX, CY = 500.0, 319.5, 239.5
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE,
                      history=HistoryPolicy.KEEP_LAST)


# ---------------------------------------------------------------------------- scene
def _texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Multi-scale random texture: DIS needs structure at every pyramid level."""
    import cv2
    rng = np.random.default_rng(seed)
    acc = np.zeros((height, width), np.float32)
    for cell, weight in ((64, 1.0), (16, 0.7), (4, 0.5)):
        small = rng.random((height // cell + 2, width // cell + 2)).astype(np.float32)
        acc += weight * cv2.resize(small, (width + 2 * cell, height + 2 * cell),
                                   interpolation=cv2.INTER_CUBIC)[cell:cell + height,
                                                                  cell:cell + width]
    acc = (acc - acc.min()) / (acc.max() - acc.min())
    rgb = np.stack([acc, np.roll(acc, 7, axis=1), np.roll(acc, 5, axis=0)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def render(width: int, height: int, camera_x: float, seed: int = 0) -> np.ndarray:
    """The view of a textured surface at depths 1.2-2.8 m from a camera moved by camera_x m.

    A camera at (x, 0, 0) sees the point seen at pixel u by camera 0 at u - f x / Z: depth
    varies over the image, so the motion has parallax and an essential matrix is defined.
    Flow from camera x0 to x1 is about -f (x1 - x0) / Z, pose t ~ (-1, 0, 0).
    """
    import cv2
    margin = 80
    tex = _texture(width + 2 * margin, height + 2 * margin, seed)
    s = width / 640.0
    f = F * s
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    depth = 2.0 + 0.8 * np.sin(xs / width * 3.0 + 0.5) * np.cos(ys / height * 2.0)
    map_x = xs + margin + f * camera_x / depth
    map_y = ys + margin
    return cv2.remap(tex, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR)


def camera_info(width: int, height: int, stamp_ns: int, frame_id: str, zero: bool = False):
    msg = CameraInfo()
    msg.header.stamp = convert.stamp_msg(stamp_ns)
    msg.header.frame_id = frame_id
    msg.width, msg.height = width, height
    s = width / 640.0
    msg.k = [0.0] * 9 if zero else [F * s, 0.0, (CX + 0.5) * s - 0.5, 0.0, F * s,
                                    (CY + 0.5) * s - 0.5, 0.0, 0.0, 1.0]
    msg.d = [0.0] * 5
    msg.distortion_model = 'plumb_bob'
    msg.p = [msg.k[0], 0.0, msg.k[2], 0.0, 0.0, msg.k[4], msg.k[5], 0.0, 0.0, 0.0, 1.0, 0.0]
    return msg


def image_msg(rgb: np.ndarray, stamp_ns: int, frame_id: str, encoding: str = 'rgb8'):
    import cv2
    pixels = {'rgb8': rgb, 'bgr8': rgb[..., ::-1],
              'mono8': cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)}[encoding]
    return convert.make_image_msg(pixels, encoding, stamp_ns, frame_id)


def compressed_msg(rgb: np.ndarray, stamp_ns: int, frame_id: str, fmt: str = 'jpeg'):
    import cv2
    ok, buf = cv2.imencode('.jpg' if fmt == 'jpeg' else '.png', rgb[..., ::-1].copy())
    assert ok
    msg = CompressedImage(format=f'bgr8; {fmt} compressed bgr8')
    msg.header.stamp = convert.stamp_msg(stamp_ns)
    msg.header.frame_id = frame_id
    msg.data = buf.tobytes()
    return msg


# ---------------------------------------------------------------------------- node process
class NodeProcess:
    """The node under test as a subprocess, its log collected line by line."""

    def __init__(self, namespace: str, params: dict | None = None,
                 extra_args: list[str] | None = None, pythonpath: str = '') -> None:
        args = [sys.executable, '-m', 'dense_match_ros.ros.node', '--ros-args',
                '-r', f'__ns:={namespace}', '-p', 'input_qos:=reliable',
                '-p', 'output_queue_depth:=50', '-p', 'input_queue_depth:=20']
        for key, value in (params or {}).items():
            args += ['-p', f'{key}:={value}']
        args += extra_args or []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, str(REPO_ROOT)) if p),
                   PYTHONUNBUFFERED='1',
                   RCUTILS_LOGGING_BUFFERED_STREAM='0', RCUTILS_COLORIZED_OUTPUT='0')
        self.proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip('\n'))

    @property
    def log(self) -> str:
        return '\n'.join(self.lines)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def wait_for_log(self, text: str, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.count(text):
                return True
            if self.proc.poll() is not None:
                return bool(self.count(text))
            time.sleep(0.05)
        return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=2)
        return self.proc.returncode


# ---------------------------------------------------------------------------- test client
OUTPUTS = {'flow': Image, 'matchability': Image, 'pose': PoseWithCovarianceStamped,
           'relative_pose': dm_msg.RelativePose, 'match_result': dm_msg.MatchResult}


class Client:
    """Publishes camera input into ``namespace`` and records every output of the node."""

    def __init__(self, namespace: str, cameras: tuple[str, ...] = ('',),
                 compressed: bool = False,
                 input_topics: dict[str, tuple[str, str]] | None = None,
                 input_qos=RELIABLE) -> None:
        """``input_topics`` {camera: (image, camera_info)} replaces the default topics in
        ``namespace``. Every entity is created before the executor thread starts: one
        destroyed while that thread waits on it kills the thread."""
        self.context = rclpy.Context()
        rclpy.init(args=[], context=self.context)
        self.node = rclpy.create_node(f'test_client_{namespace.strip("/")}',
                                      context=self.context)
        self.ns = namespace
        self.image_pubs, self.info_pubs = {}, {}
        for cam in (tuple(input_topics) if input_topics else cameras):
            prefix = f'{namespace}/{cam + "/" if cam else ""}'
            image_topic, info_topic = (input_topics or {}).get(
                cam, (prefix + ('image/compressed' if compressed else 'image'),
                      prefix + 'camera_info'))
            self.image_pubs[cam] = self.node.create_publisher(
                CompressedImage if compressed else Image, image_topic, input_qos)
            self.info_pubs[cam] = self.node.create_publisher(CameraInfo, info_topic, input_qos)
        self._cond = threading.Condition()
        self.received: dict[str, list] = {name: [] for name in OUTPUTS}
        self.receipt: dict[str, list[float]] = {name: [] for name in OUTPUTS}
        self._subs = [self.node.create_subscription(
            cls, f'{namespace}/{name}', lambda m, n=name: self._store(n, m), RELIABLE)
            for name, cls in OUTPUTS.items()]
        from diagnostic_msgs.msg import DiagnosticArray
        self.diagnostics: list = []   # every /diagnostics message (appends are atomic)
        self._floor_ns = -1           # outputs stamped at or below this are not recorded
        self._diagnostics_sub = self.node.create_subscription(
            DiagnosticArray, '/diagnostics', self.diagnostics.append, 10)
        self._param_clients: dict = {}
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spin = threading.Thread(target=self.executor.spin, daemon=True)
        self._spin.start()

    def parameter_call(self, node_name: str, request, timeout: float = 30.0):
        """``request(AsyncParameterClient) -> future``, answered within ``timeout``.

        One parameter client per remote node lives as long as this client: one that is
        garbage-collected while the executor thread waits on it kills that thread. The
        request is re-sent every 5 s: ``wait_for_services`` only sees the request channel,
        and a reply sent before DDS matched the reply channel is lost.
        """
        from rclpy.parameter_client import AsyncParameterClient
        pc = self._param_clients.get(node_name)
        if pc is None:
            pc = self._param_clients[node_name] = AsyncParameterClient(self.node, node_name)
        assert pc.wait_for_services(timeout_sec=timeout), f'{node_name}: no parameter services'
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            future = request(pc)
            resend = min(end, time.monotonic() + 5.0)
            while not future.done() and time.monotonic() < resend:
                time.sleep(0.02)
            if future.done() and future.result() is not None:
                return future.result()
            assert self._spin.is_alive(), 'the client executor thread died'
        raise AssertionError(f'{node_name}: no parameter reply within {timeout} s')

    def _store(self, name: str, msg) -> None:
        with self._cond:
            if convert.stamp_to_ns(msg.header.stamp) <= self._floor_ns:
                return  # a late output of a frame sent before clear(floor_ns)
            self.received[name].append(msg)
            self.receipt[name].append(time.monotonic())
            self._cond.notify_all()

    def clear(self, floor_ns: int | None = None) -> None:
        """Forget what was received; with ``floor_ns``, also ignore outputs stamped at or
        below it from now on."""
        with self._cond:
            if floor_ns is not None:
                self._floor_ns = floor_ns
            for name in OUTPUTS:
                self.received[name].clear()
                self.receipt[name].clear()

    def wait_connected(self, timeout: float = 20.0) -> None:
        """Until the node subscribes to our inputs and we to its outputs (DDS discovery)."""
        end = time.monotonic() + timeout
        pubs = [*self.image_pubs.values(), *self.info_pubs.values()]
        while time.monotonic() < end:
            if all(p.get_subscription_count() > 0 for p in pubs) and all(
                    s.get_publisher_count() > 0 for s in self._subs):
                return
            time.sleep(0.05)
        raise TimeoutError(f'node in {self.ns} not connected after {timeout} s')

    def stamps(self, name: str) -> list[int]:
        with self._cond:
            return [convert.stamp_to_ns(m.header.stamp) for m in self.received[name]]

    def wait_stamp(self, name: str, stamp_ns: int, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                if any(convert.stamp_to_ns(m.header.stamp) == stamp_ns
                       for m in self.received[name]):
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)

    def publish(self, msg, cam: str = '') -> None:
        self.image_pubs[cam].publish(msg)

    def publish_info(self, msg, cam: str = '') -> None:
        self.info_pubs[cam].publish(msg)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        self._spin.join(timeout=5.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


PRIME_OUTPUTS = ('flow', 'matchability', 'relative_pose')


def prime(client: Client, node: NodeProcess, size: tuple[int, int],
          cameras: tuple[str, ...], compressed: bool, timeout: float = 60.0) -> None:
    """Send throw-away frames (stamps 1 s, 1.01 s, ... below every test's) until each of
    PRIME_OUTPUTS has come back once, then forget them and ignore their late outputs.

    ``wait_connected`` only proves that each side's *own* endpoint matched: our reader may
    know the node's writer before that writer knows our reader, and a volatile sample
    published in between is lost, however reliable. Only a round trip proves the path.
    """
    w, h = size
    make = compressed_msg if compressed else image_msg
    stamp, end, i = 1_000_000_000, time.monotonic() + timeout, 0
    while time.monotonic() < end:
        stamp += 10_000_000   # at most 200 frames: below 3 s, every test's stamps are higher
        for cam in cameras:
            client.publish(make(render(w, h, 0.03 * (i % 2), seed=7), stamp,
                                f'{cam or "cam"}_optical'), cam)
        i += 1
        time.sleep(0.3)
        if all(client.received[name] for name in PRIME_OUTPUTS):
            client.clear(floor_ns=stamp)
            return
        assert node.alive(), node.log
    raise AssertionError(f'no round trip through the node within {timeout} s; log:\n{node.log}')


def start(namespace: str, params: dict | None = None, cameras: tuple[str, ...] = ('',),
          prime_size: tuple[int, int] | None = (64, 48), client_qos=RELIABLE,
          pythonpath: str = ''):
    """A node process and a client for it, with one round trip through it already done.

    ``prime_size`` is the size of the priming frames: another size than a test's first frame
    makes that frame a reference only (a [size_changed] reset), the same size makes it match
    the last priming frame; None skips priming.
    """
    node = NodeProcess(namespace, params, pythonpath=pythonpath)
    compressed = str((params or {}).get('compressed', '')).lower() == 'true'
    client = Client(namespace, cameras, compressed=compressed, input_qos=client_qos)
    try:
        client.wait_connected()
        if prime_size is not None:
            prime(client, node, prime_size, cameras, compressed)
    except (TimeoutError, AssertionError) as exc:
        client.close()
        node.stop()
        raise AssertionError(f'node did not come up ({exc}); log:\n{node.log}')
    return node, client


class Stamps:
    """Strictly increasing stamps shared by the tests of one node (no accidental resets)."""

    def __init__(self, start_s: int = 1000) -> None:
        self.ns = start_s * 1_000_000_000

    def next(self, dt_s: float = 1 / 30) -> int:
        self.ns += int(round(dt_s * 1e9))
        return self.ns


# ---------------------------------------------------------------------------- tests
@pytest.fixture(scope='module')
def mono():
    node, client = start('/dm_mono')
    yield node, client, Stamps()
    client.close()
    rc = node.stop()
    assert rc in (0, -signal.SIGINT, 130), f'node exited with {rc}; log:\n{node.log}'


def _send_sequence(client: Client, stamps: Stamps, frames: list[np.ndarray], frame_id: str,
                   with_info: bool = True, wait: bool = True) -> tuple[list[int], list[float]]:
    """Publish frames paced by the node's outputs; returns stamps and publish->flow latency."""
    h, w = frames[0].shape[:2]
    sent, latency = [], []
    if with_info:
        client.publish_info(camera_info(w, h, stamps.ns, frame_id))
        time.sleep(0.3)
    for i, rgb in enumerate(frames):
        stamp = stamps.next()
        msg = image_msg(rgb, stamp, frame_id)
        if with_info:
            client.publish_info(camera_info(w, h, stamp, frame_id))
        t0 = time.monotonic()
        client.publish(msg)
        sent.append(stamp)
        if i == 0:
            # The first frame only becomes the reference; one sent before the node took it
            # would replace it in the newest-wins mailbox, so give a loaded machine time.
            time.sleep(0.8)
            continue
        if wait:
            assert client.wait_stamp('flow', stamp, timeout=15.0), f'no flow for frame {i}'
            with client._cond:
                idx = [convert.stamp_to_ns(m.header.stamp) for m in
                       client.received['flow']].index(stamp)
                latency.append(client.receipt['flow'][idx] - t0)
    return sent, latency


def test_mono_ten_frames_640x480(mono):
    """10 frames in -> 9 flow, matchability, pose messages with the right fields."""
    node, client, stamps = mono
    frames = [render(640, 480, 0.03 * i) for i in range(10)]
    client.clear()
    sent, _ = _send_sequence(client, stamps, frames, 'cam_optical')
    targets = sent[1:]
    for name in ('pose', 'relative_pose', 'match_result', 'matchability'):
        for s in targets:
            assert client.wait_stamp(name, s, timeout=5.0), f'{name} missing for {s}'
    time.sleep(0.3)
    flows = [m for m in client.received['flow'] if convert.stamp_to_ns(m.header.stamp) in sent]
    assert [convert.stamp_to_ns(m.header.stamp) for m in flows] == targets
    for m in flows:
        assert (m.encoding, m.width, m.height, m.step) == ('32FC2', 640, 480, 640 * 8)
        assert m.header.frame_id == 'cam_optical'
        flow = convert.image_to_array(m)
        # Camera moves +3 cm along x: the scene moves left by f*b/Z = 5.4 .. 12.5 px.
        med = float(np.median(flow[40:-40, 40:-40, 0]))
        assert -12.5 < med < -5.0, med
        assert abs(float(np.median(flow[40:-40, 40:-40, 1]))) < 0.5
    mats = [m for m in client.received['matchability']
            if convert.stamp_to_ns(m.header.stamp) in sent]
    assert len(mats) == 9
    for m in mats:
        assert (m.encoding, m.width, m.height, m.step) == ('32FC1', 640, 480, 640 * 4)
        values = convert.image_to_array(m)
        assert values.min() >= 0.0 and values.max() <= 1.0 and values.mean() > 0.5
    poses = [m for m in client.received['pose'] if convert.stamp_to_ns(m.header.stamp) in sent]
    assert [convert.stamp_to_ns(m.header.stamp) for m in poses] == targets
    for m in poses:
        assert m.header.frame_id == 'cam_optical'
        p = m.pose.pose.position
        assert p.x < -0.9 and abs(p.y) < 0.3 and abs(p.z) < 0.4, (p.x, p.y, p.z)
        q = m.pose.pose.orientation
        assert abs(q.w) > 0.999  # no rotation
    rels = [m for m in client.received['relative_pose']
            if convert.stamp_to_ns(m.header.stamp) in sent]
    assert [convert.stamp_to_ns(m.source_stamp) for m in rels] == sent[:-1]
    assert all(m.valid and m.status == 'ok' and m.num_inliers > 30 for m in rels)
    results = [m for m in client.received['match_result']
               if convert.stamp_to_ns(m.header.stamp) in sent]
    assert [convert.stamp_to_ns(m.source_stamp) for m in results] == sent[:-1]
    assert all(r.flow.encoding == '32FC2' and r.method == DEFAULT_METHOD for r in results)
    assert node.alive()


def test_diagnostics(mono):
    """/diagnostics reports rates, latency, counters and the device of this node."""
    node, client, _ = mono
    seen = len(client.diagnostics)   # only reports published from now on count

    def ours():
        return [s for m in client.diagnostics[seen:] for s in m.status
                if s.name.startswith('/dm_mono/dense_match_node')]
    end = time.monotonic() + 10
    while time.monotonic() < end and not ours():
        time.sleep(0.1)
    status = ours()[-1]
    values = {kv.key: kv.value for kv in status.values}
    assert (values['method'], values['device'], values['mode']) == (DEFAULT_METHOD, 'cpu', 'mono')
    assert int(values['outputs']) >= 9 and int(values['pose_valid']) >= 9
    assert float(values['latency_median_ms']) > 0
    assert 0.5 < float(values['inlier_ratio_mean']) <= 1.0
    assert values['pose_estimator'] == 'poselib' and values['pose_estimator_note'] == '-'
    # Where the time goes, stage by stage. The flow goes out before the pose is estimated,
    # so the latency (receipt -> flow published) is about the stages up to flow_publish.
    stages = {k[len('stage_'):-len('_ms')]: float(v) for k, v in values.items()
              if k.startswith('stage_')}
    flow_path = ('queue', 'decode', 'prepare', 'match', 'output', 'flow_messages', 'flow_publish')
    assert set(flow_path) | {'matchability', 'matchability_messages', 'matchability_publish',
                             'pose', 'pose_messages', 'pose_publish'} <= set(stages), values
    assert all(v >= 0 for v in stages.values())
    latency = float(values['latency_median_ms'])
    assert stages['match'] > 0 and 0.3 * latency < sum(stages[k] for k in flow_path) < 3 * latency
    for key in ('input_rate_hz', 'output_rate_hz', 'dropped_stale', 'dropped_rate', 'rejected'):
        assert key in values


def test_burst_newest_frame_wins(mono):
    """Frames faster than the matcher: stale ones are dropped, the newest is processed."""
    node, client, stamps = mono
    frames = [render(640, 480, 0.03 * (i % 2)) for i in range(8)]
    client.clear()
    burst = []
    for rgb in frames:
        burst.append(stamps.next())
        client.publish(image_msg(rgb, burst[-1], 'cam_optical'))
    assert client.wait_stamp('flow', burst[-1], timeout=20.0)
    time.sleep(0.5)
    got = [s for s in client.stamps('flow') if s in burst]
    assert got[-1] == burst[-1] and len(got) < len(burst)
    assert got == sorted(got)  # never out of order
    assert node.alive()


def test_latency_640x480_dis(mono):
    """Median publish->receipt latency of the flow topic at 640x480 with dis (printed)."""
    node, client, stamps = mono
    frames = [render(640, 480, 0.03 * (i % 4)) for i in range(11)]
    client.clear()
    sent, latency = _send_sequence(client, stamps, frames, 'cam_optical')
    lat_ms = np.array(latency) * 1e3
    print(f'\nend-to-end latency 640x480 dis+pose, {lat_ms.size} frames: median '
          f'{np.median(lat_ms):.1f} ms, p90 {np.percentile(lat_ms, 90):.1f} ms, '
          f'min {lat_ms.min():.1f} ms, max {lat_ms.max():.1f} ms')
    assert lat_ms.size == 10
    assert np.median(lat_ms) < 3000.0
    # Each output topic arrives on its own, flow may come before the pose of the same frame:
    # let the last pose of this run arrive before the next run's record starts.
    assert client.wait_stamp('relative_pose', sent[-1], timeout=10.0)
    # The same without pose estimation: what matching and transport alone cost.
    assert _set_param(client, '/dm_mono/dense_match_node', 'estimate_pose', False).successful
    try:
        client.clear()
        sent, latency = _send_sequence(client, stamps, frames, 'cam_optical')
        time.sleep(0.3)
    finally:
        assert _set_param(client, '/dm_mono/dense_match_node', 'estimate_pose', True).successful
    flow_ms = np.array(latency) * 1e3
    print(f'end-to-end latency 640x480 dis, no pose, {flow_ms.size} frames: median '
          f'{np.median(flow_ms):.1f} ms, p90 {np.percentile(flow_ms, 90):.1f} ms')
    # pose off: nothing on relative_pose for any frame of this run
    assert [m for m in client.received['relative_pose']
            if convert.stamp_to_ns(m.header.stamp) in sent] == []


def _set_param(client: Client, node_name: str, name: str, value):
    from rclpy.parameter import Parameter
    return client.parameter_call(
        node_name, lambda pc: pc.set_parameters([Parameter(name, value=value)])).results[0]


def _stream(client: Client, stamps: Stamps, frames: list[np.ndarray], seconds: float,
            rate_hz: float = 30.0) -> list[int]:
    """Publish frames at a camera's rate for ``seconds``; returns the stamps sent."""
    sent = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        sent.append(stamps.next(1.0 / rate_hz))
        client.publish(image_msg(frames[i % len(frames)], sent[-1], 'cam_optical'))
        i += 1
        time.sleep(1.0 / rate_hz)
    return sent


def test_max_rate_limits_processing(mono):
    """max_rate caps the frames taken in; without it the worker runs as fast as it can."""
    node, client, stamps = mono
    frames = [render(640, 480, 0.03 * (i % 3)) for i in range(3)]
    counts = {}
    for max_rate in (0.0, 1.0):
        assert _set_param(client, '/dm_mono/dense_match_node', 'max_rate', max_rate).successful
        try:
            client.clear()
            sent = _stream(client, stamps, frames, seconds=2.0)
            time.sleep(1.5)  # let the worker finish what it accepted
        finally:
            assert _set_param(client, '/dm_mono/dense_match_node', 'max_rate', 0.0).successful
        counts[max_rate] = len([s for s in client.stamps('flow') if s in sent])
    # 1 Hz over 2 s admits at most 3 frames, the first of which may only become the reference.
    assert 1 <= counts[1.0] <= 3, counts
    assert counts[0.0] > counts[1.0], counts
    assert node.alive()


def test_runtime_method_change_rejected_keeps_old(mono):
    """An unknown method or missing weights file is refused with a reason; output goes on."""
    node, client, stamps = mono
    res = _set_param(client, '/dm_mono/dense_match_node', 'method', 'no_such_method')
    assert not res.successful and 'no_such_method' in res.reason and 'dis' in res.reason
    res = _set_param(client, '/dm_mono/dense_match_node', 'weights', '/nonexistent/w.pt')
    assert not res.successful and 'does not exist' in res.reason
    res = _set_param(client, '/dm_mono/dense_match_node', 'device', 'tpu')
    assert not res.successful and 'device' in res.reason
    # Options the method does not take, or that are not a mapping, are refused too.
    res = _set_param(client, '/dm_mono/dense_match_node', 'method_options', '{windows: 3}')
    assert not res.successful and 'windows' in res.reason
    res = _set_param(client, '/dm_mono/dense_match_node', 'method_options', '[fast]')
    assert not res.successful and 'must be a mapping' in res.reason
    # Valid swaps (to dis, then dis rebuilt with an option) succeed and matching continues.
    res = _set_param(client, '/dm_mono/dense_match_node', 'method', 'dis')
    assert res.successful, res.reason
    res = _set_param(client, '/dm_mono/dense_match_node', 'method_options', '{preset: fast}')
    assert res.successful, res.reason
    assert node.wait_for_log("options={'preset': 'fast'}")
    end = time.monotonic() + 10.0  # the second swap's line, read from the node's stdout
    while node.count('model swapped: method=dis') < 2 and time.monotonic() < end:
        time.sleep(0.05)
    assert node.count('model swapped: method=dis') == 2, node.log
    frames = [render(320, 240, 0.02 * i) for i in range(3)]
    client.clear()
    sent, _ = _send_sequence(client, stamps, frames, 'cam_optical', with_info=False)
    assert client.stamps('flow')[-2:] == sent[1:]
    assert _set_param(client, '/dm_mono/dense_match_node', 'method_options', '').successful
    assert _set_param(client, '/dm_mono/dense_match_node', 'method', DEFAULT_METHOD).successful


# ---------------------------------------------------------------------------- pair mode
@pytest.mark.parametrize('synchronizer', ['auto', 'builtin'])
def test_pair_mode_jittered_stamps(synchronizer):
    """Two cameras with jittered stamps: each pair within the slop gives one output."""
    ns = f'/dm_pair_{synchronizer}'
    node, client = start(ns, {'mode': 'pair', 'synchronizer': synchronizer,
                              'sync_slop': 0.02, 'pose.max_correspondences': 500},
                         cameras=('left', 'right'))
    try:
        try:
            import message_filters  # noqa: F401
            expected_impl = 'message_filters' if synchronizer == 'auto' else 'builtin'
        except ImportError:
            expected_impl = 'builtin'
        assert node.wait_for_log(f'pair mode: {expected_impl} synchronizer')
        w, h = 320, 240
        t = 5_000_000_000
        for cam in ('left', 'right'):
            client.publish_info(camera_info(w, h, t, f'{cam}_optical'), cam)
        time.sleep(0.3)
        jitter_ms = [0, 12, -9, 15]
        pairs = []
        for i, jit in enumerate(jitter_ms):
            t += 100_000_000
            tl, tr = t, t + jit * 1_000_000
            # A right frame far from any left frame first: it must not be paired.
            client.publish(image_msg(render(w, h, 0.06, seed=i), t - 50_000_000,
                                     'right_optical'), 'right')
            client.publish(image_msg(render(w, h, 0.0, seed=i), tl, 'left_optical'), 'left')
            time.sleep(0.02)
            client.publish(image_msg(render(w, h, 0.06, seed=i), tr, 'right_optical'), 'right')
            pairs.append((tl, tr))
            assert client.wait_stamp('flow', tr, timeout=15.0), \
                f'no output for pair {i} (jitter {jit} ms); log:\n{node.log}'
        for name in ('relative_pose', 'pose'):
            for _, tr in pairs:
                assert client.wait_stamp(name, tr, timeout=5.0), name
        time.sleep(0.3)
        assert client.stamps('flow') == [tr for _, tr in pairs]
        for m in client.received['flow']:
            assert m.header.frame_id == 'left_optical'  # the source (left) grid
            assert (m.encoding, m.width, m.height) == ('32FC2', w, h)
        rels = client.received['relative_pose']
        assert [(convert.stamp_to_ns(m.source_stamp), convert.stamp_to_ns(m.header.stamp))
                for m in rels] == pairs
        assert all(m.header.frame_id == 'right_optical' and m.source_frame_id == 'left_optical'
                   for m in rels)
        assert all(m.valid for m in rels), [m.status for m in rels]
        # Right camera 6 cm to the right of the left one: X_right = X_left - b x.
        for m in client.received['pose']:
            assert m.pose.pose.position.x < -0.9
        assert node.alive()
    finally:
        client.close()
        node.stop()


def test_pair_mode_follows_reliable_cameras_that_start_after_the_node():
    """Stereo drivers often come up after the node: `auto` first subscribes best effort (no
    publishers), then follows the two reliable 640x480 cameras when they appear, so their
    large frames are not lost as fragments; every pair gets its flow."""
    ns = '/dm_pair_late'
    node = NodeProcess(ns, {'mode': 'pair', 'input_qos': 'auto', 'input_queue_depth': 5,
                            'sync_slop': 0.02, 'estimate_pose': False})
    client = None
    try:
        assert node.wait_for_log('input QoS: best effort (auto, matching 0 publisher(s)',
                                 timeout=30.0), node.log
        client = Client(ns, ('left', 'right'))
        client.wait_connected()
        assert node.wait_for_log('input QoS: reliable (auto, matching 2 publisher(s)',
                                 timeout=10.0), node.log
        client.wait_connected()   # the new subscriptions
        stamps = Stamps()
        sent = []
        for i in range(6):
            t = stamps.next(0.5)
            for cam, shift in (('left', 0.0), ('right', 0.04)):
                client.publish(image_msg(render(640, 480, shift, seed=i), t, f'{cam}_optical'), cam)
            sent.append(t)
            time.sleep(0.5)
        got = [t for t in sent if client.wait_stamp('flow', t, timeout=10.0)]
        assert len(got) >= 5, (len(got), node.log)
    finally:
        if client is not None:
            client.close()
        node.stop()


# ---------------------------------------------------------------------------- no DDS traffic
@pytest.mark.parametrize('config_file', ['mono.yaml', 'stereo.yaml'])
def test_config_files_only_set_declared_parameters(config_file):
    """A typo in a params file would be silently ignored by ROS; catch it here."""
    import yaml
    from dense_match_ros.ros.node import DenseMatchNode
    from dense_match_ros.ros.parameters import pipeline_config_from_params
    doc = yaml.safe_load((REPO_ROOT / 'config' / config_file).read_text())
    (key, body), = doc.items()
    assert key.endswith('dense_match_node')
    params = body['ros__parameters']
    context = rclpy.Context()
    rclpy.init(args=[], context=context)
    try:
        node = DenseMatchNode(context=context)
        try:
            declared = set(node._parameters)
            for name, value in params.items():
                assert name in declared, f'{config_file}: {name} is not a node parameter'
                default = node.get_parameter(name).value
                assert type(value) is type(default), (name, value, default)
        finally:
            node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
    config = pipeline_config_from_params(params)
    assert config.mode == params['mode'] and config.method == params['method']
    assert config.pose_options['ransac_threshold_px'] == params['pose.ransac_threshold_px']


def test_config_and_launch_files_name_the_default_method():
    """One default for the node, its files and the tools: switching it is one constant and
    these files, and this test says which were forgotten."""
    import xml.etree.ElementTree as ET

    import yaml
    from dense_match_ros.core.registry import DEFAULT_METHOD
    from dense_match_ros.ros.parameters import parameter_table
    from dense_match_ros.ros.pipeline import PipelineConfig
    assert {p.name: p.default for p in parameter_table()}['method'] == DEFAULT_METHOD
    assert PipelineConfig().method == DEFAULT_METHOD
    for config_file in ('mono.yaml', 'stereo.yaml'):
        (body,) = yaml.safe_load((REPO_ROOT / 'config' / config_file).read_text()).values()
        assert body['ros__parameters']['method'] == DEFAULT_METHOD, config_file
    args = {a.get('name'): a.get('default')
            for a in ET.parse(REPO_ROOT / 'launch' / 'mono.launch.xml').getroot().iter('arg')}
    assert args['method'] == DEFAULT_METHOD


def test_method_options_parameter_is_a_yaml_mapping():
    from dense_match_ros.ros.parameters import parse_method_options, pipeline_config_from_params
    assert parse_method_options('') == {} and parse_method_options('  ') == {}
    assert parse_method_options('{refine: dis, max_side: 512}') == {'refine': 'dis',
                                                                    'max_side': 512}
    assert parse_method_options('{"mode": "pyramid"}') == {'mode': 'pyramid'}
    for bad in ('dis', '[1, 2]', '{1: 2}', '{refine: [dis'):
        with pytest.raises(ValueError, match='method_options'):
            parse_method_options(bad)
    config = pipeline_config_from_params({'method': 'dgc', 'method_options': '{refine: dis}'})
    assert config.method_options == {'refine': 'dis'}


def test_output_messages_follow_the_documented_conventions():
    """What the node (and the replay tool) publish for one result, field by field."""
    from dense_match_ros.ros.messages import output_messages
    from dense_match_ros.ros.parameters import pipeline_config_from_params
    from dense_match_ros.ros.pipeline import Frame, MatchPipeline
    config = pipeline_config_from_params({'pose.max_correspondences': 400,
                                          'publish_flow': False})  # node-only: ignored
    config.color_output = True
    pipe = MatchPipeline(config)
    K = convert.camera_info_to_intrinsics(camera_info(320, 240, 0, 'c'))
    pipe.process(Frame(render(320, 240, 0.0), 10 * 10**9, 'cam', K))
    out = pipe.process(Frame(render(320, 240, 0.06), 11 * 10**9, 'cam', K))
    msgs = output_messages(out)
    assert set(msgs) >= {'flow', 'matchability', 'match_result', 'relative_pose', 'pose'}
    assert msgs['flow'].encoding == '32FC2' and msgs['matchability'].encoding == '32FC1'
    assert convert.stamp_to_ns(msgs['flow'].header.stamp) == 11 * 10**9
    rel, pose = msgs['relative_pose'], msgs['pose']
    assert rel.valid and convert.stamp_to_ns(rel.source_stamp) == 10 * 10**9
    np.testing.assert_allclose([rel.translation.x, rel.translation.y, rel.translation.z],
                               np.ravel(out.pose.t))
    assert pose.pose.pose.position.x == rel.translation.x
    assert pose.pose.pose.orientation.w == rel.rotation.w
    E = np.asarray(rel.essential_matrix).reshape(3, 3)
    np.testing.assert_allclose(E, out.pose.E)
    if 'flow_color' in msgs:
        assert msgs['flow_color'].encoding == 'bgr8'
    out.pose, out.pose_status = None, 'no_camera_info'
    msgs = output_messages(out)
    assert 'pose' not in msgs and not msgs['relative_pose'].valid
    assert msgs['relative_pose'].status == 'no_camera_info'


def test_parameter_table_drives_the_config_and_run_time_changes():
    """One table: every PipelineConfig field is a parameter, and a change goes where it acts."""
    import dataclasses
    from dense_match_ros.ros.parameters import parameter_table, runtime_change
    from dense_match_ros.ros.pipeline import PipelineConfig
    table = {p.name: p for p in parameter_table()}
    fields = {f.name for f in dataclasses.fields(PipelineConfig)} - {'pose_options',
                                                                    'color_output'}
    assert {n for n, p in table.items() if p.config and not n.startswith('pose.')} == fields
    assert table['pose.spread_grid'].default == [16, 12] and table['mode'].read_only
    config = PipelineConfig(pose_options={'confidence': 0.99})
    change = runtime_change({'process_width': 320, 'pose.spread_grid': [8, 6], 'max_rate': 2.0,
                             'warn_throttle_s': 1.0}, config)
    assert change.model is None
    assert change.pipeline == {'process_width': 320,
                               'pose_options': {'confidence': 0.99, 'spread_grid': (8, 6)}}
    assert change.node == {'max_rate': 2.0, 'warn_throttle_s': 1.0}
    change = runtime_change({'method_options': '{preset: fast}'}, config)
    assert change.model == {'method': DEFAULT_METHOD, 'weights': '', 'device': None,
                            'options': {'preset': 'fast'}} and change.pipeline == {}
    with pytest.raises(ValueError, match='does not exist'):
        runtime_change({'weights': '/nonexistent/w.pt'}, config)
    with pytest.raises(ValueError, match='device'):
        runtime_change({'device': 'tpu'}, config)


def test_default_input_qos_follows_a_reliable_camera_and_warns_when_frames_are_lost():
    """Default parameters (input_qos: auto): a reliable 640x480 publisher at 1 Hz gets 9 of 9
    flows; a best-effort one either gets its frames or the [no_frames] warning within 10 s."""
    from rclpy.qos import qos_profile_sensor_data
    node, client = start('/dm_qos', {'input_qos': 'auto'}, prime_size=None)
    try:
        client.wait_connected()
        assert node.wait_for_log('input QoS: reliable', timeout=10.0), node.log
        stamps = Stamps()
        sent = []
        client.publish_info(camera_info(640, 480, stamps.ns, 'cam'))
        for i in range(10):
            sent.append(stamps.next())
            client.publish(image_msg(render(640, 480, 0.03 * i), sent[-1], 'cam'))
            time.sleep(1.0)
        got = [s for s in sent[1:] if client.wait_stamp('flow', s, timeout=5.0)]
        assert len(got) == 9, (len(got), node.log)
    finally:
        client.close()
        node.stop()
    node, client = start('/dm_qos_be', {'input_qos': 'auto'}, prime_size=None,
                         client_qos=qos_profile_sensor_data)
    try:
        client.wait_connected()
        assert node.wait_for_log('input QoS: best effort', timeout=10.0), node.log
        stamps = Stamps()
        t_end = time.monotonic() + 10.0
        while time.monotonic() < t_end:
            client.publish(image_msg(render(640, 480, 0.0), stamps.next(), 'cam'))
            time.sleep(0.5)
            if len(client.received['flow']) >= 3 or '[no_frames]' in node.log:
                break
        assert len(client.received['flow']) >= 3 or node.wait_for_log('[no_frames]', 2.0), node.log
    finally:
        client.close()
        node.stop()


def test_node_without_poselib_publishes_valid_poses_with_the_opencv_fallback(tmp_path):
    """A robot install where pip never put poselib: `import poselib` fails in the node
    process (a sitecustomize blocks it), the node says so once, names the fallback in
    /diagnostics and still publishes valid poses."""
    (tmp_path / 'sitecustomize.py').write_text(
        "import sys\nsys.modules['poselib'] = None  # import poselib -> ImportError\n")
    node, client = start('/dm_no_poselib', {'pose.max_correspondences': 300},
                         pythonpath=str(tmp_path))
    try:
        assert node.wait_for_log('[pose_estimator_fallback]', timeout=10.0), node.log
        assert node.count('[pose_estimator_fallback]') == 1
        assert 'pose=on (opencv-magsac)' in node.log, node.log
        stamps = Stamps()
        sent, _ = _send_sequence(client, stamps, [render(160, 120, 0.1 * i) for i in range(4)],
                                 'cam')
        for s in sent[1:]:
            assert client.wait_stamp('relative_pose', s, timeout=10.0), node.log
        rels = [m for m in client.received['relative_pose']
                if convert.stamp_to_ns(m.header.stamp) in sent]
        assert [(m.valid, m.status) for m in rels] == [(True, 'ok')] * 3
        assert client.wait_stamp('pose', sent[-1], timeout=5.0)
        end = time.monotonic() + 5.0
        values = {}
        while time.monotonic() < end and values.get('pose_estimator') != 'opencv-magsac':
            for m in client.diagnostics:
                for st in m.status:
                    if st.name.startswith('/dm_no_poselib/'):
                        values = {kv.key: kv.value for kv in st.values}
            time.sleep(0.2)
        assert values.get('pose_estimator') == 'opencv-magsac', values
        assert "'poselib' not installed" in values['pose_estimator_note']
        assert 'ImportError' not in node.log
    finally:
        client.close()
        node.stop()
