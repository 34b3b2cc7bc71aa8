"""DMP: the network starts as the correlation matcher, the per-pair optimisation lowers its loss
and error, stops as told, is repeatable and safe; pre-training resumes exactly."""
import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dense_match_ros.core.checkpoint import CheckpointError
from dense_match_ros.core.methods import dmp as dmp_method
from dense_match_ros.core.methods import dmp_optim
from dense_match_ros.core.methods.dmp import DmpMatcher
from dense_match_ros.core.networks.backbone import VGGBackbone, VGGConfig
from dense_match_ros.core.networks.correlation import local_correlation
from dense_match_ros.core.networks.dmp import (DmpConfig, DmpNet, cell_centres,
                                               offsets, soft_argmax)
from dense_match_ros.core.registry import available_methods, load_matcher
from dense_match_ros.training import checkpoint as ckpt
from dense_match_ros.training.cli import main

from photo_warp import affine_photo_pair

torch.set_num_threads(1)
TINY = DmpConfig(width=0.125, input_size=(64, 64), finest='conv3', radius=2, hidden=8, temperature=0.05)


def _net(seed: int = 0, config: DmpConfig = TINY) -> DmpNet:
    torch.manual_seed(seed)
    return DmpNet(config).eval()


def _tiny_matcher(cls=DmpMatcher, **options) -> DmpMatcher:
    net = _net()
    return cls(device='cpu', net=net, **{'iterations': 5, 'lr': 1e-3, **options})


def _photo_pair(shift=(6.0, -4.0), size=64):
    return affine_photo_pair(size, size, 0.0, 1.0, shift)


# ------------------------------------------------------------------------------ network


def test_methods_are_registered():
    assert {'dmp', 'dmp-scratch'} <= set(available_methods())


def test_local_correlation_matches_explicit_shifts():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 7, 9), torch.randn(2, 5, 7, 9)
    corr = local_correlation(s, t, 2)
    padded = F.pad(t, (2, 2, 2, 2))
    for k, (dx, dy) in enumerate(offsets(2, 'cpu').long().tolist()):
        expected = (s * padded[:, :, 2 + dy:2 + dy + 7, 2 + dx:2 + dx + 9]).sum(1)
        torch.testing.assert_close(corr[:, k], expected)
    a = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: local_correlation(x, y, 2), (a, b))


def test_local_correlation_over_several_column_chunks_and_under_autocast():
    """Rows wider than one matrix-product chunk (16 columns forward, 32 backward) are stitched
    without seams, the gradient holds there too, and autocast does not lower an fp32 call to
    bf16."""
    torch.manual_seed(2)
    s, t = torch.randn(1, 4, 3, 70, dtype=torch.float64), torch.randn(1, 4, 3, 70, dtype=torch.float64)
    corr = local_correlation(s, t, 1)
    padded = F.pad(t, (1, 1, 1, 1))
    for k, (dx, dy) in enumerate(offsets(1, 'cpu').long().tolist()):
        expected = (s * padded[:, :, 1 + dy:1 + dy + 3, 1 + dx:1 + dx + 70]).sum(1)
        torch.testing.assert_close(corr[:, k], expected)
    a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: local_correlation(x, y, 1), (a, b))
    x, y = torch.randn(1, 64, 6, 40), torch.randn(1, 64, 6, 40)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        inside = local_correlation(x, y, 2)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, local_correlation(x, y, 2))


