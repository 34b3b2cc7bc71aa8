"""Bad input never kills the node nor loses the stream, and each cause is logged, throttled.

One node process serves the module (start-up costs seconds); every test sends valid frames,
then the bad input several times in a row, then valid frames again, and asserts that
* the node still runs and publishes flow for the valid frames after the bad ones,
* the log carries the cause-specific warning, once for the burst (throttled).
Frames are small (160x120) except where size is the point.
"""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from test_node import (Client, NodeProcess, Stamps, _set_param, camera_info, compressed_msg,
                       image_msg, render, start)
from dense_match_ros.ros import convert

W, H = 160, 120
FRAME = 'cam_optical'
NODE = '/dm_robust/dense_match_node'


@pytest.fixture(scope='module')
def robust():
    # A long throttle period: every burst below must give exactly one line however slow.
    node, client = start('/dm_robust', {'pose.max_correspondences': 300,
                                        'warn_throttle_s': 60.0}, prime_size=(W, H))
    stamps = Stamps()
    client.publish_info(camera_info(W, H, stamps.ns, FRAME))
    time.sleep(0.3)
    yield node, client, stamps
    client.close()
    rc = node.stop()
    assert rc in (0, -signal.SIGINT, 130), f'node exited with {rc}; log:\n{node.log}'


def _valid(client: Client, stamps: Stamps, n: int, size=(W, H), expect: int | None = None,
           start_x: float = 0.0) -> list[int]:
    """Send n valid frames, paced; assert flow for the last ``expect`` (default n-1) of them."""
    w, h = size
    sent = []
    expect = n - 1 if expect is None else expect
    for i in range(n):
        stamp = stamps.next()
        client.publish(image_msg(render(w, h, start_x + 0.03 * i), stamp, FRAME))
        sent.append(stamp)
        if i < n - expect:
            time.sleep(0.3)
        else:
            assert client.wait_stamp('flow', stamp, timeout=15.0), f'no flow for frame {i}'
    return sent


def _burst(client: Client, make, count: int = 4) -> None:
    for _ in range(count):
        client.publish(make())
        time.sleep(0.05)
    time.sleep(0.3)


def _check_after(node: NodeProcess, tag: str, text: str) -> None:
    assert node.alive(), node.log
    assert node.wait_for_log(f'[{tag}]', timeout=5.0), node.log
    lines = [line for line in node.lines if f'[{tag}]' in line]
    assert len(lines) == 1, lines  # a burst of 4 -> one warning (throttled)
    assert text in lines[0], lines[0]
    assert 'WARN' in lines[0]


def test_unknown_encoding(robust):
    node, client, stamps = robust
    _valid(client, stamps, 2)

    def bad():
        msg = image_msg(render(W, H, 0.0), stamps.next(), FRAME)
        msg.encoding = 'yuv422_yuy2'
        return msg
    _burst(client, bad)
    _valid(client, stamps, 3, expect=3)  # the reference frame survived the bad ones
    _check_after(node, 'unknown_encoding', "unknown image encoding 'yuv422_yuy2'")


def test_step_height_mismatch(robust):
    node, client, stamps = robust
    _valid(client, stamps, 2)

    def bad():
        msg = image_msg(render(W, H, 0.0), stamps.next(), FRAME)
        msg.data = msg.data[:-W * 3]  # one row short
        return msg
    _burst(client, bad)
    _valid(client, stamps, 3, expect=3)
    _check_after(node, 'bad_data_size', f'step*height != len(data): {W * 3}*{H} = '
                                         f'{W * 3 * H} but data has {W * 3 * (H - 1)} bytes')


def test_size_change_mid_stream(robust):
    node, client, stamps = robust
    _valid(client, stamps, 2)
    client.publish_info(camera_info(2 * W, 2 * H, stamps.ns, FRAME))
    time.sleep(0.2)
    # The first frame at the new size restarts the sequence; then output resumes.
    sent = _valid(client, stamps, 3, size=(2 * W, 2 * H), expect=2)
    flows = [m for m in client.received['flow']
             if convert.stamp_to_ns(m.header.stamp) in sent]
    assert [(m.width, m.height) for m in flows] == [(2 * W, 2 * H)] * 2
    _check_after(node, 'size_changed', f'image size changed from {W}x{H} to {2 * W}x{2 * H}')
    client.publish_info(camera_info(W, H, stamps.ns, FRAME))
    time.sleep(0.2)
    _valid(client, stamps, 2)


