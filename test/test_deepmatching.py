"""DeepMatching: the pyramid's geometry, gradients through the top-down pass, matcher contract
and input checks, and exact resume of ``dense-match-train deepmatching``."""
import json

import cv2
import numpy as np
import pytest
import torch

from dense_match_ros.core.checkpoint import CheckpointError
from dense_match_ros.core.methods import deepmatching as dm_method
from dense_match_ros.core.methods.deepmatching import DeepMatchingHogMatcher, DeepMatchingMatcher
from dense_match_ros.core.methods.epicflow import nearest_match_flow
from dense_match_ros.core.networks.deepmatching import (DeepMatchingConfig, DeepMatchingNet,
                                                        aggregate, best_matches, spread)
from dense_match_ros.core.registry import available_methods, load_matcher
from dense_match_ros.training import checkpoint as ckpt
from dense_match_ros.training.cli import main
from dense_match_ros.training.deepmatching_task import DeepMatchingTask

torch.set_num_threads(1)
TINY = DeepMatchingConfig(width=0.125)
TINY_CLI = ['--set', 'data.image_size=[64,64]', '--set', 'model.width=0.125',
            '--set', 'model.backbone_init=null', '--set', 'batch_size=2',
            '--set', 'data.objects=0.5', '--set', 'optim.warmup_steps=5', '--set', 'log_every=1',
            '--set', 'threads=1', '--set', 'checkpoint_every=1000', '--no-progress']


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random colours plus fine noise: structure at every scale the pyramid sees."""
    rng = np.random.default_rng(seed)
    small = rng.random((h // 4, w // 4, 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255
    return (0.7 * img + 0.3 * rng.integers(0, 255, img.shape)).astype(np.uint8)


def _t(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def test_hog_pyramid_recovers_an_integer_shift_at_every_atomic_patch():
    big = _texture(96, 128)
    shift = np.array([24.0, 16.0])                                   # x, y px
    source = big[16:80, 24:120]                                      # every patch lands inside
    net = DeepMatchingNet(DeepMatchingConfig(descriptor='hog')).eval()
    with torch.no_grad():
        out = net(_t(source), _t(big))
    assert out.levels >= 3 and out.scores.shape[1:3] == (8, 12)
    m = best_matches(out.scores[0], out.bottom_up[0][0], out.levels, net.stride)
    err = (m.target - m.source).numpy() - shift
    # Half a descriptor cell (1 px at stride 2): the integer argmax is the true cell.
    assert np.abs(err).max() <= net.stride / 2, np.abs(err).max()
    assert m.reciprocal.all() and float(m.score.min()) > 0.5


def test_top_down_is_the_transpose_of_the_bottom_up_aggregation():
    """<spread(y), x> == <y, A x> for the linear part (exponent 1, counts of 1 in the inside)."""
    torch.manual_seed(0)
    x = torch.rand(1, 6, 5, 12, 10)
    parent, switches = aggregate(x, 2, torch.tensor(1.0))
    y = torch.rand_like(parent)
    # Linear in x for fixed switches: A x gathers the pooled maxima; check on the pooled values.
    pooled = torch.nn.functional.max_pool2d(x.reshape(1, 30, 12, 10), 3, 2, 1)
    assert torch.equal(pooled.reshape(-1).sort().values[-1], x.max())
    down = spread(y, 2, switches, (12, 10))
    assert down.shape == x.shape and torch.isfinite(down).all()
    assert (down >= 0).all() and (down > 0).sum() <= switches.numel()


def test_gradients_reach_the_descriptor_through_the_top_down_pass():
    torch.manual_seed(1)
    net = DeepMatchingNet(TINY)
    img = _texture(64, 64, 2)
    out = net(_t(img), _t(np.roll(img, 8, axis=1)))
    # Only what the top-down pass added to the atomic level: no direct atomic path.
    (out.scores - out.bottom_up[0]).sum().backward()
    first = net.backbone.blocks[0][0].weight.grad
    assert first is not None and float(first.abs().sum()) > 0
    assert net.exponent.grad is not None and float(net.exponent.grad.abs()) > 0


def test_matchers_registered_contract_and_never_nan():
    assert {'deepmatching', 'deepmatching-hog'} <= set(available_methods())
    rng = np.random.default_rng(4)
    src = _texture(60, 72, 5)
    tgt = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    torch.manual_seed(0)
    for m in (DeepMatchingHogMatcher(), DeepMatchingMatcher(net=DeepMatchingNet(TINY)),
              DeepMatchingHogMatcher(matchability='fb', refine=True)):
        for s, t in ((src, tgt), (np.zeros_like(src), np.zeros_like(tgt)), (src, src)):
            flow, match = m.match(s, t)
            assert flow.shape == (60, 72, 2) and flow.dtype == np.float32 and np.isfinite(flow).all()
            assert match.shape == (60, 72) and np.isfinite(match).all()
            assert 0 <= match.min() <= match.max() <= 1
    sparse = DeepMatchingHogMatcher().match_sparse(src, src)
    assert len(sparse.source) > 0 and np.isfinite(sparse.score).all()
    np.testing.assert_allclose(sparse.target, sparse.source, atol=1.0)


def test_dense_flow_and_sparse_matches_recover_a_shift():
    big = _texture(96, 128, 3)
    source = np.ascontiguousarray(big[16:80, 24:120])
    m = DeepMatchingHogMatcher()
    sparse = m.match_sparse(source, big)
    assert len(sparse.source) >= 40
    np.testing.assert_allclose(sparse.target - sparse.source, np.tile([24.0, 16.0], (len(sparse.source), 1)),
                               atol=1.0)
    nn = nearest_match_flow(sparse.source, sparse.target, source.shape[:2])
    assert np.abs(nn - [24.0, 16.0]).max() <= 1.0
    flow, match = m.match(source, big)
    assert np.abs(flow - [24.0, 16.0]).mean() < 0.5 and match.mean() > 0.5


def test_bad_inputs_raise_value_errors_naming_the_rule():
    m = DeepMatchingHogMatcher()
    good = np.zeros((32, 32, 3), np.uint8)
    assert m.min_side() == 16
    for bad, rule in ((good.astype(np.float32), 'uint8'), (good[..., 0], 'HxWx3'),
                      (np.zeros((32, 32, 4), np.uint8), 'HxWx3'),
                      (np.zeros((15, 40, 3), np.uint8), 'at least 16 px')):
        for args in ((bad, good), (good, bad)):
            with pytest.raises(ValueError, match=rule):
                m.match(*args)
            with pytest.raises(ValueError, match=rule):
                m.match_sparse(*args)
    with pytest.raises(ValueError, match='at least 64 px'):
        DeepMatchingHogMatcher(levels=3).match(np.zeros((48, 80, 3), np.uint8), good)
    with pytest.raises(ValueError, match='has no weights'):
        load_matcher('deepmatching-hog', device='cpu', weights='x.pt')
    for kw, rule in (({'matchability': 'x'}, 'matchability'), ({'max_memory_mb': 0}, 'max_memory_mb'),
                     ({'precision': 'fp8'}, 'precision'), ({'levels': -1}, 'levels')):
        with pytest.raises(ValueError, match=rule):
            DeepMatchingHogMatcher(**kw)


def test_a_volume_over_the_memory_bound_is_downscaled_with_a_warning():
    m = DeepMatchingHogMatcher(max_side=0, max_memory_mb=1.0)
    img = _texture(96, 128, 6)
    assert m.volume_mb((128, 96), (128, 96)) > 1.0
    with pytest.warns(RuntimeWarning, match='max_memory_mb'):
        flow, _ = m.match(img, img)
    assert np.isfinite(flow).all()
    with pytest.warns(RuntimeWarning, match='shrunk'):
        (w, h), _ = m.working_sizes((128, 96), (128, 96))
    assert m.volume_mb((w, h), (w, h)) <= 1.0


def _train_state(net: DeepMatchingNet, method: str, tmp_path, name: str = 'last.pt'):
    cfg = DeepMatchingTask().model_config(dict(net.config.__dict__))
    path = tmp_path / name
    torch.save({'format': ckpt.TRAIN_FORMAT, 'method': method, 'step': 3,
                'config': {'model': cfg}, 'model': net.state_dict()}, path)
    return path


def test_weights_of_another_method_or_width_are_refused(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = _train_state(DeepMatchingNet(TINY), 'deepmatching', tmp_path)
    m = load_matcher('deepmatching', device='cpu', weights=str(path), width=0.125)
    assert m.net.config.width == 0.125
    with pytest.raises(CheckpointError, match='expected a width-0.25 .* found width 0.125'):
        load_matcher('deepmatching', device='cpu', weights=str(path), width=0.25)
    other = _train_state(DeepMatchingNet(TINY), 'dgc', tmp_path, 'dgc.pt')
    with pytest.raises(CheckpointError, match="'dgc'.*deepmatching"):
        load_matcher('deepmatching', device='cpu', weights=str(other))
    monkeypatch.setattr(dm_method.WEIGHTS, 'directory', tmp_path / 'none')
    with pytest.raises(FileNotFoundError, match='dense-match-train deepmatching'):
        load_matcher('deepmatching', device='cpu')


def _losses(run):
    return [(r['step'], r['loss']) for r in map(json.loads, (run / 'log.jsonl').read_text().splitlines())]


def test_task_config_checks():
    task = DeepMatchingTask()
    assert task.model_config({})['descriptor'] == 'backbone'
    assert task.loss_config({})['kind'] == 'margin'
    with pytest.raises(ValueError, match='widht'):
        task.model_config({'widht': 1})
    with pytest.raises(ValueError, match='HOG'):
        task.model_config({'descriptor': 'hog'})
    with pytest.raises(ValueError, match='loss.kind'):
        task.loss_config({'kind': 'l2'})


def test_cli_resumes_exactly_and_exports(tmp_path):
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    assert main(['deepmatching', '--steps', '20', '--out', str(whole), *TINY_CLI]) == 0
    assert main(['deepmatching', '--steps', '20', '--stop-at', '10', '--out', str(split), *TINY_CLI]) == 0
    assert [s for s, _ in _losses(split)] == list(range(1, 11))
    assert main(['deepmatching', '--steps', '20', '--out', str(split), *TINY_CLI]) == 0
    a, b = _losses(whole), _losses(split)
    assert [s for s, _ in a] == list(range(1, 21)) and [s for s, _ in b] == list(range(1, 21))
    np.testing.assert_array_equal([x for _, x in a], [x for _, x in b])
    assert all(np.isfinite(x) for _, x in a)
    out = tmp_path / 'w' / 'deepmatching_test.pt'
    assert main(['export', str(whole), '--out', str(out)]) == 0
    record = json.loads(out.with_suffix('.json').read_text())
    assert record['method'] == 'deepmatching' and record['dtype'] == 'float16'
    flow, match = load_matcher('deepmatching', device='cpu', weights=str(out)).match(
        _texture(48, 64, 7), _texture(48, 64, 8))
    assert np.isfinite(flow).all() and np.isfinite(match).all()


def test_the_min_score_fit_scores_each_floor_as_the_matcher_with_that_floor_scores_it():
    """Each floor's error in the fit is the error of ``match()`` with ``min_score`` at that
    floor (the fit only moves the floor over candidates matched once), the fitted floor is
    the lowest of the curve averaged over neighbours, and a floor above every score keeps
    nothing."""
    from dense_match_ros.evaluation import metrics
    from dense_match_ros.evaluation.calibrate import calibration_pairs
    from dense_match_ros.training.deepmatching_task import fit_min_score
    pair = calibration_pairs(1)[0]
    floors = (0.0, 0.6, 2.0)
    fit = fit_min_score(DeepMatchingHogMatcher(), [pair], floors=floors)
    valid = np.asarray(pair.valid, bool)
    for floor, aepe in zip(floors, fit['curve']['aepe']):
        flow = DeepMatchingHogMatcher(min_score=floor).match(pair.source, pair.target).flow
        assert aepe == pytest.approx(metrics.aepe(flow, pair.flow, valid), rel=1e-5)
    c0, c1, c2 = fit['curve']['aepe']
    # Each floor's error averaged with its neighbours' (the ends repeat themselves).
    smoothed = [(2 * c0 + c1) / 3, (c0 + c1 + c2) / 3, (c1 + 2 * c2) / 3]
    assert fit['min_score'] == floors[int(np.argmin(smoothed))]
    assert fit['aepe_smoothed'] == pytest.approx(min(smoothed))
    assert fit['curve']['kept_per_pair'][0] >= fit['curve']['kept_per_pair'][1] > 0
    assert fit['curve']['kept_per_pair'][2] == 0


def test_a_match_that_strays_from_its_neighbours_is_dropped_and_the_fit_scores_each_limit():
    """``neighbour_consistent``: on a grid of matches moving by (3, 1), one match sent 20 px
    the other way is dropped at a 5 px limit and kept at 0 (off). The consistency fit scores
    each limit as ``match()`` with that ``consistency_px`` scores it."""
    from dense_match_ros.core.methods.epicflow import neighbour_consistent
    from dense_match_ros.evaluation import metrics
    from dense_match_ros.evaluation.calibrate import calibration_pairs
    from dense_match_ros.training.deepmatching_task import fit_consistency
    ys, xs = np.mgrid[0:80:8, 0:80:8]
    pts = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
    targets = pts + np.array([3.0, 1.0], np.float32)
    targets[45] += np.array([-20.0, 4.0], np.float32)
    keep = neighbour_consistent(pts, targets, 5.0)
    assert not keep[45] and keep.sum() == len(pts) - 1
    assert neighbour_consistent(pts, targets, 0.0).all()
    pair = calibration_pairs(1)[0]
    limits = (0.0, 2.0)
    fit = fit_consistency(DeepMatchingHogMatcher(), [pair], limits=limits)
    valid = np.asarray(pair.valid, bool)
    for limit, aepe in zip(limits, fit['curve']['aepe']):
        flow = DeepMatchingHogMatcher(consistency_px=limit).match(pair.source, pair.target).flow
        assert aepe == pytest.approx(metrics.aepe(flow, pair.flow, valid), rel=1e-5)
    assert fit['curve']['kept_per_pair'][0] >= fit['curve']['kept_per_pair'][1]
