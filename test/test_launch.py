"""The launch files start the node, pass arguments and the params file, and remap topics.

Each test runs a launch file through ``launch.LaunchService`` (what ``ros2 launch`` does)
in the main thread, while a client thread publishes into the remapped input topics and
waits for the node's output; it then shuts the launch down. Skips cleanly without the
ros_launch_kit (launch, launch_ros).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
KIT = Path(os.environ.get('ROS_LAUNCH_KIT', REPO_ROOT.parent / 'shared' / 'ros_launch_kit'))
if not KIT.is_dir():
    pytest.skip(f'{KIT} absent', allow_module_level=True)
pytest.importorskip('launch_ros', reason=f'run: bash {KIT}/install.sh VENV')

from test_node import Client, camera_info, image_msg, render  # noqa: E402
from dense_match_ros.ros import convert  # noqa: E402
from dense_match_ros.core.registry import DEFAULT_METHOD  # noqa: E402

EXECUTABLES = ('dense_match_node',)


@pytest.fixture
def overlay(tmp_path, monkeypatch):
    """An ament prefix in which launch_ros finds dense_match_ros as on a colcon install.

    lib/dense_match_ros/<exe> runs the source tree's module with this venv's Python;
    share/dense_match_ros is the source tree (launch/, config/, package.xml).
    """
    prefix = tmp_path / 'prefix'
    marker = prefix / 'share' / 'ament_index' / 'resource_index' / 'packages'
    marker.mkdir(parents=True)
    (marker / 'dense_match_ros').touch()
    (prefix / 'share' / 'dense_match_ros').symlink_to(REPO_ROOT)
    lib = prefix / 'lib' / 'dense_match_ros'
    lib.mkdir(parents=True)
    for exe in EXECUTABLES:
        module = 'dense_match_ros.ros.node'
        script = lib / exe
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        script.chmod(0o755)
    monkeypatch.setenv('AMENT_PREFIX_PATH', f'{prefix}{os.pathsep}{sys.prefix}')
    monkeypatch.setenv('PYTHONPATH', str(REPO_ROOT))
    monkeypatch.setenv('RCUTILS_COLORIZED_OUTPUT', '0')
    return prefix


def _run_launch(path: Path, arguments: dict, check, timeout: float = 60.0,
                started: list | None = None):
    """Run ``path`` with ``arguments``; ``check()`` runs in a thread and its result returns.

    ``started`` receives (process name, pid) of each process the launch starts."""
    from launch import LaunchDescription, LaunchService
    from launch.actions import (IncludeLaunchDescription, RegisterEventHandler, Shutdown,
                                TimerAction)
    from launch.event_handlers import OnProcessExit, OnProcessStart
    from launch.launch_description_sources import AnyLaunchDescriptionSource

    died = []
    started = [] if started is None else started
    ls = LaunchService(argv=[], noninteractive=True)
    ls.include_launch_description(LaunchDescription([
        RegisterEventHandler(OnProcessStart(
            on_start=lambda ev, ctx: started.append((ev.process_name, ev.pid)))),
        RegisterEventHandler(OnProcessExit(
            on_exit=lambda ev, ctx: None if ctx.is_shutdown
            else died.append((ev.process_name, ev.returncode)))),
        IncludeLaunchDescription(AnyLaunchDescriptionSource(str(path)),
                                 launch_arguments=list(arguments.items())),
        TimerAction(period=timeout, actions=[Shutdown(reason='test timeout')]),
    ]))
    result: dict = {}

    def worker():
        try:
            result['value'] = check()
        except BaseException as exc:  # reported in the main thread
            result['error'] = exc
        finally:
            ls.shutdown()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    rc = ls.run()
    thread.join(timeout=15)
    assert rc == 0, f'launch failed with {rc}'
    assert died == [], f'processes died: {died}'
    if 'error' in result:
        raise result['error']
    return result['value']


def _params(client: Client, node: str, names: list[str]) -> dict:
    from rclpy.parameter import parameter_value_to_python
    reply = client.parameter_call(node, lambda pc: pc.get_parameters(names))
    return {n: parameter_value_to_python(v) for n, v in zip(names, reply.values)}


class _RemappedClient(Client):
    """A Client whose inputs are the remapped topics (sensor-data QoS, as from a camera),
    outputs in the node's namespace."""

    def __init__(self, namespace: str, inputs: dict[str, tuple[str, str]]) -> None:
        from rclpy.qos import qos_profile_sensor_data
        super().__init__(namespace, input_topics=inputs, input_qos=qos_profile_sensor_data)