def test_zero_camera_info(robust):
    node, client, stamps = robust
    _valid(client, stamps, 2)
    for _ in range(3):
        client.publish_info(camera_info(W, H, stamps.ns, FRAME, zero=True))
        time.sleep(0.05)
    time.sleep(0.2)
    sent = _valid(client, stamps, 3, expect=3)
    assert client.wait_stamp('relative_pose', sent[-1])
    rel = [m for m in client.received['relative_pose']
           if convert.stamp_to_ns(m.header.stamp) == sent[-1]][0]
    assert not rel.valid and rel.status.startswith('no_camera_info')
    assert sent[-1] not in client.stamps('pose')  # no standard pose without calibration
    _check_after(node, 'zero_camera_info', 'camera_info K is all zeros')
    # A valid camera_info brings the pose back.
    client.publish_info(camera_info(W, H, stamps.ns, FRAME))
    time.sleep(0.3)
    sent = _valid(client, stamps, 2, expect=2)
    assert client.wait_stamp('pose', sent[-1], timeout=10.0)


def test_stamps_backwards_resets(robust):
    node, client, stamps = robust
    _valid(client, stamps, 2)
    stamps.ns -= 60_000_000_000  # a bag loop: one minute back
    sent = _valid(client, stamps, 3, expect=2)
    rels = {convert.stamp_to_ns(m.header.stamp): m for m in client.received['relative_pose']}
    # The first frame after the jump is a new reference, not matched against the old one.
    assert sent[0] not in client.stamps('flow')
    assert convert.stamp_to_ns(rels[sent[1]].source_stamp) == sent[0]
    _check_after(node, 'stamp_backwards', 'stamp went backwards by 59.9')
    stamps.ns += 120_000_000_000  # back ahead of every stamp used so far
    _valid(client, stamps, 2)


def test_tiny_image_refused(robust):
    node, client, stamps = robust
    _valid(client, stamps, 2)
    _burst(client, lambda: image_msg(np.zeros((1, 1, 3), np.uint8), stamps.next(), FRAME))
    _valid(client, stamps, 3, expect=3)
    _check_after(node, 'image_too_small', 'image 1x1 is smaller than min_image_side=16')


def test_huge_image_refused_unless_allowed(robust):
    node, client, stamps = robust
    _valid(client, stamps, 2)
    huge = image_msg(np.zeros((1, 1, 3), np.uint8), 0, FRAME)
    # 8000x8000 mono8 = 64 MB over DDS; sent once (the throttling is shown elsewhere).
    from sensor_msgs.msg import Image
    import array
    big = Image()
    big.header.frame_id = FRAME
    big.header.stamp = convert.stamp_msg(stamps.next())
    big.height = big.width = 8000
    big.encoding, big.step = 'mono8', 8000
    data = array.array('B')
    data.frombytes(bytes(8000 * 8000))
    big.data = data
    del huge
    client.publish(big)
    assert node.wait_for_log('[image_too_large]', timeout=30.0), node.log
    _valid(client, stamps, 3, expect=3)
    _check_after(node, 'image_too_large',
                 'image 8000x8000 (64000000 pixels) exceeds max_image_pixels=16777216')
    # The limit is a parameter: below the valid frames' size they are refused, then allowed.
    res = _set_param(client, NODE, 'max_image_pixels', W * H - 1)
    assert res.successful, res.reason
    refused = []
    for i in range(2):
        refused.append(stamps.next())
        client.publish(image_msg(render(W, H, 0.03 * i), refused[-1], FRAME))
        time.sleep(0.3)
    time.sleep(0.5)
    res = _set_param(client, NODE, 'max_image_pixels', 4096 * 4096)
    assert res.successful, res.reason
    _valid(client, stamps, 3, expect=3)
    assert not set(refused) & set(client.stamps('flow'))
    # The refusals of the same cause inside the throttle period were not logged again ...
    assert node.count('[image_too_large]') == 1


def test_compressed_input_without_camera_info():
    """jpeg input, never a camera_info: flow flows, pose says no_camera_info (logged once);
    a corrupt jpeg is dropped with its reason and the stream goes on."""
    node, client = start('/dm_nocal', {'compressed': 'true', 'warn_throttle_s': 60.0},
                         prime_size=(W, H))
    try:
        stamps = Stamps()
        sent = []
        for i in range(5):
            if i == 2:
                # The node keeps only the newest frame: send the bad one once it is idle (the
                # last output of the previous pair is out) and the next good one once the bad
                # one is decoded, or a good frame can replace it unread (a slower method is
                # still busy after a fixed pause).
                assert client.wait_stamp('relative_pose', sent[-1], timeout=15.0), node.log
                bad = compressed_msg(render(W, H, 0.0), stamps.next(), FRAME)
                bad.data = bytes(bad.data)[:40]  # truncated: undecodable
                client.publish(bad)
                assert node.wait_for_log('[decode_failed]'), node.log
            sent.append(stamps.next())
            client.publish(compressed_msg(render(W, H, 0.03 * i), sent[-1], FRAME))
            if i == 0:
                time.sleep(0.4)
            else:
                assert client.wait_stamp('flow', sent[-1], timeout=15.0), node.log
        for s in sent[1:]:
            assert client.wait_stamp('relative_pose', s)
            assert client.wait_stamp('matchability', s)
        assert all(not m.valid and m.status == 'no_camera_info'
                   for m in client.received['relative_pose'])
        assert client.received['pose'] == []
        assert node.wait_for_log('[no_camera_info]')
        lines = [line for line in node.lines if '[no_camera_info]' in line]
        assert len(lines) == 1 and "no camera_info received on 'camera_info'" in lines[0]
        assert node.wait_for_log('[decode_failed]'), node.log
        assert node.count('[decode_failed]') == 1
        assert node.alive()
    finally:
        client.close()
        node.stop()


