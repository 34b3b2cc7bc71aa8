"""dense-match-soak in CI size: two minutes of a camera stream with the bad-input catalogue
replayed into one node process, which must keep answering without a restart and hold its
memory (the hour-long run is in the README; this one guards the tool and the behaviour)."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bad_inputs import CASES
from conftest import REPO_ROOT
from dense_match_ros.ros.tools.soak_inputs import BAD_INPUTS, camera_frames

pytest.importorskip('rclpy')


def test_the_soak_replays_the_node_rows_of_the_bad_input_catalogue():
    """Every warning tag the catalogue promises for a streamed input is one the soak sends,
    except the compressed-only one (the soak streams raw images)."""
    tags = {t for c in CASES if c.where == 'node' for t in re.findall(r'`\[(\w+)\]`', c.answer)}
    sent = {b.reason for b in BAD_INPUTS}
    assert sent <= tags, sent - tags
    assert tags - sent <= {'decode_failed', 'no_camera_info'}, tags - sent


def test_camera_frames_loop_without_a_jump():
    frames = camera_frames(12, (64, 48))
    assert len(frames) == 12 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    step = [np.abs(frames[i].astype(int) - frames[(i + 1) % 12]).mean() for i in range(12)]
    assert max(step) < 3 * np.median(step)  # the wrap is an ordinary step
    assert min(step) > 0.5                  # and the camera does move


def test_two_minute_soak_keeps_answering_through_bad_inputs_and_holds_memory(tmp_path):
    out = tmp_path / 'soak'
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, '-m', 'dense_match_ros.ros.tools.soak', '--minutes', '2',
         '--rate', '15', '--size', '320x240', '--bad-every', '6', '--sample', '5',
         '--warmup', '30', '--max-rss-growth', '5', '--out', str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / 'soak.json').read_text())
    assert summary['failures'] == []
    # Liveness, not speed: a stalled node answers nothing. The fraction itself is the default
    # method's speed on the machine (0.19 for neuflow-fast on a 2-core AVX2 machine without
    # bf16, a training job on the other core; frames it cannot take in time are dropped).
    assert summary['outputs'] > 100 and summary['answered_fraction'] > 0.12
    # The whole catalogue went in (the 64 MB frame during the warm-up only); each one was
    # named in the node's log and flow came again after it.
    bad = summary['bad_inputs']
    assert {b['reason'] for b in bad} == {b.reason for b in BAD_INPUTS}
    assert all(b['named_in_log'] for b in bad)
    assert all(b['resumed_after_s'] is not None and b['resumed_after_s'] < 10 for b in bad[:-1])
    huge = [b for b in bad if b['reason'] == 'image_too_large']
    assert len(huge) == 1 and huge[0]['t_s'] < summary['warmup_s']
    # RSS every sample, its growth after the warm-up bounded; latency and stages measured.
    with open(out / 'samples.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 20 and all(float(r['rss_mb']) > 50 for r in rows)
    assert summary['rss_mb']['growth_after_warmup_pct'] < 5
    assert 0 < summary['latency_ms']['p50'] < summary['latency_ms']['p99'] < 5000
    assert summary['dis_medium_call_ms'] > 0 and summary['latency_over_dis_call'] > 1
    assert summary['dis_medium_call_default_threads_ms'] > 0
    assert {'match', 'pose', 'flow_publish'} <= set(summary['stages_ms'])
    assert (out / 'soak.png').stat().st_size > 10_000
    assert 'latency (publish -> flow receipt' in proc.stdout
