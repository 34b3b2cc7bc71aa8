"""dense-match-replay and its building blocks: TUM trajectories, pair scoring, the bag replay."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dense_match_ros.ros.tools import trajectory as traj_mod
from dense_match_ros.ros.tools.trajectory import (Trajectory, associate, read_tum,
                                                  relative_pose, write_tum)


def _pose(rotvec, t):
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    T[:3, 3] = t
    return T


# --------------------------------------------------------------------------- trajectory


def test_tum_round_trip_and_bad_lines(tmp_path):
    poses = np.stack([_pose([0.1, -0.2, 0.3], [1, 2, 3]), _pose([0, 0.5, 0], [-1, 0, 0.25])])
    path = write_tum(tmp_path / 'gt.txt', np.array([10.5, 10.25]), poses)
    back = read_tum(path)
    np.testing.assert_allclose(back.stamps, [10.25, 10.5])  # sorted on read
    np.testing.assert_allclose(back.poses[0], poses[1], atol=1e-6)
    np.testing.assert_allclose(back.poses[1], poses[0], atol=1e-6)
    (tmp_path / 'bad.txt').write_text('# header\n1.0 0 0 0 0 0 0 1\n2.0 rgb/2.0.png\n')
    with pytest.raises(ValueError, match='bad.txt:3'):
        read_tum(tmp_path / 'bad.txt')


def test_associate_nearest_within_tolerance():
    ref = np.array([1.00, 1.01, 1.02, 1.50])
    got = associate(np.array([0.90, 0.995, 1.014, 1.016, 1.3, 1.515, 2.0]), ref, max_dt=0.02)
    assert got.tolist() == [-1, 0, 1, 2, -1, 3, -1]
    assert associate(np.array([1.0]), np.array([]), 0.1).tolist() == [-1]


def test_relative_pose_maps_source_points_into_target():
    T_w_s, T_w_t = _pose([0.0, 0.3, 0.1], [0.5, 0.0, 0.2]), _pose([0.2, -0.1, 0.0], [0, 1, -1])
    X_w = np.array([0.3, -0.7, 4.0, 1.0])
    X_s, X_t = np.linalg.inv(T_w_s) @ X_w, np.linalg.inv(T_w_t) @ X_w
    T_t_s = relative_pose(T_w_s, T_w_t)
    np.testing.assert_allclose(T_t_s @ X_s, X_t, atol=1e-12)
    traj = Trajectory(np.array([1.0, 2.0]), np.stack([T_w_s, T_w_t]))
    np.testing.assert_allclose(traj.relative(1.001, 1.999), T_t_s)
    assert traj.relative(1.0, 2.5) is None  # target stamp too far from any sample


def test_tum_office_ground_truth_covers_most_frames(shared_data):
    folder = shared_data / 'tum_fr3_office'
    traj = read_tum(folder / 'groundtruth.txt')
    stamps = sorted(float(p.stem) for p in (folder / 'rgb').glob('*.png'))
    idx = traj.nearest(np.array(stamps))
    # Motion capture starts 67 ms after the first image: the first two frames have no
    # sample within 20 ms, every later one has.
    assert (idx[:2] == -1).all() and (idx[2:] >= 0).all()
    assert np.abs(traj.stamps[idx[2:]] - np.array(stamps[2:])).max() <= traj_mod.DEFAULT_MAX_DT


# --------------------------------------------------------------------------- scoring

replay = pytest.importorskip('dense_match_ros.ros.tools.replay')
pose_report = pytest.importorskip('dense_match_ros.ros.tools.pose_report')


def test_evaluate_scores_direction_failures_and_missing_ground_truth():
    T_w = [_pose([0, 0, 0], [0, 0, 0]), _pose([0, 0.05, 0], [0.1, 0, 0]),
           _pose([0, 0.1, 0], [0.2, 0, 0.05])]
    traj = Trajectory(np.array([1.0, 2.0, 3.0]), np.stack(T_w))
    T10 = relative_pose(T_w[0], T_w[1])
    T21 = relative_pose(T_w[1], T_w[2])
    t10 = T10[:3, 3] / np.linalg.norm(T10[:3, 3])
    R_off = Rotation.from_rotvec([0, 0, np.radians(3.0)]).as_matrix() @ T21[:3, :3]
    ns = 1_000_000_000
    records = [
        pose_report.PairRecord(1 * ns, 2 * ns, T10[:3, :3], t10, True, 'ok', 100, 90),
        pose_report.PairRecord(1 * ns, 2 * ns, T10[:3, :3], -t10, True, 'ok', 100, 90),
        pose_report.PairRecord(2 * ns, 3 * ns, R_off, T21[:3, 3], True, 'ok', 100, 80),
        pose_report.PairRecord(2 * ns, 3 * ns, T21[:3, :3], T21[:3, 3], False, 'too_few_inliers'),
        pose_report.PairRecord(3 * ns, 9 * ns, np.eye(3), np.array([1.0, 0, 0]), True, 'ok'),
    ]
    rows, summary = pose_report.evaluate(records, traj, max_dt=0.02)
    assert rows[0]['rotation_error_deg'] == pytest.approx(0, abs=1e-6)
    assert rows[0]['translation_error_deg'] == pytest.approx(0, abs=1e-5)
    assert rows[1]['translation_error_deg'] == pytest.approx(180, abs=1e-5)  # sign matters
    assert rows[2]['rotation_error_deg'] == pytest.approx(3.0, abs=1e-6)
    assert rows[3]['pose_error_deg'] is None and rows[3]['gt']  # invalid: a failure
    assert not rows[4]['gt']  # stamp 9 s has no ground truth: not scored
    assert rows[1]['gt_baseline_m'] == pytest.approx(0.1)
    assert summary['pairs'] == 5 and summary['pairs_with_gt'] == 4 and summary['valid'] == 4
    # errors 0, 180, 3, inf -> AUC@5 = (area of the 0-error step + the 3-degree step) / 5
    expected = pose_report.pose_auc([0.0, 180.0, 3.0, float('inf')], (5, 10, 20))
    assert summary['auc@5'] == pytest.approx(expected['auc@5'])
    assert 0.25 < summary['auc@5'] < 0.5
    # The table says whether each 'ok' was right: the 180-degree one is not.
    assert [r.get('verdict') for r in rows] == ['right', 'WRONG 180°', 'right', '-', None]
    table = pose_report.format_table(rows)
    assert 'WRONG 180°' in table.splitlines()[2] and table.splitlines()[2].endswith('ok')


def test_relative_pose_message_record_round_trip():
    dm = pytest.importorskip('dense_match_ros.msg')
    msg = dm.RelativePose()
    R = Rotation.from_rotvec([0.01, 0.2, -0.03])
    x, y, z, w = R.as_quat()
    msg.rotation.x, msg.rotation.y, msg.rotation.z, msg.rotation.w = x, y, z, w
    msg.translation.x = 1.0
    msg.valid, msg.status = True, 'ok'
    msg.header.stamp.sec, msg.source_stamp.sec, msg.source_stamp.nanosec = 5, 4, 500
    rec = pose_report.record_from_relative_pose(msg)
    assert (rec.source_stamp_ns, rec.target_stamp_ns) == (4_000_000_500, 5_000_000_000)
    np.testing.assert_allclose(rec.R, R.as_matrix(), atol=1e-12)
    assert rec.valid and rec.t.tolist() == [1.0, 0.0, 0.0]


# --------------------------------------------------------------------------- replay


@pytest.fixture(scope='module')
def tiny_bag(tmp_path_factory):
    pytest.importorskip('rclpy')
    from dense_match_ros.ros.tools import make_bag
    out = tmp_path_factory.mktemp('replay') / 'syn'
    assert make_bag.main(['-o', str(out), '--frames', '5', '--size', '128x96']) == 0
    return out


def test_replay_writes_outputs_and_a_scored_report(tiny_bag, tmp_path, capsys):
    from dense_match_ros.ros import convert
    from dense_match_ros.ros.tools import bag_io
    out = tmp_path / 'out'
    params = tmp_path / 'params.yaml'
    params.write_text('dense_match_node:\n  ros__parameters:\n    method: dis\n'
                      '    device: cpu\n    pose.min_inliers: 20\n')
    rc = replay.main([str(tiny_bag), '-o', str(out), '--params', str(params),
                      '--groundtruth', str(tiny_bag / 'groundtruth.txt'), '--storage', 'mcap',
                      '--report', str(tmp_path / 'report'), '--no-progress'])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    with bag_io.BagReader(out) as r:
        topics = r.topics
        rel = [m.to_ros() for m in r.messages(['/dense_match/relative_pose'])]
        flow = next(r.messages(['/dense_match/flow'])).to_ros()
    for name in ('flow', 'matchability', 'flow_color', 'match_result', 'relative_pose'):
        assert topics[f'/dense_match/{name}'].count == 4, name
    assert topics['/dense_match/flow'].msgtype == bag_io.IMAGE
    assert topics['/dense_match/relative_pose'].msgtype == bag_io.RELATIVE_POSE
    assert (flow.encoding, flow.width, flow.height) == ('32FC2', 128, 96)
    # Output stamps: each result is stamped with its target frame; sources are the previous.
    assert [convert.stamp_to_ns(m.header.stamp) for m in rel] == \
        [1_033_333_333, 1_066_666_667, 1_100_000_000, 1_133_333_333]
    assert [convert.stamp_to_ns(m.source_stamp) for m in rel] == \
        [1_000_000_000, 1_033_333_333, 1_066_666_667, 1_100_000_000]
    n_valid = sum(m.valid for m in rel)
    assert topics.get('/dense_match/pose', bag_io.TopicSummary('', 0)).count == n_valid

    report = json.loads((tmp_path / 'report' / 'report.json').read_text())
    assert report['config']['pose_options'] == {'min_inliers': 20}
    assert report['summary']['pairs'] == 4 and report['summary']['pairs_with_gt'] == 4
    assert n_valid >= 3  # 5 cm sideways per frame in a 2-4.5 m room: plenty of parallax
    for row in report['pairs']:
        if row['valid']:
            assert np.isfinite(row['rotation_error_deg']) and row['rotation_error_deg'] < 2
            assert np.isfinite(row['translation_error_deg']) and row['translation_error_deg'] < 20
        assert row['match_ms'] > 0 and row['total_ms'] >= row['match_ms']
    assert 0 < report['summary']['auc@20'] <= 1
    assert report['timings']['match']['n'] == 4
    for f in ('pose_errors.png', 'timing.png', 'flow/pair_000.png'):
        assert (tmp_path / 'report' / f).stat().st_size > 1000, f
    assert 'AUC@5' in printed and 'median' in printed


def test_replay_counts_rejected_frames_and_flow_only_without_camera_info(tmp_path):
    pytest.importorskip('rclpy')
    from dense_match_ros.ros import convert
    from dense_match_ros.ros.tools import bag_io, make_bag
    frames, intr, _ = make_bag.synthetic_sequence(4, (64, 48))
    bag = tmp_path / 'in'
    with bag_io.BagWriter(bag) as w:
        for i, f in enumerate(frames):
            msg = convert.make_image_msg(f.pixels, 'rgb8', f.stamp_ns, 'cam')
            if i == 2:
                msg.encoding = 'yuv422_weird'  # the node drops it with a reason; so must replay
            w.write('/cam/image', msg, f.stamp_ns)
    result = replay.replay(bag, tmp_path / 'out', replay.PipelineConfig(device='cpu'),
                           progress=False, log=lambda *_: None)
    assert result.rejected == {'unknown_encoding': 1}
    assert [r['status'] for r in result.rows] == ['no_camera_info'] * 2
    assert result.counts['/dense_match/flow'] == 2
    assert '/dense_match/pose' not in result.counts


def test_replay_refuses_ambiguous_topics(tmp_path, capsys):
    pytest.importorskip('rclpy')
    from dense_match_ros.ros import convert
    from dense_match_ros.ros.tools import bag_io
    with bag_io.BagWriter(tmp_path / 'in') as w:
        img = convert.make_image_msg(np.zeros((20, 20, 3), np.uint8), 'rgb8', 1, 'c')
        w.write('/a/image', img, 1)
        w.write('/b/image', img, 1)
    assert replay.main([str(tmp_path / 'in'), '--no-progress']) == 2
    assert '2 image topics' in capsys.readouterr().err


# --------------------------------------------------------------------------- launch


def test_replay_launch_starts_node_and_bag_player(tmp_path, monkeypatch):
    """launch/replay.launch.py: the node comes up and `ros2 bag play BAG --rate R` is run.

    There is no ros2 CLI in a pip venv, so a stand-in `ros2` on PATH records its arguments;
    the node is the real one, resolved through a throw-away ament prefix.
    """
    import os
    import random
    import sys
    from pathlib import Path
    from conftest import REPO_ROOT
    kit = Path(os.environ.get('ROS_LAUNCH_KIT', REPO_ROOT.parent / 'shared' / 'ros_launch_kit'))
    if not kit.is_dir():
        pytest.skip(f'{kit} absent')
    pytest.importorskip('launch_ros', reason=f'run: bash {kit}/install.sh VENV')
    from launch import LaunchDescription, LaunchService
    from launch.actions import (IncludeLaunchDescription, RegisterEventHandler, Shutdown,
                                TimerAction)
    from launch.event_handlers import OnProcessExit, OnProcessStart
    from launch.launch_description_sources import AnyLaunchDescriptionSource

    prefix = tmp_path / 'prefix'
    (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages').mkdir(parents=True)
    (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'dense_match_ros').touch()
    (prefix / 'lib' / 'dense_match_ros').mkdir(parents=True)
    exe = prefix / 'lib' / 'dense_match_ros' / 'dense_match_node'
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dense_match_ros.ros.node "$@"\n')
    exe.chmod(0o755)
    bindir = tmp_path / 'bin'
    bindir.mkdir()
    calls = tmp_path / 'ros2_calls.txt'
    fake = bindir / 'ros2'
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nsleep 0.2\n')
    fake.chmod(0o755)
    monkeypatch.setenv('PATH', f'{bindir}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setenv('AMENT_PREFIX_PATH', f'{prefix}{os.pathsep}{sys.prefix}')
    monkeypatch.setenv('PYTHONPATH', str(REPO_ROOT))
    monkeypatch.setenv('ROS_DOMAIN_ID', str(random.randint(1, 100)))
    monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    monkeypatch.setenv('ROS_LOG_DIR', str(tmp_path / 'log'))

    started, died = [], []
    ls = LaunchService(argv=[], noninteractive=True)
    ls.include_launch_description(LaunchDescription([
        RegisterEventHandler(OnProcessStart(on_start=lambda ev, ctx: started.append(
            ev.action.process_details['name']))),
        RegisterEventHandler(OnProcessExit(on_exit=lambda ev, ctx: None if ctx.is_shutdown
                                           else died.append((ev.process_name, ev.returncode)))),
        IncludeLaunchDescription(
            AnyLaunchDescriptionSource(str(REPO_ROOT / 'launch' / 'replay.launch.py')),
            launch_arguments={'bag': '/data/run1', 'rate': '0.5', 'loop': 'true',
                              'start_delay': '0.5', 'device': 'cpu', 'record': 'true',
                              'namespace': 'dm'}.items()),
        TimerAction(period=6.0, actions=[Shutdown(reason='test done')])]))
    assert ls.run() == 0
    assert any(name.startswith('dense_match_node') for name in started), started
    lines = calls.read_text().splitlines()
    assert 'bag play /data/run1 --rate 0.5 --loop' in lines
    record = next(line for line in lines if line.startswith('bag record'))
    assert '/dm/flow' in record and '/dm/relative_pose' in record and '/diagnostics' in record
    # the player and recorder stand-ins exit on their own; the node must still be running
    assert [d for d in died if not d[0].startswith('bag_')] == []


def _synthetic_bag(path, n=5, size=(96, 72), info_after=False, corrupt_index=None):
    """A synthetic moving-camera bag; camera_info after its image when ``info_after``;
    the image ``corrupt_index`` stored with half of its bytes."""
    from rclpy.serialization import serialize_message
    from dense_match_ros.ros import convert
    from dense_match_ros.ros.tools import bag_io, make_bag
    frames, intr, _ = make_bag.synthetic_sequence(n, size)
    with bag_io.BagWriter(path) as w:
        for i, f in enumerate(frames):
            img = convert.make_image_msg(f.pixels, 'rgb8', f.stamp_ns, 'cam')
            info = make_bag.camera_info_msg(intr, f.stamp_ns, 'cam')
            if not info_after:
                w.write('/cam/camera_info', info, f.stamp_ns)
            if i == corrupt_index:
                raw = serialize_message(img)
                w.write('/cam/image', raw[:len(raw) // 2], f.stamp_ns, msgtype=bag_io.IMAGE)
            else:
                w.write('/cam/image', img, f.stamp_ns)
            if info_after:
                w.write('/cam/camera_info', info, f.stamp_ns + 1)
    return path


def test_replay_skips_a_corrupt_message_names_it_and_replays_the_rest(tmp_path):
    pytest.importorskip('rclpy')
    bag = _synthetic_bag(tmp_path / 'in', n=5, corrupt_index=2)
    result = replay.replay(bag, tmp_path / 'out', replay.PipelineConfig(device='cpu'),
                           progress=False, log=lambda *_: None, report_dir=tmp_path / 'rep')
    assert result.rejected.get('corrupt_message') == 1
    assert len(result.corrupt) == 1 and result.corrupt[0]['topic'] == '/cam/image'
    assert result.corrupt[0]['timestamp_ns'] > 0 and result.corrupt[0]['reason']
    assert len(result.rows) == 3          # 4 good frames -> 3 pairs
    report = json.loads((tmp_path / 'rep' / 'report.json').read_text())
    assert report['corrupt'] == result.corrupt and report['summary']['corrupt_messages'] == 1


def test_camera_info_stored_after_its_image_still_gives_every_pair_a_pose_attempt(tmp_path):
    pytest.importorskip('rclpy')
    bag = _synthetic_bag(tmp_path / 'in', n=5, info_after=True)
    result = replay.replay(bag, tmp_path / 'out', replay.PipelineConfig(device='cpu'),
                           progress=False, log=lambda *_: None)
    assert len(result.rows) == 4
    assert all(r['status'] != 'no_camera_info' for r in result.rows), [r['status'] for r in result.rows]


def test_unreadable_bags_and_existing_outputs_end_in_one_line(tmp_path, capsys):
    pytest.importorskip('rclpy')
    junk = tmp_path / 'junk.mcap'
    junk.write_bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    assert replay.main([str(junk), '-o', str(tmp_path / 'o1'), '--no-progress']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'junk.mcap' in err and 'Traceback' not in err
    bag = _synthetic_bag(tmp_path / 'in', n=3)
    out = tmp_path / 'out'
    assert replay.main([str(bag), '-o', str(out), '--no-progress', '-p', 'device=cpu']) == 0
    capsys.readouterr()
    assert replay.main([str(bag), '-o', str(out), '--no-progress', '-p', 'device=cpu']) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert replay.main([str(bag), '-o', str(out), '--no-progress', '-p', 'device=cpu',
                        '--overwrite']) == 0