def test_iteration_zero_is_the_soft_argmax_of_the_correlations():
    """Untrained adaptation and residual modules are the identity and zero: level 0 is the
    soft-argmax of the global correlation of the trunk's features, level 1 adds the soft-argmax
    offset of the local correlation around the upsampled flow."""
    net = _net()
    rng = torch.Generator().manual_seed(2)
    src_img, tgt_img = torch.rand(1, 3, 64, 64, generator=rng), torch.rand(1, 3, 64, 64, generator=rng)
    with torch.no_grad():
        out = net(src_img, tgt_img)
        src, tgt = net.trunk(src_img), net.trunk(tgt_img)
    scale = 1.0 / TINY.temperature
    # Level 0, by hand: every source cell's expectation over every target cell.
    s0, t0 = F.normalize(src['pool4'], dim=1)[0], F.normalize(tgt['pool4'], dim=1)[0]
    h, w = s0.shape[-2:]
    prob = (torch.einsum('chw,cij->hwij', s0, t0) * scale).flatten(2).softmax(-1)
    centres = cell_centres(h, w, 16, 'cpu')
    expected = torch.einsum('hwk,ck->chw', prob, centres.flatten(1)) - centres
    torch.testing.assert_close(out.flows[0][0], expected, atol=1e-4, rtol=1e-4)
    # Level 1 (conv4, 8 px cells): target features sampled at each offset around the upsampled flow.
    up = F.interpolate(out.flows[0], size=src['conv4'].shape[-2:], mode='bilinear', align_corners=False)
    s1 = F.normalize(src['conv4'], dim=1)
    origin = cell_centres(*s1.shape[-2:], 8, 'cpu')[None]
    from dense_match_ros.core.networks.dmp import sample_at
    warped = F.normalize(sample_at(tgt['conv4'], origin + up, (64, 64)), dim=1)
    corr = local_correlation(s1, warped, TINY.radius)
    p1 = (corr * scale).softmax(1)
    offset = torch.einsum('bkhw,kc->bchw', p1, offsets(TINY.radius, 'cpu') * 8)
    torch.testing.assert_close(out.flows[1], up + offset, atol=1e-4, rtol=1e-4)
    # And the matcher with no iterations returns that network's own flow.
    m = DmpMatcher(device="cpu", net=net, iterations=0, mode="resize", precision="fp32",
                   refine="none", polish=0)
    src_np = (src_img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    tgt_np = (tgt_img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    flow, _ = m.match(src_np, tgt_np)
    with torch.no_grad():
        again = net(torch.from_numpy(src_np).permute(2, 0, 1)[None].float() / 255,
                    torch.from_numpy(tgt_np).permute(2, 0, 1)[None].float() / 255)
    np.testing.assert_allclose(flow, again.flow[0].permute(1, 2, 0).numpy(), atol=1e-3)


def test_the_confidence_is_the_probability_near_the_best_candidate():
    """'mass': the softmax probability of the most probable candidate and its neighbours on
    the candidate grid (3x3, cut at the grid's edge); 'peak': of that candidate alone. Both
    configs give the same flow."""
    rng = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 12, 3, 4, generator=rng)
    positions = torch.rand(12, 2, generator=rng)
    expected, peak = soft_argmax(scores, positions, torch.tensor(3.0))
    _, mass = soft_argmax(scores, positions, torch.tensor(3.0), grid=(3, 4))
    prob = (scores * 3.0).softmax(1)
    for b in range(2):
        for y in range(3):
            for x in range(4):
                p = prob[b, :, y, x].reshape(3, 4)
                r, c = divmod(int(p.argmax()), 4)
                near = p[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].sum()
                assert math.isclose(float(mass[b, 0, y, x]), float(near), rel_tol=1e-5)
                assert math.isclose(float(peak[b, 0, y, x]), float(p.max()), rel_tol=1e-6)
    torch.testing.assert_close(expected, torch.einsum('bkhw,kc->bchw', prob, positions))
    with pytest.raises(ValueError, match='grid'):
        soft_argmax(scores, positions, torch.tensor(3.0), grid=(3, 3))
    src_img, tgt_img = torch.rand(1, 3, 64, 64, generator=rng), torch.rand(1, 3, 64, 64, generator=rng)
    with torch.no_grad():
        by_mass = _net(config=DmpConfig(**{**TINY.__dict__, 'confidence': 'mass'}))(src_img, tgt_img)
        by_peak = _net(config=DmpConfig(**{**TINY.__dict__, 'confidence': 'peak'}))(src_img, tgt_img)
    torch.testing.assert_close(by_mass.flow, by_peak.flow)
    assert (by_mass.confidence >= by_peak.confidence - 1e-6).all()
    assert (by_mass.confidence > by_peak.confidence + 1e-3).any()


def test_bad_configs_are_refused():
    for bad, rule in (({'input_size': (60, 64)}, 'multiples of 16'), ({'finest': 'pool4'}, 'finest'),
                      ({'radius': 0}, 'radius'), ({'temperature': 0.0}, 'temperature'),
                      ({'confidence': 'max'}, 'confidence')):
        with pytest.raises(ValueError, match=rule):
            DmpNet(DmpConfig(**{**TINY.__dict__, **bad}))


# ------------------------------------------------------------------------------ optimisation


def test_optimisation_lowers_loss_and_error_on_a_shifted_pair_within_30_iterations():
    """dmp-scratch on the shipped trunk: a shifted photo at 240 px; the returned iterate has a
    lower test-time loss and a lower end-point error than iteration 0."""
    src, tgt, gt = affine_photo_pair(240, 240, 0.0, 1.0, (12.0, -8.0))
    m = load_matcher('dmp-scratch', device='cpu', iterations=30, lr=1e-3, patience=0, min_update_px=0)
    inner = (slice(30, -30), slice(30, -30))

    def epe(flow):
        return float(np.linalg.norm(flow - gt, axis=-1)[inner].mean())

    m.stopping.iterations = 0
    start = epe(m.match(src, tgt).flow)
    m.stopping.iterations = 30
    end = epe(m.match(src, tgt).flow)
    assert m.last_run['loss'] < m.last_run['initial_loss']
    assert end < 0.9 * start, (start, end)


def test_the_loss_reuses_the_decodes_adapted_features_with_the_same_value_and_gradients():
    net = _net(4)
    with torch.no_grad():                      # adaptation layers away from the identity
        for p in net.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    src_img, tgt_img, _ = _photo_pair()
    source = torch.from_numpy(src_img).permute(2, 0, 1)[None].float() / 255.0
    target = torch.from_numpy(tgt_img).permute(2, 0, 1)[None].float() / 255.0
    src, tgt = net.trunk_features(source), net.trunk_features(target)
    settings = dmp_optim.LossSettings(samples=32)
    fixed = dmp_optim.fixed_positions(src, net.levels, 32, 0)

    def loss_and_grads(reuse: bool):
        net.zero_grad(set_to_none=True)
        out = net.decode(src, tgt, (64, 64))
        loss = dmp_optim.pair_loss(net, src, tgt, target, out.flow, settings,
                                   torch.Generator().manual_seed(1), fixed,
                                   out.adapted if reuse else None)
        loss.value.backward()
        return loss, [p.grad.clone() for p in net.trainable_parameters()]

    assert set(net.decode(src, tgt, (64, 64)).adapted) == set(net.levels)
    again, grads_again = loss_and_grads(False)
    reused, grads_reused = loss_and_grads(True)
    assert torch.allclose(again.value, reused.value) and again.score == pytest.approx(reused.score)
    for a, b in zip(grads_again, grads_reused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # A coarse level decoded from other (resized) images is not the pair's own pool4.
    coarse = (src['pool4'].clone(), tgt['pool4'].clone())
    assert 'pool4' not in net.decode(src, tgt, (64, 64), coarse).adapted


def test_two_calls_give_the_same_flow_and_warm_start_continues():
    src, tgt, _ = _photo_pair()
    m = _tiny_matcher()
    a, b = m.match(src, tgt), m.match(src, tgt)
    np.testing.assert_array_equal(a.flow, b.flow)
    np.testing.assert_array_equal(a.matchability, b.matchability)
    warm = _tiny_matcher(warm_start=True)
    first = warm.match(src, tgt)
    np.testing.assert_array_equal(first.flow, a.flow)
    second = warm.match(src, tgt)           # starts from the first call's optimised weights
    assert not np.array_equal(second.flow, first.flow)


def test_the_augmented_copy_shows_the_target_where_its_known_flow_points():
    """A-DMP's extra pair: the copy at x is the target at x + flow wherever the flow lands
    inside the target, and one seed gives one copy."""
    _, tgt, _ = _photo_pair(size=96)
    target = torch.from_numpy(tgt).permute(2, 0, 1)[None].float() / 255.0
    aug = dmp_optim.augmented_copy(target, 0.1, seed=3)
    origin = cell_centres(96, 96, 1, 'cpu')[None]
    mapped = origin + aug.flow
    seen = dmp_optim.sample_at(target, mapped, (96, 96))
    assert 0.5 < float(aug.ok.float().mean()) < 1.0
    # Within half a pixel of the edge sample_at pads with zeros, the copy reflects.
    inside = aug.ok[0] & (mapped[0] >= 0).all(0) & (mapped[0] <= 95).all(0)
    assert float((seen - aug.image).abs().amax(1)[0][inside].max()) < 1e-4
    assert 1.0 < float(aug.flow.abs().max()) < 2 * 0.1 * 96     # a homography of that size
    again = dmp_optim.augmented_copy(target, 0.1, seed=3)
    assert torch.equal(again.image, aug.image) and torch.equal(again.flow, aug.flow)
    assert not torch.equal(dmp_optim.augmented_copy(target, 0.1, seed=4).flow, aug.flow)


def test_a_dmp_optimises_the_pair_and_the_copy_together(monkeypatch):
    """With ``augment`` each step decodes the pair and the copy as one batch and adds the copy's
    flow loss; the pair's own loss still ranks the iterates, and the result is deterministic."""
    src, tgt, _ = _photo_pair()
    batches, terms = [], []
    decode, supervised = DmpNet.decode, dmp_optim.flow_loss

    def counting_decode(self, src_f, tgt_f, size, coarse=None):
        batches.append(next(iter(src_f.values())).shape[0])
        return decode(self, src_f, tgt_f, size, coarse)

    def counting_loss(*args, **kwargs):
        out = supervised(*args, **kwargs)
        terms.append(float(out.total))
        return out

    monkeypatch.setattr(DmpNet, 'decode', counting_decode)
    monkeypatch.setattr(dmp_optim, 'flow_loss', counting_loss)
    plain = _tiny_matcher(rotations=1).match(src, tgt)   # upright only: no scan passes counted
    assert set(batches) == {1} and not terms
    batches.clear()
    m = _tiny_matcher(augment=1.0, rotations=1)
    a = m.match(src, tgt)
    assert set(batches) == {2} and len(terms) == m.last_run['iterations'] + 1
    assert all(math.isfinite(t) for t in terms)
    assert not np.array_equal(a.flow, plain.flow)         # the copy's gradient changed the steps
    np.testing.assert_array_equal(m.match(src, tgt).flow, a.flow)


def test_the_dis_residual_makes_the_working_grid_flow_precise(monkeypatch):
    """The optimised flow lives on a coarse working grid; refine='dis' corrects a smooth
    error of a pixel or two at full resolution, refine='none' returns it as it is."""
    src, tgt, gt = affine_photo_pair(128, 96, 2.0, 1.0, (5.0, -3.0))
    off = (gt[::2, ::2] + 1.5).astype(np.float32)              # on a half-size working grid
    inner = (slice(10, -10), slice(10, -10))
    coarse = lambda s, t, reserve=0.0: (off * 0.5, np.ones(off.shape[:2], np.float32), (64, 48))
    errors = {}
    for refine in ('none', 'dis'):
        m = _tiny_matcher(refine=refine, polish=0)
        monkeypatch.setattr(m, 'working_flow', coarse)
        flow, _ = m.match(src, tgt)
        errors[refine] = float(np.linalg.norm(flow - gt, axis=-1)[inner].mean())
    assert errors['none'] > 1.5 and errors['dis'] < 0.5 * errors['none'], errors
    # The residual's limit is in working pixels, scaled to the input (here x2): the 2.1 px
    # correction passes a 2-cell limit (4 px) and not a half-cell one (1 px).
    for cells, fixed in ((2.0, True), (0.5, False)):
        m = _tiny_matcher(refine='dis', refine_max_cells=cells, polish=0)
        monkeypatch.setattr(m, 'working_flow', coarse)
        flow, _ = m.match(src, tgt)
        error = float(np.linalg.norm(flow - gt, axis=-1)[inner].mean())
        assert (error < 0.5 * errors['none']) == fixed, (cells, error, errors)
    with pytest.raises(ValueError, match='refine_max_cells'):
        _tiny_matcher(refine_max_cells=-1)


def test_the_time_budget_bounds_the_whole_call(monkeypatch):
    """What follows the loop (residual, polish) took on the last pair, scaled by the pixel
    count, is kept out of the loop's budget, so the second call of a stream ends within it."""
    src, tgt, _ = _photo_pair()
    m = _tiny_matcher(iterations=100000, min_update_px=0, patience=0, time_budget_s=0.5, polish=1)

    def slow_polish(source, target, flow, iterations):
        time.sleep(0.25)
        return flow
    monkeypatch.setattr(dmp_method._refine, 'variational_polish', slow_polish)
    took = []
    for _ in range(2):
        started = time.perf_counter()
        m.match(src, tgt)
        took.append(time.perf_counter() - started)
        assert m.last_run['reason'] == 'time'
    assert took[0] > 0.7 and took[1] < 0.6, took
    with pytest.raises(ValueError, match='polish'):
        _tiny_matcher(polish=-1)


def test_stopping_rules_and_reasons():
    src, tgt, _ = _photo_pair()
    m = _tiny_matcher(iterations=50, min_update_px=1e6, window=3, patience=0)
    m.match(src, tgt)
    assert m.last_run['reason'] == 'converged' and m.last_run['iterations'] == 3
    m = _tiny_matcher(iterations=50, min_update_px=0, time_budget_s=1e-9)
    m.match(src, tgt)
    assert m.last_run['reason'] == 'time' and m.last_run['iterations'] == 0
    m = _tiny_matcher(iterations=7, min_update_px=0, patience=0)
    m.match(src, tgt)
    assert m.last_run['reason'] == 'iterations' and m.last_run['iterations'] == 7
    assert 0 <= m.last_run['best_iteration'] <= 7


def test_a_non_finite_loss_stops_with_a_warning_and_returns_the_best_finite_iterate(monkeypatch):
    src, tgt, _ = _photo_pair()
    real = dmp_optim.pair_loss
    calls = []

    def flaky(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(1)
        return dmp_optim.PairLoss(loss.value * math.nan, math.nan) if len(calls) == 4 else loss

    monkeypatch.setattr(dmp_optim, 'pair_loss', flaky)
    m = _tiny_matcher(iterations=20, min_update_px=0, patience=0, rotations=1)
    with pytest.warns(RuntimeWarning, match='non-finite'):
        flow, match = m.match(src, tgt)
    assert m.last_run['reason'] == 'non-finite' and m.last_run['best_iteration'] <= 2
    assert np.isfinite(flow).all() and np.isfinite(match).all()


@pytest.mark.parametrize('image, rule', [
    (np.zeros((40, 40, 3), np.float32), 'uint8'),
    (np.zeros((40, 40), np.uint8), 'HxWx3'),
    (np.zeros((40, 40, 4), np.uint8), 'HxWx3'),
    (np.zeros((12, 40, 3), np.uint8), 'at least 16 px'),
])
def test_bad_inputs_name_the_rule(image, rule):
    m = _tiny_matcher()
    ok = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match=rule):
        m.match(image, ok)
    with pytest.raises(ValueError, match=rule):
        m.match(ok, image)


def test_bad_options_and_wrong_weights_are_named(tmp_path):
    for bad, rule in (({'mode': 'x'}, 'mode'), ({'warp': 'x'}, 'warp'), ({'samples': 1}, 'samples'),
                      ({'iterations': -1}, 'iterations'), ({'tau': 0}, 'tau'),
                      ({'refine': 'raft'}, 'refine'), ({'confidence': 'max'}, 'confidence'),
                      ({'augment': -1}, 'augment'), ({'augment_shift': 0.5}, 'augment_shift')):
        with pytest.raises(ValueError, match=rule):
            _tiny_matcher(**bad)
    other = tmp_path / 'not_dmp.pt'
    torch.save({'method': 'neuflow', 'model_config': {}, 'model': {}}, other)
    with pytest.raises(CheckpointError, match='dmp'):
        load_matcher('dmp', device='cpu', weights=str(other))
    with pytest.raises(CheckpointError, match='backbone'):
        load_matcher('dmp-scratch', device='cpu', weights=str(other))


def test_any_size_and_never_nan():
    rng = np.random.default_rng(3)
    m = _tiny_matcher(iterations=2)
    for (h, w), (th, tw) in (((48, 80), (60, 52)), ((16, 16), (16, 16))):
        src = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        tgt = rng.integers(0, 255, (th, tw, 3), dtype=np.uint8)
        for mode in ('resize', 'adaptive'):
            m.mode, m.max_side = mode, 64
            flow, match = m.match(src, tgt)
            assert flow.shape == (h, w, 2) and match.shape == (h, w)
            assert np.isfinite(flow).all() and np.isfinite(match).all()
            assert match.min() >= 0 and match.max() <= 1
    flat = np.full((40, 40, 3), 128, np.uint8)        # no texture at all
    flow, match = m.match(flat, flat)
    assert np.isfinite(flow).all() and np.isfinite(match).all()


# ------------------------------------------------------------------------------ pre-training


def _tiny_trunk(tmp_path, seed: int = 5):
    torch.manual_seed(seed)
    trunk = VGGBackbone(VGGConfig(width=0.125, batch_norm=True))
    path = tmp_path / 'trunk.pt'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in trunk.state_dict().items()}}, path)
    return path


