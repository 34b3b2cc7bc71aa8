"""dense-match-eval end to end on tiny inputs: JSON content, table, figures, skipping."""
from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest

from dense_match_ros.core import registry
from dense_match_ros.core.registry import Matcher
from dense_match_ros.evaluation import cli, metrics


@dataclasses.dataclass
class _Pair:
    source: np.ndarray
    target: np.ndarray
    flow: np.ndarray
    valid: np.ndarray


def _shift_pairs(n: int, size=(240, 240), seed=2026):
    """Target = source shifted right by 3 px: flow (3, 0); the left strip is invalid."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        w, h = size
        src = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        tgt = np.zeros_like(src)
        tgt[:, 3:] = src[:, :-3]
        flow = np.zeros((h, w, 2), np.float32)
        flow[..., 0] = 3.0
        valid = np.ones((h, w), bool)
        valid[:, -3:] = False
        pairs.append(_Pair(src, tgt, flow, valid))
    return pairs


class _ShiftMatcher(Matcher):
    """Answers flow (3, 0) everywhere, matchability 1 except the right strip: the truth
    for _shift_pairs, so every metric has a known value."""

    def __init__(self, device='cpu', weights=None, offset: float = 0.0):
        self.offset = offset

    def _match(self, source, target):
        h, w = source.shape[:2]
        flow = np.zeros((h, w, 2), np.float32)
        flow[..., 0] = 3.0 + self.offset
        m = np.ones((h, w), np.float32)
        m[:, -3:] = 0.0
        return flow, m


@pytest.fixture
def fake_synthetic(monkeypatch):
    """A stand-in synthetic module, so these tests pin the CLI's own behaviour."""
    module = types.ModuleType('dense_match_ros.data.synthetic')
    calls = []

    def heldout_pairs(n, size=(240, 240), seed=2026):
        calls.append((n, size, seed))
        return _shift_pairs(n, (24, 16), seed)

    module.heldout_pairs = heldout_pairs
    monkeypatch.setattr(cli, 'synthetic', module)
    registry.register('test_shift', _ShiftMatcher)
    yield calls
    registry._REGISTRY.pop('test_shift', None)


def test_cli_json_on_known_flow(tmp_path, fake_synthetic, capsys):
    out = tmp_path / 'r.json'
    rc = cli.main(['--method', 'test_shift', '--sets', 'synthetic', '--synthetic-n', '2',
                   '--json', str(out), '--no-progress'])
    assert rc == 0
    assert fake_synthetic == [(2, (240, 240), 2026)]     # the fixed held-out set
    rec = json.loads(out.read_text())
    assert rec['method'] == 'test_shift' and rec['device'] == 'cpu'
    assert '--synthetic-n 2' in rec['command']
    assert 'numpy' in rec['versions']
    rows = rec['rows']
    assert [r['pair'] for r in rows] == ['synthetic/000', 'synthetic/001']
    for r in rows:
        assert r['aepe'] == pytest.approx(0.0)
        assert r['pck@1'] == pytest.approx(1.0)
        assert r['jaccard'] == pytest.approx(1.0)
        assert r['match_time_s'] > 0
    s = rec['sets']['synthetic']
    assert s['num_pairs'] == 2 and s['aepe'] == pytest.approx(0.0)
    assert s['pck_curve']['values'][-1] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert 'synthetic/001' in printed and 'AEPE' in printed
    assert '== summary' in printed