def test_throttle_reports_what_it_swallowed():
    from dense_match_ros.ros.runtime import Throttle
    lines = []
    throttle = Throttle(type('L', (), {'warning': lambda self, m: lines.append(m)})(), 0.2)
    for _ in range(3):
        throttle.warn('bad_step', 'step too small')
    throttle.warn('unknown_encoding', 'yuv')     # another cause is not hidden by the first
    assert lines == ['[bad_step] step too small', '[unknown_encoding] yuv']
    time.sleep(0.25)
    throttle.warn('bad_step', 'step too small')
    assert lines[-1] == '[bad_step] step too small (2 more since the last report)'


def test_help_prints_the_parameters_instead_of_starting_the_node():
    import subprocess
    import sys
    for flags in (['--help'], ['-h'], ['--ros-args', '--help']):
        out = subprocess.run([sys.executable, '-m', 'dense_match_ros.ros.node', *flags],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert 'usage: dense-match-node' in out.stdout and 'process_width' in out.stdout
        assert 'Traceback' not in out.stderr


def test_unset_stamps_are_explained_and_receipt_stamps_fix_them(robust):
    node, client, stamps = robust
    _valid(client, stamps, 2)
    _burst(client, lambda: image_msg(render(W, H, 0.0), 0, FRAME))   # a driver leaving stamp 0
    _check_after(node, 'duplicate_stamp', 'stamp_source:=receipt')
    stamps.ns += 120_000_000_000
    _valid(client, stamps, 2)
    # The same stream with stamp_source receipt: every frame gets a new stamp and is matched.
    node2, client2 = start('/dm_receipt', {'stamp_source': 'receipt'}, prime_size=None)
    try:
        client2.wait_connected()
        for i in range(5):
            client2.publish(image_msg(render(W, H, 0.03 * i), 0, FRAME))
            time.sleep(0.6)
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and len(client2.received['flow']) < 3:
            time.sleep(0.2)
        assert len(client2.received['flow']) >= 3, node2.log
        assert all(convert.stamp_to_ns(m.header.stamp) > 0 for m in client2.received['flow'])
        assert '[duplicate_stamp]' not in node2.log
    finally:
        client2.close()
        node2.stop()


def test_diagnostics_level_follows_recent_behaviour_not_history():
    from diagnostic_msgs.msg import DiagnosticStatus
    from dense_match_ros.ros import messages
    from dense_match_ros.ros.pipeline import Counters
    from dense_match_ros.ros.runtime import RecentCount, Throttle

    def level(counters, recent_rejected=0, recent_warning=''):
        msg = messages.diagnostics_msg('n', 'cpu', {}, counters, 0.1, None, recent_rejected,
                                       recent_warning)
        return msg.status[0].level, msg.status[0].message
    # Stale drops are the newest-frame policy: OK, counted in the message.
    assert level(Counters(dropped_stale=40)) == (DiagnosticStatus.OK,
                                                 'ok (40 frames skipped for newer ones)')
    # Rejections long ago (none recently): OK again; recent ones: WARN.
    assert level(Counters(rejected=7))[0] == DiagnosticStatus.OK
    assert level(Counters(rejected=7), recent_rejected=2)[0] == DiagnosticStatus.WARN
    recent = RecentCount(30.0)
    assert recent.update(5, now=0.0) == 0 and recent.update(7, now=10.0) == 2
    assert recent.update(7, now=45.0) == 0           # nothing new for 35 s
    # The last warning clears after a quiet window.
    class Log:
        def warning(self, text):
            pass
    throttle = Throttle(Log(), 1.0)
    throttle.warn('x', 'something')
    assert throttle.recent(30.0) == 'x: something'
    throttle._last_time -= 60.0
    assert throttle.recent(30.0) == ''