def _losses(run):
    return [(r['step'], r['loss']) for r in map(json.loads, (run / 'log.jsonl').read_text().splitlines())]


def test_pretraining_resumes_exactly_trains_only_the_added_modules_and_exports(tmp_path):
    trunk = _tiny_trunk(tmp_path)
    cli = ['--set', 'data.image_size=[64,64]', '--set', 'model.input_size=[64,64]',
           '--set', 'model.width=0.125', '--set', 'model.finest=conv3', '--set', 'model.radius=2',
           '--set', 'model.hidden=8', '--set', f'model.backbone_init={trunk}',
           '--set', 'batch_size=2', '--set', 'optim.warmup_steps=5', '--set', 'log_every=1',
           '--set', 'threads=1', '--set', 'checkpoint_every=1000', '--no-progress']
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    assert main(['dmp', '--steps', '20', '--out', str(whole), *cli]) == 0
    assert main(['dmp', '--steps', '20', '--stop-at', '10', '--out', str(split), *cli]) == 0
    assert main(['dmp', '--steps', '20', '--out', str(split), *cli]) == 0
    a, b = _losses(whole), _losses(split)
    assert [s for s, _ in a] == list(range(1, 21)) == [s for s, _ in b]
    np.testing.assert_array_equal([x for _, x in a], [x for _, x in b])
    assert all(np.isfinite(x) for _, x in a)
    state = ckpt.load_training_state(whole / 'last.pt')['model']
    start = torch.load(trunk, weights_only=True)['state_dict']
    for k, v in start.items():                                   # the trunk is frozen
        assert torch.equal(state['trunk.' + k[len('backbone.'):]].float(), v.float()), k
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in state.items() if k.endswith('outer.weight'))
    out = tmp_path / 'w' / 'dmp_test.pt'
    assert main(['export', str(whole), '--out', str(out)]) == 0
    record = json.loads(out.with_suffix('.json').read_text())
    assert record['method'] == 'dmp' and record['dtype'] == 'float16'
    src, tgt, _ = _photo_pair()
    flow, match = load_matcher('dmp', device='cpu', weights=str(out), iterations=2).match(src, tgt)
    assert np.isfinite(flow).all() and np.isfinite(match).all()
    # A later stage on another trunk: that trunk, and the exported stage's trained modules.
    from dense_match_ros.training.dmp_task import DmpTask
    (tmp_path / 'other').mkdir()
    other = _tiny_trunk(tmp_path / 'other', seed=6)
    task = DmpTask()
    config = task.model_config({'width': 0.125, 'input_size': [64, 64], 'finest': 'conv3',
                                'radius': 2, 'hidden': 8, 'init_weights': str(out),
                                'trunk_init': str(other)})
    swapped = task.build_model(config).state_dict()
    exported = ckpt.load_weights(out, 'dmp')[1]
    for k, v in torch.load(other, weights_only=True)['state_dict'].items():
        assert torch.equal(swapped['trunk.' + k[len('backbone.'):]], v), k
    assert any(not torch.equal(swapped[k], exported[k].float()) for k in exported if k.startswith('trunk.'))
    for k, v in exported.items():
        if not k.startswith('trunk.'):
            assert torch.equal(swapped[k], v.float()), k