def test_cli_summarises_synthetic_pairs_per_kind_of_warp(tmp_path, fake_synthetic, monkeypatch,
                                                         capsys):
    """A parametric matcher is judged on the kinds of warp it can express: the synthetic set's
    summary holds each kind's means beside the set's."""
    def heldout_pairs(n, size=(240, 240), seed=2026):
        pairs = []
        for i, pair in enumerate(_shift_pairs(n, (24, 16), seed)):
            kind = 'affine' if i % 2 == 0 else 'tps'
            if kind == 'tps':   # the truth moves 2 px further: the matcher is 2 px off there
                pair = dataclasses.replace(pair, flow=pair.flow + np.float32([2.0, 0.0]))
            pairs.append(types.SimpleNamespace(**dataclasses.asdict(pair), kind=kind))
        return pairs

    monkeypatch.setattr(cli.synthetic, 'heldout_pairs', heldout_pairs)
    out = tmp_path / 'r.json'
    assert cli.main(['--method', 'test_shift', '--sets', 'synthetic', '--synthetic-n', '4',
                     '--json', str(out), '--no-progress']) == 0
    rec = json.loads(out.read_text())
    assert [r['kind'] for r in rec['rows']] == ['affine', 'tps', 'affine', 'tps']
    s = rec['sets']['synthetic']
    assert s['aepe'] == pytest.approx(1.0)
    assert s['by_kind']['affine']['num_pairs'] == 2
    assert s['by_kind']['affine']['aepe'] == pytest.approx(0.0)
    assert s['by_kind']['tps']['aepe'] == pytest.approx(2.0)
    assert s['by_kind']['tps']['pck@1'] == pytest.approx(0.0)
    overview = capsys.readouterr().out.split('== summary')[-1]
    assert '  affine' in overview and '  tps' in overview


def test_cli_compares_several_methods_with_a_record_each(tmp_path, fake_synthetic, capsys):
    """``--method a,b``: each method in turn (its own JSON), then the summaries side by side;
    per-call figures a matcher reports (``last_run``) land in its rows."""
    class _Counting(_ShiftMatcher):
        def _match(self, source, target):
            self.last_run = {'iterations': 7, 'reason': 'converged'}
            return super()._match(source, target)

    registry.register('test_counting', _Counting)
    try:
        out = tmp_path / 'r.json'
        assert cli.main(['--method', 'test_shift,test_counting', '--sets', 'synthetic',
                         '--synthetic-n', '1', '--json', str(out), '--no-progress']) == 0
    finally:
        registry._REGISTRY.pop('test_counting', None)
    shift = json.loads((tmp_path / 'r_test_shift.json').read_text())
    counting = json.loads((tmp_path / 'r_test_counting.json').read_text())
    assert shift['method'] == 'test_shift' and counting['method'] == 'test_counting'
    assert counting['rows'][0]['run_iterations'] == 7 and 'run_reason' not in counting['rows'][0]
    assert 'run_iterations' not in shift['rows'][0]
    printed = capsys.readouterr().out
    assert '== comparison' in printed and '-- test_shift' in printed and '-- test_counting' in printed
    assert cli.main(['--method', 'test_shift,dis', '--weights', 'x.pt', '--sets', 'synthetic']) == 2


def test_cli_usage_errors_are_reported_not_raised(capsys):
    assert cli.main(['--method', 'no_such_method', '--sets', 'synthetic']) == 2
    assert 'no_such_method' in capsys.readouterr().err
    assert cli.main(['--method', 'dis', '--weights', 'x.pt', '--sets', 'synthetic']) == 2


def test_cli_metrics_move_with_the_error(tmp_path, fake_synthetic):
    # Same pairs, flow off by 2 px: AEPE 2, PCK@1 0, PCK@3 1.
    registry.register('test_shift2', lambda device, weights: _ShiftMatcher(offset=2.0))
    try:
        out = tmp_path / 'r.json'
        cli.main(['--method', 'test_shift2', '--sets', 'synthetic', '--synthetic-n', '1',
                  '--json', str(out), '--no-progress'])
    finally:
        registry._REGISTRY.pop('test_shift2', None)
    s = json.loads(out.read_text())['sets']['synthetic']
    assert s['aepe'] == pytest.approx(2.0, abs=1e-5)
    assert s['pck@1'] == 0.0 and s['pck@3'] == 1.0


def test_cli_report_figures(tmp_path, fake_synthetic):
    import cv2

    report = tmp_path / 'rep'
    cli.main(['--method', 'test_shift', '--sets', 'synthetic', '--synthetic-n', '2',
              '--report', str(report), '--report-pairs', '1', '--no-progress'])
    pngs = sorted(p.name for p in report.glob('*.png'))
    assert pngs == ['pck_curves.png', 'reliability.png', 'synthetic_synthetic_000.png']
    img = cv2.imread(str(report / 'synthetic_synthetic_000.png'))
    assert img is not None and img.shape[0] > 100 and img.std() > 5
    assert 'synthetic/000' in (report / 'tables.txt').read_text()