def _drive_mono(client: Client, w: int = 160, h: int = 120, frames: int = 4) -> list[int]:
    """Send frames (sensor-data QoS, as from a camera) until flow comes back; its stamps."""
    stamp = 7_000_000_000
    client.publish_info(camera_info(w, h, stamp, 'cam'))
    time.sleep(0.3)
    got = []
    for i in range(frames):
        stamp += 100_000_000
        client.publish_info(camera_info(w, h, stamp, 'cam'))
        client.publish(image_msg(render(w, h, 0.03 * i), stamp, 'cam'))
        if i and client.wait_stamp('flow', stamp, timeout=10.0):
            got.append(stamp)
        else:
            time.sleep(0.4)
    return got


def test_mono_launch_py(overlay, tmp_path):
    params = tmp_path / 'params.yaml'
    params.write_text((REPO_ROOT / 'config' / 'mono.yaml').read_text()
                      .replace('matchability_threshold: 0.5', 'matchability_threshold: 0.37'))
    ns = '/lt_mono'

    def check():
        client = _RemappedClient(ns, {'': ('/lt_cam/image_raw', '/lt_cam/camera_info')})
        try:
            client.wait_connected(timeout=30)
            values = _params(client, f'{ns}/dense_match_node',
                             ['method', 'mode', 'matchability_threshold', 'device',
                              'method_options'])
            got = _drive_mono(client)
            return values, got
        finally:
            client.close()

    values, got = _run_launch(REPO_ROOT / 'launch' / 'mono.launch.py',
                              {'image': '/lt_cam/image_raw',
                               'camera_info': '/lt_cam/camera_info', 'namespace': ns,
                               'method': 'dis', 'device': 'cpu', 'params_file': str(params),
                               'method_options': '{preset: fast}'},
                              check)
    assert values == {'method': 'dis', 'mode': 'mono', 'matchability_threshold': 0.37,
                      'device': 'cpu', 'method_options': '{preset: fast}'}
    assert len(got) >= 2, got  # best-effort input may lose a frame; the stream goes on


def test_stereo_launch_py(overlay):
    ns = '/lt_stereo'
    inputs = {'left': ('/lt_st/left/image_raw', '/lt_st/left/camera_info'),
              'right': ('/lt_st/right/image_raw', '/lt_st/right/camera_info')}

    def check():
        client = _RemappedClient(ns, inputs)
        try:
            client.wait_connected(timeout=30)
            values = _params(client, f'{ns}/dense_match_node', ['mode', 'sync_slop'])
            w, h, t = 160, 120, 9_000_000_000
            for cam in inputs:
                client.publish_info(camera_info(w, h, t, f'{cam}_optical'), cam)
            time.sleep(0.3)
            got = []
            for i in range(4):
                t += 200_000_000
                client.publish(image_msg(render(w, h, 0.0, seed=i), t, 'left_optical'), 'left')
                client.publish(image_msg(render(w, h, 0.1, seed=i), t + 4_000_000,
                                         'right_optical'), 'right')
                if client.wait_stamp('flow', t + 4_000_000, timeout=10.0):
                    got.append(t)
            rel = list(client.received['relative_pose'])
            return values, got, rel
        finally:
            client.close()

    values, got, rel = _run_launch(REPO_ROOT / 'launch' / 'stereo.launch.py',
                                   {**{f'{cam}_{kind}': topic for cam, (img, info) in
                                       inputs.items() for kind, topic in
                                       (('image', img), ('camera_info', info))},
                                    'namespace': ns, 'sync_slop': '0.01'}, check)
    assert values == {'mode': 'pair', 'sync_slop': 0.01}
    assert len(got) >= 2, got
    assert all(m.source_frame_id == 'left_optical' and m.header.frame_id == 'right_optical'
               for m in rel)
    for m in rel:  # each output pairs a left frame with the right one 4 ms later
        source = convert.stamp_to_ns(m.source_stamp)
        assert (source - 9_000_000_000) % 200_000_000 == 0
        assert convert.stamp_to_ns(m.header.stamp) == source + 4_000_000


def test_mono_launch_xml_uses_package_share(overlay):
    """The XML variant resolves $(find-pkg-share) and the default params file."""
    ns = '/lt_xml'

    def check():
        client = _RemappedClient(ns, {'': ('/lt_xml_cam/image', '/lt_xml_cam/camera_info')})
        try:
            client.wait_connected(timeout=30)
            return _params(client, f'{ns}/dense_match_node',
                           ['method', 'pose.estimator', 'input_qos'])
        finally:
            client.close()

    values = _run_launch(REPO_ROOT / 'launch' / 'mono.launch.xml',
                         {'image': '/lt_xml_cam/image', 'camera_info': '/lt_xml_cam/camera_info',
                          'namespace': ns, 'device': 'cpu'}, check)
    assert values['method'] == DEFAULT_METHOD and values['input_qos'] == 'auto'
    # The default params file came from $(find-pkg-share): a missing file would have made
    # the node exit at start (recorded in `died`).
    assert values['pose.estimator'] == 'poselib'


