"""dense-match-bench on tiny inputs: entries, record, and the timing helper itself."""
import json

import numpy as np
import pytest
import torch

from dense_match_ros.core.networks.dgc import DgcNet, DgcNetConfig
from dense_match_ros.evaluation import bench_match
from dense_match_ros.training import checkpoint as ckpt
from dense_match_ros.training.dgc_task import DgcTask


def test_timed_reports_the_median_of_n_calls():
    calls = []
    res = bench_match.timed(lambda: calls.append(1), n=7, warmup=2)
    assert len(calls) == 9 and res['n'] == 7
    assert 0 <= res['p10_ms'] <= res['median_ms'] <= res['p90_ms']


def test_sizes_parse_as_height_by_width():
    assert bench_match.parse_size('320x240') == (240, 320)   # WIDTHxHEIGHT in, (H, W) out
    with pytest.raises(Exception):
        bench_match.parse_size('240')


def test_cli_times_match_and_network(tmp_path, capsys):
    torch.manual_seed(0)
    net = DgcNet(DgcNetConfig(width=0.125, input_size=(32, 32)))
    cfg = DgcTask().model_config({**net.config.__dict__, 'input_size': [32, 32]})
    weights = tmp_path / 'dgc_tiny.pt'
    ckpt.export_weights({'method': 'dgc', 'step': 1, 'config': {'model': cfg},
                         'model': net.state_dict()}, weights, {'note': 'test'}, half=False)
    out = tmp_path / 'bench.json'
    assert bench_match.main(['--method', 'dis', '--method', 'dgc', '--weights', f'dgc={weights}',
                             '--random-weights', '--sizes', '40x24,32x32', '--n', '2',
                             '--network', '--threads', '1', '--json', str(out)]) == 0
    rec = json.loads(out.read_text())
    assert set(rec['results']) == {'dis', 'dgc'}
    assert set(rec['results']['dis']['match']) == {'40x24', '32x32'}
    assert 'network' not in rec['results']['dis']           # no network to time
    assert set(rec['results']['dgc']['network']) == {'40x24 fp32', '32x32 fp32'}
    assert rec['results']['dgc']['match']['32x32']['median_ms'] > 0
    assert '| dgc | net 32x32 fp32 |' in capsys.readouterr().out


def test_options_reach_the_matcher_and_the_record(tmp_path):
    out = tmp_path / 'bench.json'
    assert bench_match.main(['--method', 'dis', '--option', 'preset=fast',
                             '--option', 'fb_sigma=2', '--sizes', '24x40', '--n', '2',
                             '--json', str(out)]) == 0
    assert json.loads(out.read_text())['options'] == {'preset': 'fast', 'fb_sigma': 2}
    with pytest.raises(ValueError, match='preset must be one of'):
        bench_match.main(['--method', 'dis', '--option', 'preset=slow', '--sizes', '24x40',
                          '--n', '1'])


def test_busy_processes_slow_down_is_measured_and_they_are_stopped(tmp_path):
    out = tmp_path / 'b.json'
    assert bench_match.main(['--method', 'dis', '--sizes', '64x48', '--n', '3', '--busy', '1',
                             '--json', str(out)]) == 0
    rec = json.loads(out.read_text())['results']['dis']
    assert set(rec['match_busy1']) == {'64x48'} and rec['slowdown_busy']['64x48'] > 0
    import subprocess
    left = subprocess.run(['pgrep', '-f', 'a = \\(a @ a\\)'], capture_output=True, text=True)
    assert left.stdout.strip() == ''


def test_the_shifted_pair_is_one_dis_settles_and_the_turned_one_is_not(tmp_path):
    """``--pair shifted``: the next frame of a slow camera (DIS's round trip closes almost
    everywhere); the default turned pair moves part of the view out, so a method that hands
    settled pairs to DIS (``neuflow-fast``) runs its network on it."""
    from dense_match_ros.core.dis_presets import create_dis, two_way_flow
    from dense_match_ros.core.geometry import grid
    open_share = {}
    for kind in bench_match.PAIRS:
        source, target = bench_match.photo_pair((120, 160), kind)
        assert source.shape == target.shape == (120, 160, 3)
        forward, backward = two_way_flow(create_dis('medium'), source, target, (160, 120))
        open_share[kind] = float(np.mean(grid.forward_backward_error(forward, backward) > 3.0))
    assert open_share['shifted'] < 0.05 < open_share['turned'], open_share
    out = tmp_path / 's.json'
    assert bench_match.main(['--method', 'dis', '--pair', 'shifted', '--sizes', '64x48',
                             '--n', '2', '--json', str(out)]) == 0
    assert json.loads(out.read_text())['pair'] == 'shifted'
    with pytest.raises(ValueError, match='pair must be one of'):
        bench_match.photo_pair((48, 64), 'spun')