def test_cli_skips_absent_data(tmp_path, capsys):
    out = tmp_path / 'r.json'
    rc = cli.main(['--method', 'dis', '--sets', 'sintel,hpatches,tum', '--data-root',
                   str(tmp_path / 'nowhere'), '--json', str(out), '--no-progress'])
    assert rc == 1          # nothing ran: an error, but the record still says what was skipped
    rec = json.loads(out.read_text())
    assert rec['sets'] == {} and set(rec['skipped']) == {'sintel', 'hpatches', 'tum'}
    assert '[skip] sintel' in capsys.readouterr().out


def test_cli_rejects_unknown_set():
    with pytest.raises(SystemExit):
        cli.main(['--method', 'dis', '--sets', 'sintel,kitti'])
    assert cli.parse_sets('all') == list(cli.ALL_SETS)


def test_cli_real_synthetic_set(tmp_path):
    pytest.importorskip('dense_match_ros.data.synthetic')
    out = tmp_path / 'r.json'
    cli.main(['--method', 'dis', '--sets', 'synthetic', '--synthetic-n', '2',
              '--json', str(out), '--no-progress'])
    rec = json.loads(out.read_text())
    assert len(rec['rows']) == 2
    s = rec['sets']['synthetic']
    assert s['aepe'] is not None and s['aepe'] >= 0 and 0 <= s['pck@5'] <= 1


def test_cli_sintel_limit_one(tmp_path, shared_data):
    out = tmp_path / 'r.json'
    cli.main(['--method', 'dis', '--sets', 'sintel', '--limit', '1', '--data-root',
              str(shared_data), '--json', str(out), '--no-progress'])
    rec = json.loads(out.read_text())
    (row,) = rec['rows']
    assert row['pair'] == 'alley_2_clean/frame_0002'
    # DIS handles this slow, textured pair well; a broken loader or metric would not.
    assert row['aepe'] < 2.0 and row['pck@5'] > 0.9
    assert row['noc_aepe'] <= row['aepe'] + 1e-6     # occluded pixels are the hard ones
    assert row['n_valid'] > 0.9 * 1024 * 436


def test_cli_pose_set_limit_one(tmp_path, shared_data):
    out = tmp_path / 'r.json'
    cli.main(['--method', 'dis', '--sets', 'middlebury', '--limit', '1', '--data-root',
              str(shared_data), '--json', str(out), '--no-progress'])
    rec = json.loads(out.read_text())
    (row,) = rec['rows']
    assert {'rotation_error_deg', 'translation_error_deg', 'num_inliers', 'status',
            'match_time_s'} <= set(row)
    s = rec['sets']['middlebury']
    assert set(s) >= {'auc@5', 'auc@10', 'auc@20'}
    assert s['auc@5'] <= s['auc@10'] <= s['auc@20']


def test_cli_pose_seeds_give_the_mean_and_spread_of_the_aucs(tmp_path, shared_data, capsys):
    out = tmp_path / 'r.json'
    cli.main(['--method', 'dis', '--sets', 'middlebury', '--limit', '3', '--data-root',
              str(shared_data), '--json', str(out), '--no-progress', '--pose-seeds', '4'])
    rec = json.loads(out.read_text())
    s = rec['sets']['middlebury']
    assert s['num_seeds'] == 4
    assert all(len(r['seed_errors_deg']) == 4 for r in rec['rows'])
    per_seed = [metrics.pose_auc([r['seed_errors_deg'][i] for r in rec['rows']])['auc@10']
                for i in range(4)]
    assert s['auc@10_seed_mean'] == pytest.approx(np.mean(per_seed))
    assert s['auc@10_seed_std'] == pytest.approx(np.std(per_seed))
    assert per_seed[0] == pytest.approx(s['auc@10'])   # seed 0 is the plain figure
    assert '4 seeds' in capsys.readouterr().out


