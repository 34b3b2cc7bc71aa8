#!/usr/bin/env python3
"""Where a node's memory goes: one DDS traffic pattern in isolation, RSS every 20 s.

    rss_probe.py publish --minutes 8   # build + publish 640x480 32FC2 flow images at 10 Hz
    rss_probe.py receive --minutes 7   # receive + decode 640x480 rgb8 frames at 30 Hz

Each mode starts the other end in a child process (a raw subscriber, or a camera publisher)
in a private ROS domain and prints this process's RSS (README, "Latency and endurance").
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOPIC = '/rss_probe/data'


def _qos():
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    return QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE,
                      history=HistoryPolicy.KEEP_LAST)


def _peer(role: str, minutes: float) -> None:
    """The other end: a raw subscriber of the flow, or a 30 Hz camera publisher."""
    try:
        _run_peer(role, minutes)
    except Exception:  # terminated by the probe: rclpy's context is gone mid-call
        pass


def _run_peer(role: str, minutes: float) -> None:
    import rclpy
    from sensor_msgs.msg import Image
    rclpy.init()
    node = rclpy.create_node(f'rss_probe_{role}')
    end = time.monotonic() + minutes * 60
    if role == 'sink':
        node.create_subscription(Image, TOPIC, lambda raw: None, _qos(), raw=True)
        while time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=0.2)
        return
    from dense_match_ros.ros.tools.soak_inputs import camera_frames, image_msg, set_stamp
    pub = node.create_publisher(Image, TOPIC, _qos())
    msgs = [image_msg(f, 0) for f in camera_frames(10, (640, 480))]
    i = 0
    while time.monotonic() < end:
        msg = msgs[i % len(msgs)]
        set_stamp(msg, time.time_ns())
        pub.publish(msg)
        i += 1
        time.sleep(1 / 30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('mode', choices=('publish', 'receive', 'sink', 'camera'))
    p.add_argument('--minutes', type=float, default=5.0)
    args = p.parse_args()
    if args.mode in ('sink', 'camera'):
        _peer(args.mode, args.minutes)
        return 0
    os.environ.setdefault('ROS_DOMAIN_ID', str(random.randint(1, 100)))
    peer = subprocess.Popen([sys.executable, __file__, 'sink' if args.mode == 'publish'
                             else 'camera', '--minutes', str(args.minutes + 0.5)])
    import numpy as np
    import rclpy
    from sensor_msgs.msg import Image
    from dense_match_ros.ros import convert
    from dense_match_ros.ros.tools.node_process import rss_mb
    rclpy.init()
    node = rclpy.create_node('rss_probe')
    count = [0]
    if args.mode == 'publish':
        pub = node.create_publisher(Image, TOPIC, _qos())
        flow = np.random.default_rng(0).random((480, 640, 2), dtype=np.float32)
    else:
        def on_frame(msg) -> None:
            convert.decode_image(msg, False)
            count[0] += 1
        node.create_subscription(Image, TOPIC, on_frame, _qos())
    start = time.monotonic()
    report = start
    try:
        while time.monotonic() - start < args.minutes * 60:
            if args.mode == 'publish':
                flow += 0.001
                pub.publish(convert.make_image_msg(flow, '32FC2', count[0] + 1, 'probe'))
                count[0] += 1
                time.sleep(0.1)
            else:
                rclpy.spin_once(node, timeout_sec=0.1)
            if time.monotonic() >= report:
                print(f'{time.monotonic() - start:6.0f} s  {count[0]:6d} messages  '
                      f'rss {rss_mb(os.getpid()):.1f} MB', flush=True)
                report += 20
    finally:
        peer.terminate()
        peer.wait()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