def test_pretraining_needs_a_trained_trunk():
    from dense_match_ros.training.dmp_task import DmpTask
    task = DmpTask()
    with pytest.raises(ValueError, match='backbone_init'):
        task.build_model(task.model_config({'width': 0.125, 'input_size': [64, 64]}))
    with pytest.raises(ValueError, match='trunk_init swaps'):
        task.build_model(task.model_config({'width': 0.125, 'input_size': [64, 64],
                                            'trunk_init': 'trunk.pt'}))
    with pytest.raises(ValueError, match='radisu'):
        task.model_config({'radisu': 3})


def _tiny_shipped(path, seed: int = 0):
    """Tiny dmp weights in the shipped format (fp16, record with a sha256)."""
    import dataclasses
    ckpt.export_weights({'model': _net(seed).state_dict(), 'method': 'dmp', 'step': 0,
                         'config': {'model': dataclasses.asdict(TINY)}}, path, {'command': 'test'})
    return path


def test_weights_carry_their_fitted_test_time_lr(tmp_path):
    """The fit keeps the candidate with the lowest mean AEPE on the calibration pairs, writes
    it into the record, and the matcher takes it unless told another."""
    from dense_match_ros.evaluation import test_time_lr
    weights = _tiny_shipped(tmp_path / 'dmp_tiny.pt')
    assert load_matcher('dmp', device='cpu', weights=str(weights)).loss.lr == dmp_method.DEFAULT_LR
    argv = ['--weights', str(weights), '--lr', '3e-3', '--lr', '1e-6', '--pairs', '2',
            '--size', '64x64', '--iterations', '4', '--no-progress']
    assert test_time_lr.main([*argv, '--write']) == 0
    record = json.loads(weights.with_suffix('.json').read_text())
    fit = record['test_time']
    assert set(fit['mean_aepe']) == {'0.003', '1e-06'}
    assert fit['mean_aepe']['0.003'] != fit['mean_aepe']['1e-06']   # the steps differ on these pairs
    assert fit['lr'] == float(min(fit['mean_aepe'], key=fit['mean_aepe'].get))
    assert fit['iterations'] == 4 and fit['command'].endswith('--write')
    assert load_matcher('dmp', device='cpu', weights=str(weights)).loss.lr == fit['lr']
    assert load_matcher('dmp', device='cpu', weights=str(weights), lr=2e-4).loss.lr == 2e-4
    # The weights' checksum is of the .pt file alone: the fitted step does not break it.
    assert record['sha256'] == ckpt.sha256_of(weights)
    with pytest.raises(SystemExit, match='dmp-scratch'):
        test_time_lr.main(['--method', 'dmp-scratch', *argv, '--write'])