def test_cli_tum_adds_the_ground_truth_upper_bound(tmp_path, shared_data):
    out = tmp_path / 'r.json'
    cli.main(['--method', 'dis', '--sets', 'tum', '--limit', '1', '--data-root',
              str(shared_data), '--json', str(out), '--no-progress'])
    rec = json.loads(out.read_text())
    assert set(rec['sets']) == {'tum', 'tum/gt-upper-bound'}
    upper = [r for r in rec['rows'] if r['set'] == 'tum/gt-upper-bound']
    matched = [r for r in rec['rows'] if r['set'] == 'tum']
    assert len(upper) == len(matched) == 1 and upper[0]['pair'] == matched[0]['pair']
    # Exact correspondences through the same estimator: errors near zero, no matching time.
    assert upper[0]['rotation_error_deg'] < 0.05 and upper[0]['translation_error_deg'] < 1.0
    assert upper[0]['match_time_s'] == 0.0


class _PyramidShiftMatcher(_ShiftMatcher):
    """A coarse-to-fine stand-in: level i is off by 2**(2-i) px in x, the last level exact."""

    capabilities = frozenset({registry.LEVELS})

    def level_flows(self, source, target):
        flow = self._match(source, target)[0]
        return [flow + np.array([2.0 ** (2 - i), 0.0], np.float32) for i in range(2)] + [flow]

    def level_labels(self, source):
        return ['coarse', 'middle', 'fine']


def test_cli_levels_and_options(tmp_path, fake_synthetic, capsys):
    registry.register('test_pyramid', _PyramidShiftMatcher)
    try:
        out = tmp_path / 'r.json'
        rc = cli.main(['--method', 'test_pyramid', '--sets', 'synthetic', '--synthetic-n', '2',
                       '--levels', '--option', 'offset=0.5', '--json', str(out),
                       '--report', str(tmp_path / 'rep'), '--no-progress'])
        assert rc == 0
        rec = json.loads(out.read_text())
        assert rec['options'] == {'offset': 0.5}
        s = rec['sets']['synthetic']
        assert s['aepe'] == pytest.approx(0.5)            # the option reached the matcher
        assert s['level_labels'] == ['coarse', 'middle', 'fine']
        assert s['aepe_levels'] == pytest.approx([4.5, 2.5, 0.5])
        assert (tmp_path / 'rep' / 'aepe_levels.png').stat().st_size > 1000
        assert 'AEPE per level: coarse 4.500  middle 2.500  fine 0.500' in capsys.readouterr().out
        # A matcher without levels: --levels is noted and ignored, not an error.
        assert cli.main(['--method', 'test_shift', '--sets', 'synthetic', '--synthetic-n', '1',
                         '--levels', '--no-progress']) == 0
        assert 'has no pyramid levels' in capsys.readouterr().out
        # A malformed or unknown option is a usage error.
        assert cli.main(['--method', 'test_shift', '--option', 'offset']) == 2
        assert cli.main(['--method', 'test_shift', '--option', 'bogus=1']) == 2
    finally:
        registry._REGISTRY.pop('test_pyramid', None)


def test_nothing_evaluated_is_an_error_that_names_the_way_out(tmp_path, capsys):
    assert cli.main(['--method', 'dis', '--sets', 'sintel,tum', '--data-root', str(tmp_path),
                     '--no-progress']) == 1
    err = capsys.readouterr().err
    assert 'nothing was evaluated' in err and '--sets synthetic' in err


def test_the_record_says_which_photos_the_synthetic_set_came_from(tmp_path, fake_synthetic):
    out = tmp_path / 'r.json'
    assert cli.main(['--method', 'test_shift', '--sets', 'synthetic', '--synthetic-n', '1',
                     '--json', str(out), '--no-progress']) == 0
    photos = json.loads(out.read_text())['synthetic_photos']
    assert photos['count'] > 0 and photos['root'] and len(photos['keys_sha256']) == 16


def test_pose_options_reach_the_record_and_typos_are_refused(tmp_path, fake_synthetic, capsys):
    out = tmp_path / 'r.json'
    assert cli.main(['--method', 'test_shift', '--sets', 'synthetic', '--synthetic-n', '1',
                     '--pose-option', 'rank_by_matchability=true', '--json', str(out),
                     '--no-progress']) == 0
    assert json.loads(out.read_text())['pose_options'] == {'rank_by_matchability': True}
    assert cli.main(['--method', 'test_shift', '--sets', 'synthetic', '--pose-option',
                     'rank_by_matchabilty=true', '--no-progress']) == 2
    assert 'rank_by_matchabilty' in capsys.readouterr().err