# ------------------------------------------------------------------ large_data:=true

TRANSPORTS = 'FASTDDS_BUILTIN_TRANSPORTS'


@pytest.fixture
def no_transports_env(monkeypatch):
    """FASTDDS_BUILTIN_TRANSPORTS unset here, and restored afterwards.

    ``set_env`` writes into this process's os.environ (launch has no per-include
    environment), so the launch of one test would leak it into the next: the setenv
    records the original state, which teardown restores after undoing the delenv."""
    if not Path('/proc/self/environ').is_file():
        pytest.skip('no /proc/<pid>/environ to read')
    monkeypatch.setenv(TRANSPORTS, 'placeholder')
    monkeypatch.delenv(TRANSPORTS)


def _environ(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with."""
    raw = Path(f'/proc/{pid}/environ').read_bytes().decode(errors='replace')
    return dict(item.split('=', 1) for item in raw.split('\0') if '=' in item)


def _node_environ(started: list, timeout: float = 30.0) -> dict[str, str]:
    """The environment of the started dense_match_node, read while it runs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pids = [pid for name, pid in list(started) if name.startswith('dense_match_node')]
        if pids:
            return _environ(pids[0])
        time.sleep(0.05)
    raise AssertionError(f'dense_match_node not started within {timeout} s: {started}')


@pytest.mark.parametrize('large_data', [None, 'false', 'true'])
@pytest.mark.parametrize('launch_file',
                         ['mono.launch.py', 'mono.launch.xml', 'stereo.launch.py'])
def test_large_data_sets_the_fast_dds_transport_of_the_node(overlay, no_transports_env,
                                                            launch_file, large_data):
    """large_data:=true starts the node with FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA; the
    default and false leave its environment alone."""
    started: list = []
    arguments = {'namespace': '/lt_ld', 'device': 'cpu', 'method': 'dis'}
    if large_data is not None:
        arguments['large_data'] = large_data
    env = _run_launch(REPO_ROOT / 'launch' / launch_file, arguments,
                      lambda: _node_environ(started), started=started)
    if large_data == 'true':
        assert env.get(TRANSPORTS) == 'LARGE_DATA'
    else:
        assert TRANSPORTS not in env
    assert env.get('PYTHONPATH') == str(REPO_ROOT)  # the node's environment, read right


@pytest.mark.parametrize('large_data', [None, 'true'])
def test_replay_launch_large_data_reaches_node_player_and_recorder(overlay, no_transports_env,
                                                                  tmp_path, monkeypatch,
                                                                  large_data):
    """replay.launch.py large_data:=true: the node, ``ros2 bag play`` and ``ros2 bag record``
    all start with FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA (a stand-in ``ros2`` on PATH
    records the value it was started with); by default none of them has it."""
    seen = tmp_path / 'ros2_env.txt'
    bindir = tmp_path / 'bin'
    bindir.mkdir()
    fake = bindir / 'ros2'
    fake.write_text(f'#!/bin/sh\necho "$2 ${{{TRANSPORTS}:-unset}}" >> "{seen}"\n'
                    'exec sleep 30\n')
    fake.chmod(0o755)
    monkeypatch.setenv('PATH', f'{bindir}{os.pathsep}{os.environ["PATH"]}')
    started: list = []

    def check():
        env = _node_environ(started)
        end = time.monotonic() + 30
        while time.monotonic() < end and (not seen.is_file()
                                          or len(seen.read_text().splitlines()) < 2):
            time.sleep(0.05)
        return env, sorted(seen.read_text().splitlines()) if seen.is_file() else []

    arguments = {'bag': str(tmp_path / 'no_bag'), 'start_delay': '0.2', 'device': 'cpu',
                 'method': 'dis', 'record': 'true', 'record_path': str(tmp_path / 'out'),
                 'namespace': 'lt_ld_rp'}
    if large_data is not None:
        arguments['large_data'] = large_data
    env, lines = _run_launch(REPO_ROOT / 'launch' / 'replay.launch.py', arguments, check,
                             started=started)
    expected = 'LARGE_DATA' if large_data == 'true' else None
    assert env.get(TRANSPORTS) == expected
    assert lines == [f'play {expected or "unset"}', f'record {expected or "unset"}']