@pytest.mark.parametrize('turns', [0, 1, 2, 3])
def test_flow_into_a_turned_target_maps_back_exactly(turns):
    """Points found in np.rot90(target, k) land on the same pixels of the target itself."""
    from dense_match_ros.core.geometry import grid
    rng = np.random.default_rng(turns)
    target = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
    turned = np.rot90(target, turns)
    th, tw = turned.shape[:2]
    hits = np.stack([rng.integers(0, tw, (4, 6)), rng.integers(0, th, (4, 6))], -1).astype(np.float32)
    flow = grid.map_to_flow(hits)                           # a 4x6 source grid into the turned copy
    back = grid.flow_to_map(grid.unrotate_flow(flow, turns, (7, 5)))
    xi, yi = np.rint(back[..., 0]).astype(int), np.rint(back[..., 1]).astype(int)
    np.testing.assert_allclose(back, np.stack([xi, yi], -1), atol=1e-4)
    assert (xi >= 0).all() and (xi < 7).all() and (yi >= 0).all() and (yi < 5).all()
    np.testing.assert_array_equal(target[yi, xi], turned[hits[..., 1].astype(int), hits[..., 0].astype(int)])


def test_the_rotation_search_matches_a_turned_target_through_its_upright_copy():
    """A target rolled by a quarter turn: upright only, the network is lost; with
    ``rotations=4`` the turn whose copy gives the lowest initial loss is the upright one, and
    the flow points into the turned target itself."""
    src, _, _ = _photo_pair(shift=(0.0, 0.0))
    tgt = np.ascontiguousarray(np.rot90(src, -1))             # np.rot90(tgt, 1) is src again
    h, w = src.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    truth = np.stack([(w - 1 - y) - x, x - y], -1)            # src (x, y) shows tgt (W-1-y, x)
    errors, flows = {}, {}
    for rotations in (1, 4):
        m = _tiny_matcher(iterations=2, rotations=rotations, refine='none', polish=0)
        flows[rotations], match = m.match(src, tgt)
        assert np.isfinite(flows[rotations]).all() and np.isfinite(match).all()
        errors[rotations] = float(np.linalg.norm(flows[rotations] - truth, axis=-1).mean())
    assert m.last_run['turns'] == 1 and set(m.last_run['turn_losses']) == {0, 1, 2, 3}
    assert min(m.last_run['turn_losses'], key=m.last_run['turn_losses'].get) == 1
    assert errors[4] < 0.5 * errors[1], errors
    # What it matched is the upright pair itself, brought into the turned target's pixels.
    upright = _tiny_matcher(iterations=2, refine='none', polish=0).match(src, src).flow
    from dense_match_ros.core.geometry import grid
    np.testing.assert_allclose(flows[4], grid.unrotate_flow(upright, 1, (w, h)), atol=1e-3)
    with pytest.raises(ValueError, match='rotations'):
        _tiny_matcher(rotations=3)


