"""dense-match-demo end to end: bag -> DDS player -> real node process -> recorder -> report.

Each run is a subprocess with the venv's python, in a random ROS domain of its own (the demo
picks one), exactly as a user runs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytest.importorskip('rclpy')
pytest.importorskip('dense_match_ros.msg')


def _demo(tmp_path, *args, data=None, timeout=150):
    env = dict(os.environ)
    env['PYTHONPATH'] = str(REPO_ROOT)
    if data is not None:
        env['DENSE_MATCH_DATA'] = str(data)
    proc = subprocess.run([sys.executable, '-m', 'dense_match_ros.ros.tools.demo', '--out',
                           str(tmp_path / 'demo'), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, tmp_path / 'demo'


def _report(out):
    return json.loads((out / 'report' / 'report.json').read_text())


def test_demo_synthetic_short_sequence(tmp_path):
    # No data folder at all: the demo must fall back to the synthetic sequence by itself.
    proc, out = _demo(tmp_path, '--frames', '6', '--size', '128x96', '--rate', '0.25',
                      data=tmp_path / 'no_data')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'using a synthetic moving-camera sequence' in proc.stdout
    rep = _report(out)
    assert rep['frames_published'] == 6
    assert 1 <= rep['outputs'] <= 5
    assert rep['frames_without_output'] == 5 - rep['outputs']
    assert int(rep['node_diagnostics']['frames_received']) + \
        int(rep['node_diagnostics']['dropped_stale']) == 6  # every frame reached the node
    lat = rep['latency_ms']
    assert len(lat['per_frame']) == rep['outputs'] and 0 < lat['min'] <= lat['median'] < 10_000
    assert rep['recorded_counts']['/dense_match/flow'] == rep['outputs']
    assert rep['recorded_counts']['/dense_match/relative_pose'] == rep['outputs']
    assert rep['summary']['pairs_with_gt'] == rep['outputs']
    valid = [p for p in rep['pairs'] if p['valid']]
    assert valid, rep['pairs']
    for p in valid:  # 5 cm sideways per frame in a small textured room
        assert p['rotation_error_deg'] < 2 and p['translation_error_deg'] < 20
    assert (out / 'report' / 'pose_errors.png').is_file()
    assert (out / 'report' / 'latency.png').is_file()
    assert len(list((out / 'report' / 'flow').glob('*.png'))) == rep['outputs']
    assert 'latency (image publish -> flow receipt): median' in proc.stdout


def test_demo_reports_another_method_beside_the_first(tmp_path):
    """--compare runs the same stream through the node with each named method and prints
    the figures side by side (make demo: the default beside dis)."""
    proc, out = _demo(tmp_path, '--synthetic', '--frames', '4', '--size', '96x72', '--rate',
                      '0.25', '--method', 'dis', '--compare', 'dis', 'cnngeo-affine')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _report(out)['method'] == 'dis'
    other = _report(out / 'compare' / 'cnngeo-affine')
    assert other['method'] == 'cnngeo-affine' and other['outputs'] >= 1
    table = proc.stdout[proc.stdout.rindex('method '):].splitlines()
    assert table[0].split()[:4] == ['method', 'outputs', 'no', 'output']
    assert [line.split()[0] for line in table[1:]] == ['dis', 'cnngeo-affine']  # dis once
    assert table[2].split()[1] == str(other['outputs'])


def test_demo_fails_when_the_node_cannot_start(tmp_path):
    proc, _ = _demo(tmp_path, '--synthetic', '--frames', '3', '--size', '64x48',
                    '-p', 'method:=no_such_method', '--startup-timeout', '30')
    assert proc.returncode == 1
    assert 'FAILED: the node exited during start-up' in proc.stderr
    assert 'no_such_method' in proc.stderr  # the node's own reason, from its log


def test_demo_on_tum_office(tmp_path, shared_data):
    if not (shared_data / 'tum_fr3_office').is_dir():
        pytest.skip('tum_fr3_office absent')
    proc, out = _demo(tmp_path, data=shared_data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout)
    rep = _report(out)
    # 16 frames, the first two before the motion capture starts: 14 played at 30 Hz.
    assert rep['frames_published'] == 14
    assert rep['outputs'] >= 1
    assert rep['summary']['pairs_with_gt'] == rep['outputs']
    assert rep['frames_without_output'] == 13 - rep['outputs']
    assert 'frames without output' in proc.stdout and 'AUC@5' in proc.stdout
