"""``dense-match-node`` as a child process in a ROS domain of its own, for the tools that
measure it from outside (the demo, the soak).

Running the node in another process is the point: latency then includes DDS transport and
serialisation as on a robot, and the node's memory can be read from ``/proc`` without the
measuring side's allocations mixed in.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from dense_match_ros import paths

# The checkout the tools run in (None for an installed package without one): its code is
# what the node subprocess must run, whatever copy is installed in the venv.
REPO_ROOT = paths.repo_root()


LARGE_DATA = {'FASTDDS_BUILTIN_TRANSPORTS': 'LARGE_DATA'}
"""Fast DDS's large-data transport (README, "Camera streams and DDS"): both ends need it."""


def ros_env(out: Path, domain: int | None = None, large_data: bool = False) -> dict[str, str]:
    """The environment for the node and the measuring process: one isolated ROS domain
    (random unless given), discovery limited to this machine, logs under ``out``;
    ``large_data``: with :data:`LARGE_DATA` (else the transports are left as they are)."""
    env = dict(os.environ)
    domain = domain or random.randint(1, 100)
    env.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               ROS_LOG_DIR=str(out / 'ros_log'), PYTHONUNBUFFERED='1')
    if large_data:
        # With discovery limited to this host, Fast DDS falls back to its default transports
        # (a 2.4 MB flow: 38 ms between two processes either way, 6 ms with this one).
        env.update(LARGE_DATA)
        env.pop('ROS_AUTOMATIC_DISCOVERY_RANGE')
    if REPO_ROOT is not None:
        env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get(
            'PYTHONPATH', '').split(os.pathsep) if p])
    return env


def adopt_ros_env(env: dict[str, str]) -> None:
    """Make this process join the node's domain (call before ``rclpy.init``)."""
    for key in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_LOG_DIR', *LARGE_DATA):
        if key in env:
            os.environ[key] = env[key]
        else:
            os.environ.pop(key, None)


def start_node(out: Path, env: dict[str, str], params: Sequence[str],
               remaps: Sequence[str] = ()) -> tuple[subprocess.Popen, Path]:
    """Start the node with ``-p name:=value`` parameters and ``-r from:=to`` remappings; its
    output goes to ``out/node.log``."""
    cmd = [sys.executable, '-m', 'dense_match_ros.ros.node', '--ros-args']
    for r in remaps:
        cmd += ['-r', r]
    for p in params:
        cmd += ['-p', p]
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / 'node.log'
    log_file = open(log_path, 'w')  # noqa: SIM115 - handed to the child, closed on exit
    proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT or Path.cwd()), env=env, stdout=log_file,
                            stderr=subprocess.STDOUT)
    log_file.close()
    return proc, log_path


def stop_node(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGINT like Ctrl-C, then SIGKILL; the return code, or None when it had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MiB (None once it is gone)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def log_tail(path: Path, n: int = 15) -> str:
    try:
        return '\n'.join(path.read_text(errors='replace').splitlines()[-n:])
    except OSError:
        return ''