def test_shipped_checkpoint_improves_on_its_own_pretrained_output():
    """The shipped dmp_cpu.pt: loads through the registry, names the command that made it, and
    the per-pair optimisation lowers its test-time loss on a real photo's known warp."""
    if not (dmp_method.WEIGHTS.directory / 'dmp_cpu.pt').is_file():
        pytest.skip('no shipped dmp checkpoint')
    record = json.loads((dmp_method.WEIGHTS.directory / 'dmp_cpu.json').read_text())
    assert record['command'].startswith('dense-match-train dmp')
    src, tgt, gt = affine_photo_pair(240, 240, 6.0, 1.1, (12.0, -8.0))
    m = load_matcher('dmp', device='cpu', iterations=20, patience=0, min_update_px=0)
    # Its matchability goes through the record's table by default, one that predicts a
    # visible match (the pose's threshold would find nothing above a "right within 1 px" one).
    assert m.calibration == record['calibration']
    assert record['calibration']['truth'] == 'visible'
    assert m.net.config.confidence == 'mass'
    flow, match = m.match(src, tgt)
    assert m.last_run['loss'] < m.last_run['initial_loss']
    inner = (slice(30, -30), slice(30, -30))
    still = float(np.linalg.norm(gt, axis=-1)[inner].mean())
    assert float(np.linalg.norm(flow - gt, axis=-1)[inner].mean()) < 0.25 * still


def test_the_node_pipeline_runs_dmp_within_its_time_budget():
    """What the node does with ``method: dmp-scratch`` and ``method_options: '{time_budget_s: 0.3}'``:
    the loop stops on the budget and the flow is published."""
    from dense_match_ros.ros.pipeline import Frame, MatchPipeline, PipelineConfig
    src, tgt, _ = affine_photo_pair(96, 80, 0.0, 1.0, (3.0, 2.0))
    p = MatchPipeline(PipelineConfig(method='dmp-scratch', estimate_pose=False,
                                     method_options={'time_budget_s': 0.3}), warn=lambda r, m: None)
    assert p.process(Frame(image=src, stamp_ns=1, frame_id='cam', intrinsics=None)) is None
    for stamp, image in ((2, tgt), (3, src)):   # the first call also pays torch's warm-up
        out = p.process(Frame(image=image, stamp_ns=stamp, frame_id='cam', intrinsics=None))
        assert out.flow.shape == (80, 96, 2) and np.isfinite(out.flow).all()
    run = p.matcher.last_run
    assert run['reason'] == 'time' and run['seconds'] < 0.3 + 0.5
