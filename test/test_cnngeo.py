"""CNNGeo: transform math, network, grid loss, matcher contract and checks, two-stage training."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dense_match_ros.core.checkpoint import CheckpointError
from dense_match_ros.core.geometry import parametric, transforms as tf
from dense_match_ros.core.methods import cnngeo as cnngeo_method
from dense_match_ros.core.methods.cnngeo import CnnGeoAffineMatcher, CnnGeoMatcher
from dense_match_ros.core.networks.cnngeo import CnnGeoConfig, CnnGeoNet, CnnGeoOutput
from dense_match_ros.core.registry import available_methods, load_matcher
from dense_match_ros.data.synthetic import SyntheticPairGenerator
from dense_match_ros.training import checkpoint as ckpt
from dense_match_ros.training.cli import main
from dense_match_ros.training.cnngeo_task import (CnnGeoAffineTask, CnnGeoTpsTask, ensemble_main,
                                                  fit_sigma, grid_loss, predicted_points,
                                                  true_points)
from dense_match_ros.training.match_losses import cell_labels, match_loss, sampled_match_loss

torch.set_num_threads(1)
TINY = CnnGeoConfig(width=0.125, input_size=(64, 64), channels=(16, 8), kernel_sizes=(3, 1))
TINY_CLI = ['--set', 'data.image_size=[64,64]', '--set', 'model.input_size=[64,64]',
            '--set', 'model.width=0.125', '--set', 'model.channels=[16,8]',
            '--set', 'model.kernel_sizes=[3,1]', '--set', 'batch_size=2',
            '--set', 'loss.grid_points=5', '--set', 'optim.warmup_steps=5', '--set', 'log_every=1',
            '--set', 'threads=1', '--set', 'checkpoint_every=1000', '--no-progress']


def _net(seed: int = 0, **kw) -> CnnGeoNet:
    torch.manual_seed(seed)
    return CnnGeoNet(CnnGeoConfig(**{**TINY.__dict__, **kw}))


def _photo(seed: int = 1, size: int = 96) -> np.ndarray:
    """A smooth random photo: texture at every scale the tiny networks see."""
    rng = np.random.default_rng(seed)
    small = rng.random((size // 8, size // 8, 3)).astype(np.float32)
    import cv2
    return (cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype(np.uint8)


def _pairs(kinds, n: int = 3, size=(48, 56)):
    gen = SyntheticPairGenerator([_photo()], size=size, kinds=kinds, photometric=False)
    return [gen.pair(0, i) for i in range(n)]


def _random_affine(rng) -> np.ndarray:
    return tf.affine_theta(rng.uniform(-0.3, 0.3), rng.uniform(-0.4, 0.4), *rng.uniform(0.8, 1.2, 2),
                           *rng.uniform(-0.15, 0.15, 2))


def _random_tps(rng, jitter: float = 0.15) -> np.ndarray:
    return tf.tps_identity() + rng.uniform(-jitter, jitter, 18)


class _Fixed(CnnGeoMatcher):
    """The matcher around fixed transforms (forward, backward): what the network would say."""

    def __init__(self, kind, forward, backward=None, affine=None, **kw):
        super().__init__(net=_net(), **kw)
        if backward is None:   # not the forward one: a swapped direction must show
            backward = tf.AFFINE_IDENTITY if kind == 'affine' else tf.tps_identity()
        theta = torch.tensor(np.stack([forward, backward]), dtype=torch.float32)
        aff = torch.tensor(np.stack([affine if affine is not None else tf.AFFINE_IDENTITY] * 2),
                           dtype=torch.float32)
        self._fixed = (kind, theta, aff)

    def predict(self, source, target):
        return self._fixed


# ------------------------------------------------------------------------------ geometry


def test_grid_loss_is_zero_at_the_true_parameters_and_grows_away_from_them():
    points = parametric.grid_points(21)
    assert points.shape == (441, 2) and points.min() == -1 and points.max() == 1
    for kinds, stage in ((('affine', 'similarity'), 'affine'), (('tps',), 'tps')):
        pairs = _pairs(kinds)
        truth = torch.from_numpy(true_points(pairs, 21))
        theta = torch.tensor(np.stack([p.params['theta'] for p in pairs]), dtype=torch.float32)
        out = CnnGeoOutput(theta, None, None) if stage == 'affine' else CnnGeoOutput(
            torch.zeros(3, 6), theta, theta)
        assert float(grid_loss(predicted_points(out, stage, points), truth)) < 1e-10
        off = theta + 0.01
        out = CnnGeoOutput(off, None, None) if stage == 'affine' else CnnGeoOutput(off[:, :6], off, off)
        assert float(grid_loss(predicted_points(out, stage, points), truth)) > 1e-5
    # Homographies too: the truth is the homography at the grid points.
    pair = _pairs(('homography',), 1)[0]
    expected = tf.apply_transform('homography', np.asarray(pair.params['theta']),
                                  points.double().numpy())
    np.testing.assert_allclose(true_points([pair], 21)[0], expected, atol=1e-6)


def test_composed_transform_equals_warping_twice():
    rng = np.random.default_rng(0)
    affine, tps = _random_affine(rng), _random_tps(rng)
    composed = parametric.compose_affine_tps(affine, tps)
    pts = rng.uniform(-1.2, 1.2, (200, 2))
    np.testing.assert_allclose(tf.apply_tps(composed, pts), tf.apply_affine(affine, tf.apply_tps(tps, pts)),
                               atol=1e-12)
    torch_composed = parametric.compose_affine_tps_torch(torch.tensor(affine)[None], torch.tensor(tps)[None])
    np.testing.assert_allclose(torch_composed[0].numpy(), composed, atol=1e-12)
    # As images: the target warped by the affine onto the source grid, that warped by the TPS,
    # is the target warped once by the composition (a smooth image: bilinear twice ~ once).
    h, w = 60, 80
    ys, xs = np.mgrid[0:h, 0:w] / 40.0
    target = torch.tensor(np.stack([np.sin(2 * xs + ys), np.cos(xs - 3 * ys), np.sin(xs * ys)]),
                          dtype=torch.float64)[None]

    def warp(image, kind, theta):
        grid = parametric.dense_map(kind, torch.tensor(theta)[None], (w, h))
        return F.grid_sample(image, grid, align_corners=False, padding_mode='border'), grid

    aligned, _ = warp(target, 'affine', affine)
    twice, inner = warp(aligned, 'tps', tps)
    once, grid = warp(target, 'tps', composed)
    ok = (parametric.inside(grid * 1.1) & parametric.inside(inner * 1.1))[0]   # away from edges
    assert ok.sum() > 0.3 * h * w
    err = (twice - once).abs().amax(1)[0][ok]
    assert float(err.max()) < 0.03, float(err.max())


def _one_and_two_passes(net, option: str, kind: str, answer, stage):
    """The network's two-way output on a photo pair with one and with two passes of a stage
    (``option``), and what that stage regresses on the target aligned by the first output's
    ``answer`` (a transform of ``kind``): the second pass, computed by hand."""
    src, tgt = (F.interpolate(torch.tensor(_photo(seed)[None]).permute(0, 3, 1, 2).float() / 255.0,
                              size=TINY.input_size, mode='area') for seed in (1, 2))
    with torch.no_grad():
        one, two = (net.two_way(src, tgt, **{option: p}) for p in (1, 2))
        feats = net.features(torch.cat([src, tgt]))
        size = (src.shape[-1], src.shape[-2])
        aligned = F.grid_sample(torch.cat([tgt, src]), parametric.dense_map(kind, answer(one), size),
                                align_corners=False)
        return one, two, stage(net.correlation(feats, net.features(aligned)))


def test_a_further_affine_pass_composes_exactly_and_runs_on_the_aligned_target():
    """``compose_affine_affine_torch`` is the affine of applying both; the network's second
    affine pass regresses on the target aligned by the first and composes that way, and the
    TPS stage then runs on the target aligned by the composed affine."""
    rng = np.random.default_rng(8)
    outer, inner = (torch.tensor(_random_affine(rng)[None]) for _ in range(2))
    pts = torch.tensor(rng.uniform(-1, 1, (200, 2)))
    direct = parametric.transform_points_torch(
        'affine', outer, parametric.transform_points_torch('affine', inner, pts))
    composed = parametric.compose_affine_affine_torch(outer, inner)
    torch.testing.assert_close(parametric.transform_points_torch('affine', composed, pts), direct)
    net = _net(3).eval()
    with torch.no_grad():   # a regressor that no longer answers the identity whatever it sees
        net.affine.linear.weight.normal_(0.0, 0.02)
    one, two, step = _one_and_two_passes(net, 'affine_passes', 'affine', lambda out: out.affine,
                                         net.affine_stage)
    torch.testing.assert_close(two.affine, parametric.compose_affine_affine_torch(one.affine, step))
    assert not torch.allclose(two.affine, one.affine)
    with pytest.raises(ValueError, match='affine_passes'):
        CnnGeoMatcher(net=_net(), affine_passes=0)


def test_a_further_tps_pass_composes_into_one_close_tps():
    """``compose_tps_tps_torch``: exact for an identity correction, within a hundredth of the
    half-image for a small one (what a pass on an aligned pair regresses), and the network's
    further pass runs the TPS stage on the aligned target and composes that way."""
    rng = np.random.default_rng(5)
    outer = torch.tensor(_random_tps(rng)[None])
    identity = torch.tensor(tf.tps_identity()[None])
    np.testing.assert_allclose(parametric.compose_tps_tps_torch(outer, identity).numpy(),
                               outer.numpy(), atol=1e-9)
    inner = torch.tensor(_random_tps(rng, jitter=0.03)[None])
    fitted = parametric.compose_tps_tps_torch(outer, inner)
    pts = torch.tensor(rng.uniform(-1, 1, (300, 2)))
    direct = parametric.transform_points_torch(
        'tps', outer, parametric.transform_points_torch('tps', inner, pts))
    err = (parametric.transform_points_torch('tps', fitted, pts) - direct).norm(dim=-1)
    assert float(err.max()) < 0.01, float(err.max())
    net = _net(2).eval()
    one, two, step = _one_and_two_passes(net, 'tps_passes', 'tps', lambda out: out.composed, net.tps)
    assert torch.equal(one.affine, two.affine) and torch.equal(one.tps, two.tps)
    torch.testing.assert_close(two.composed, parametric.compose_tps_tps_torch(one.composed, step))
    with pytest.raises(ValueError, match='tps_passes'):
        CnnGeoMatcher(net=_net(), tps_passes=0)


def test_densified_flow_equals_warping_by_the_parameters():
    """Native size, different source and target sizes: the flow is T at every source pixel."""
    rng = np.random.default_rng(1)
    affine, tps = _random_affine(rng), _random_tps(rng)
    source = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    target = (rng.random((45, 45, 3)) * 255).astype(np.uint8)
    target = np.ascontiguousarray(np.repeat(np.repeat(target, 2, 0), 2, 1))   # 90x90
    pix = np.stack(np.meshgrid(np.arange(70.0), np.arange(50.0)), axis=-1)
    for kind, theta in (('tps', tps), ('affine', affine)):
        m = _Fixed(kind, theta)
        flow, _ = m.match(source, target)
        mapped = tf.to_pixels(tf.apply_transform(kind, theta, tf.to_normalized(pix, (70, 50))), (90, 90))
        np.testing.assert_allclose(flow, mapped - pix, atol=2e-3)
        # Sampling the target along the flow renders what grid_sample renders with the parameters.
        import cv2
        by_flow = cv2.remap(target.astype(np.float32), *(pix + flow).astype(np.float32).transpose(2, 0, 1),
                            cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        grid = parametric.dense_map(kind, torch.tensor(theta)[None].float(), (70, 50))
        by_theta = F.grid_sample(torch.from_numpy(target).permute(2, 0, 1)[None].float(), grid,
                                 align_corners=False, padding_mode='zeros')[0].permute(1, 2, 0).numpy()
        inner = parametric.inside(grid * 1.05)[0].numpy()
        assert np.abs(by_flow - by_theta)[inner].max() < 0.5


def test_flow_is_the_transform_without_inversion_on_a_synthetic_pair():
    """The generator renders source(x) = target(T(x)); fed (source, target), T *is* the flow."""
    for kind in ('tps', 'affine'):
        pair = _pairs((kind,), 1, size=(60, 80))[0]
        flow, _ = _Fixed(kind, np.asarray(pair.params['theta'])).match(pair.source, pair.target)
        np.testing.assert_allclose(flow[pair.valid], pair.flow[pair.valid], atol=2e-3)


def test_least_squares_fits_recover_exact_transforms():
    rng = np.random.default_rng(2)
    pts = rng.uniform(-1, 1, (300, 2))
    affine, tps = _random_affine(rng), _random_tps(rng)
    np.testing.assert_allclose(parametric.fit_affine(pts, tf.apply_affine(affine, pts)), affine, atol=1e-9)
    np.testing.assert_allclose(parametric.fit_tps(pts, tf.apply_tps(tps, pts)), tps, atol=1e-8)
    lean = parametric.apply_tps_lean(torch.tensor(tps)[None], torch.tensor(pts)[None])
    np.testing.assert_allclose(lean[0].numpy(), tf.apply_tps(tps, pts), atol=1e-12)
    on_grid = parametric.dense_map('tps', torch.tensor(tps)[None], (7, 5))
    base = tf.base_grid_torch(5, 7, 1, dtype=torch.float64)
    np.testing.assert_allclose(on_grid.numpy(), tf.apply_tps_torch(torch.tensor(tps)[None], base).numpy(),
                               atol=1e-12)
    assert parametric.degenerate_affine(tf.AFFINE_IDENTITY) == ''
    assert 'determinant' in parametric.degenerate_affine([-1, 0, 0, 0, 1, 0])
    assert 'outside' in parametric.degenerate_affine([0.2, 0, 0, 0, 0.2, 0])
    assert 'non-finite' in parametric.degenerate_affine([np.nan, 0, 0, 0, 1, 0])


# ------------------------------------------------------------------------------ network


def test_network_starts_at_the_identity_and_keeps_parameters_float32():
    net = _net().eval()
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(x, y)
    assert out.affine.dtype == out.composed.dtype == torch.float32
    np.testing.assert_allclose(out.affine.numpy(), np.tile(tf.AFFINE_IDENTITY, (2, 1)), atol=0)
    np.testing.assert_allclose(out.composed.numpy(), np.tile(tf.tps_identity(), (2, 1)), atol=1e-7)
    assert net(x, y, stages='affine').tps is None
    assert _net(tps=False).tps is None
    with pytest.raises(ValueError, match='input_size'):
        net(torch.rand(1, 3, 48, 64), torch.rand(1, 3, 48, 64))
    with pytest.raises(ValueError, match='too small'):
        CnnGeoNet(CnnGeoConfig(input_size=(64, 64)))                       # 4x4 cells, 7x7 kernel
    # The hierarchy composes: affine then TPS regressors with constant outputs.
    rng = np.random.default_rng(3)
    affine, tps = _random_affine(rng), _random_tps(rng)
    with torch.no_grad():
        net.affine.linear.bias.copy_(torch.tensor(affine))
        net.tps.linear.bias.copy_(torch.tensor(tps))
        out = net(x, y)
    np.testing.assert_allclose(out.composed[0].numpy(), parametric.compose_affine_tps(affine, tps), atol=1e-5)
    # Two-way: each direction is the plain forward of that direction.
    net = _net(4).eval()
    with torch.no_grad():
        both = net.two_way(x[:1], y[:1])
        forward, backward = net(x[:1], y[:1]), net(y[:1], x[:1])
    assert torch.allclose(both.composed[0], forward.composed[0], atol=1e-5)
    assert torch.allclose(both.composed[1], backward.composed[0], atol=1e-5)


def test_folded_batch_norm_gives_the_same_parameters_and_cannot_train():
    net = _net(9)
    for regressor in (net.affine, net.tps):                 # away from the zero-weight start
        torch.nn.init.normal_(regressor.linear.weight, std=0.05)
    net.train()
    for _ in range(2):                                       # non-trivial BN statistics
        net(torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64))
    net.eval()
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before, feat = net(x, y), net.features(x)
        after = net.fold_batch_norm()(x, y)
        assert torch.allclose(feat, net.features(x), atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert (before.composed - torch.tensor(tf.tps_identity())).abs().max() > 1e-2
    assert torch.allclose(before.composed, after.composed, atol=1e-4)
    with pytest.raises(RuntimeError, match='folded'):
        net.train()


def test_normalisation_switch_changes_the_matching_layer():
    on, off = _net(5), _net(5, normalize_matches=False)
    f = F.normalize(torch.randn(1, 16, 4, 4), dim=1)
    g = F.normalize(torch.randn(1, 16, 4, 4), dim=1)
    assert torch.allclose(on.correlation(f, g).norm(dim=1), torch.ones(1, 4, 4), atol=1e-4)
    assert (off.correlation(f, g) < 0).any()                                 # raw cosines


# ------------------------------------------------------------------------------ matcher


def test_matcher_contract_never_nan_and_registered():
    assert {'cnngeo', 'cnngeo-affine'} <= set(available_methods())
    rng = np.random.default_rng(4)
    src = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    tgt = rng.integers(0, 255, (40, 45, 3), dtype=np.uint8)
    for cls in (CnnGeoMatcher, CnnGeoAffineMatcher):
        m = cls(net=_net(6))
        for s, t in ((src, tgt), (np.zeros_like(src), np.zeros_like(tgt)), (src, src)):
            flow, match = m.match(s, t)
            assert flow.shape == (50, 70, 2) and flow.dtype == np.float32 and np.isfinite(flow).all()
            assert match.shape == (50, 70) and np.isfinite(match).all()
            assert 0 <= match.min() <= match.max() <= 1
    with pytest.raises(ValueError, match='precision'):
        CnnGeoMatcher(net=_net(), precision='fp8')
    with pytest.raises(ValueError, match='sigma'):
        CnnGeoMatcher(net=_net(), sigma=0)


def test_bad_inputs_raise_value_errors_naming_the_rule():
    m = CnnGeoMatcher(net=_net())
    good = np.zeros((32, 32, 3), np.uint8)
    for bad, rule in ((good.astype(np.float32), 'uint8'), (good[..., 0], 'HxWx3'),
                      (np.zeros((32, 32, 4), np.uint8), 'HxWx3'),
                      (np.zeros((15, 40, 3), np.uint8), 'at least 16 px')):
        for args in ((bad, good), (good, bad)):
            with pytest.raises(ValueError, match=rule):
                m.match(*args)


def test_round_trip_matchability_and_degenerate_affines():
    rng = np.random.default_rng(5)
    affine = tf.affine_theta(0.1, 0.0, 0.9, 0.9, 0.2, 0.0)
    inverse = np.linalg.inv(tf.affine_matrix(affine))[:2].ravel()
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    flow, match = _Fixed('affine', affine, inverse, affine=affine).match(img, img)
    inside = parametric.inside(parametric.dense_map('affine', torch.tensor(affine)[None], (64, 64)))[0].numpy()
    assert inside.mean() < 0.95
    np.testing.assert_allclose(match[inside], 1.0, atol=1e-4)               # consistent round trip
    assert np.all(match[~inside] == 0)                                     # lands outside
    _, worse = _Fixed('affine', affine, tf.AFFINE_IDENTITY, affine=affine).match(img, img)
    assert worse[inside].mean() < 0.5 * match[inside].mean()
    mirror = np.array([-1.0, 0, 0, 0, 1, 0])
    with pytest.warns(RuntimeWarning, match='determinant'):
        flow, match = _Fixed('affine', mirror, affine=mirror).match(img, img)
    assert np.isfinite(flow).all() and not match.any()
    with pytest.warns(RuntimeWarning, match='non-finite'):
        flow, match = _Fixed('tps', np.full(18, np.nan)).match(img, img)
    assert np.isfinite(flow).all() and not match.any()


def _train_state(net: CnnGeoNet, method: str, tmp_path, name: str = 'last.pt'):
    task = CnnGeoTpsTask() if method == 'cnngeo-tps' else CnnGeoAffineTask()
    cfg = {**net.config.__dict__}
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k != 'tps'}
    if method == 'cnngeo-tps':
        cfg['init_weights'] = 'unused'
    path = tmp_path / name
    torch.save({'format': ckpt.TRAIN_FORMAT, 'method': method, 'step': 3, 'wall_time_s': 60.0,
                'config': {'model': task.model_config(cfg)}, 'model': net.state_dict()}, path)
    return path


def test_weights_of_another_method_width_or_stage_are_refused(tmp_path):
    dgc_like = tmp_path / 'dgc.pt'
    torch.save({'format': ckpt.TRAIN_FORMAT, 'method': 'dgc', 'step': 1, 'config': {'model': {}},
                'model': {}}, dgc_like)
    with pytest.raises(CheckpointError, match=r"'dgc'.*cnngeo-tps or cnngeo-affine"):
        load_matcher('cnngeo', device='cpu', weights=str(dgc_like))
    full = _train_state(_net(7), 'cnngeo-tps', tmp_path)
    m = load_matcher('cnngeo', device='cpu', weights=str(full), width=0.125)
    assert m.record['checkpoint_method'] == 'cnngeo-tps'
    with pytest.raises(CheckpointError, match='expected a width-0.25 .* found width 0.125'):
        load_matcher('cnngeo', device='cpu', weights=str(full), width=0.25)
    affine_only = _train_state(_net(7, tps=False), 'cnngeo-affine', tmp_path, 'affine.pt')
    with pytest.raises(CheckpointError, match='expected cnngeo-tps, found cnngeo-affine'):
        load_matcher('cnngeo', device='cpu', weights=str(affine_only))
    assert load_matcher('cnngeo-affine', device='cpu', weights=str(affine_only)).net.tps is None
    # Shipped format: a failed checksum names the expected and the found digest.
    out = tmp_path / 'w' / 'cnngeo_test.pt'
    state = torch.load(full, weights_only=True)
    ckpt.export_weights(state, out, {'note': 'test'})
    load_matcher('cnngeo', device='cpu', weights=str(out))
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match='sha256 .* does not match its record'):
        load_matcher('cnngeo', device='cpu', weights=str(out))


def _perturbed(net: CnnGeoNet, seed: int) -> CnnGeoNet:
    """Regressors moved off their identity start, so members disagree."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for regressor in (net.affine, *net.affine_others, *([net.tps] if net.tps else [])):
            regressor.linear.weight.copy_(torch.randn(regressor.linear.weight.shape, generator=gen) * 0.05)
    return net.eval()


def test_the_affine_ensemble_averages_members_trained_apart_and_shares_one_trunk(tmp_path):
    a = _perturbed(_net(4, tps=False), 1)
    b = _perturbed(_net(4, tps=False), 2)                                # same trunk (seed 4)
    b.affine.load_state_dict(_perturbed(_net(5, tps=False), 3).affine.state_dict())
    top = _perturbed(_net(4), 6)
    top_state = {k: v.clone() for k, v in top.state_dict().items()}
    paths = [_train_state(n, m, tmp_path, f'{i}.pt') for i, (n, m) in
             enumerate(((a, 'cnngeo-affine'), (b, 'cnngeo-affine'), (top, 'cnngeo-tps')))]
    out = tmp_path / 'w' / 'cnngeo_ens.pt'
    assert ensemble_main(['--member', str(paths[0]), '--member', str(paths[1]),
                          '--tps', str(paths[2]), '--out', str(out)]) == 0
    record = json.loads(out.with_suffix('.json').read_text())
    assert record['method'] == 'cnngeo-tps' and len(record['ensemble']['members']) == 2
    assert [m['steps'] for m in record['ensemble']['members']] == [3, 3]   # training states
    assert record['stages'][-1]['affine_members'] == record['ensemble']['members']
    joined = load_matcher('cnngeo', device='cpu', weights=str(out)).net
    assert joined.config.affine_members == 2 and len(joined.affine_others) == 1
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        mean = (a(x, y, 'affine').affine + b(x, y, 'affine').affine) / 2
        got = joined(x, y)
    assert (a(x, y, 'affine').affine - b(x, y, 'affine').affine).abs().max() > 1e-3
    torch.testing.assert_close(got.affine, mean, atol=2e-3, rtol=0)    # fp16 weights
    # The TPS stage is the given one, on the pair the averaged affine aligned.
    top.affine.load_state_dict(a.affine.state_dict())
    top.affine_others = joined.affine_others                          # same members as joined
    torch.testing.assert_close(got.composed, top(x, y).composed, atol=5e-3, rtol=0)
    # Frozen as one stage when a TPS stage trains on it; folding keeps every member.
    joined.freeze(['backbone', 'affine'])
    assert not any(p.requires_grad for p in joined.affine_others.parameters())
    with torch.no_grad():
        torch.testing.assert_close(joined.fold_batch_norm()(x, y).affine, got.affine, atol=1e-4, rtol=0)
    # Members must share the trunk, and be single stages.
    other = _train_state(_perturbed(_net(9, tps=False), 1), 'cnngeo-affine', tmp_path, 'other.pt')
    with pytest.raises(ValueError, match='trunk differs'):
        ensemble_main(['--member', str(paths[0]), '--member', str(other), '--out', str(out)])
    with pytest.raises(ValueError, match='at least two'):
        ensemble_main(['--member', str(paths[0]), '--out', str(out)])
    # One affine stage under another run's TPS stage: both exactly as they were.
    assert ensemble_main(['--member', str(paths[1]), '--tps', str(paths[2]), '--out', str(out)]) == 0
    config, state, _ = ckpt.load_weights(out, 'cnngeo-tps')
    assert config['affine_members'] == 1 and config['tps']
    assert set(state) == set(top_state)
    for name, tensor in state.items():
        source = b.state_dict() if name.startswith(('affine.', 'backbone.')) else top_state
        torch.testing.assert_close(tensor, source[name].half().to(tensor.dtype))


def test_paper_ranges_widen_scale_and_control_points_and_unknown_names_are_refused():
    from dense_match_ros.data.synthetic import RANGES, random_affine, random_tps
    from dense_match_ros.training.batches import make_generator
    from dense_match_ros.training.config import DataConfig

    def scales(ranges):
        rng = np.random.default_rng(0)
        return np.concatenate([np.linalg.svd(random_affine(rng, ranges.affine).reshape(2, 3)[:, :2],
                                             compute_uv=False) for _ in range(400)])

    wide, narrow = scales(RANGES['paper']), scales(RANGES['default'])
    assert narrow.min() >= 0.75 - 1e-9 and narrow.max() <= 1.25 + 1e-9
    assert wide.min() >= 0.5 - 1e-9 and wide.max() <= 2.0 + 1e-9
    assert wide.max() > 1.8 and wide.min() < 0.6                       # the range is used
    assert abs(np.median(np.log(wide))) < 0.1                          # log-uniform: 2x as likely as 0.5x
    rng = np.random.default_rng(1)
    moved = np.abs(np.stack([random_tps(rng, RANGES['paper'].tps_jitter) for _ in range(200)])
                   - tf.tps_identity())
    assert 0.45 < moved.max() <= 0.5
    gen = make_generator(DataConfig(image_size=(32, 32), ranges='paper'))
    assert gen.tps_jitter == 0.5 and gen.affine.log_scale
    with pytest.raises(ValueError, match="data.ranges must be one of \\['default', 'paper'\\]"):
        make_generator(DataConfig(ranges='wider'))


def test_missing_weights_name_the_training_command(tmp_path, monkeypatch):
    monkeypatch.setattr(cnngeo_method.WEIGHTS, 'directory', tmp_path)
    for name in ('cnngeo', 'cnngeo-affine'):
        with pytest.raises(FileNotFoundError, match='dense-match-train cnngeo-affine'):
            load_matcher(name, device='cpu')


def test_sigma_fit_picks_a_listed_value():
    pairs = _pairs(('affine',), 2, size=(64, 64))
    fit = fit_sigma(_Fixed('affine', np.asarray(pairs[0].params['theta'])), pairs, sigmas=(0.5, 2.0, 8.0))
    assert fit['sigma_px'] in (0.5, 2.0, 8.0) and 0 <= fit['jaccard'] <= 1


# ------------------------------------------------------------------------------ training


def _losses(run):
    return [(r['step'], r['loss']) for r in map(json.loads, (run / 'log.jsonl').read_text().splitlines())]


def test_task_configs_check_stage_and_architecture(tmp_path):
    affine, tps = CnnGeoAffineTask(), CnnGeoTpsTask()
    assert affine.model_config({})['tps'] is False and affine.loss_config({})['grid_points'] == 21
    with pytest.raises(ValueError, match='widht'):
        affine.model_config({'widht': 1})
    with pytest.raises(ValueError, match='model.tps'):
        affine.model_config({'tps': True})
    with pytest.raises(ValueError, match='affine_weights'):
        tps.model_config({})
    stage1 = _train_state(_net(8, tps=False), 'cnngeo-affine', tmp_path)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.__dict__.items() if k != 'tps'}
    with pytest.raises(ValueError, match='expected width 0.25, found 0.125'):
        tps.build_model(tps.model_config({**cfg, 'width': 0.25, 'affine_weights': str(stage1)}))
    net = tps.build_model(tps.model_config({**cfg, 'affine_weights': str(stage1)}))
    net.train()
    assert not net.backbone.training and not net.affine.training and net.tps.training
    assert not any(p.requires_grad for p in net.affine.parameters())
    # model.tps_init: the TPS regressor of a network on another trunk, over stage 1's.
    other = _train_state(_perturbed(_net(9), 4), 'cnngeo-tps', tmp_path, 'other.pt')
    net = tps.build_model(tps.model_config({**cfg, 'affine_weights': str(stage1),
                                            'tps_init': str(other)}))
    theirs, mine = torch.load(other)['model'], net.state_dict()
    stage1_state = torch.load(stage1)['model']
    assert all(torch.equal(mine[k], v) for k, v in theirs.items() if k.startswith('tps.'))
    assert all(torch.equal(mine[k], v) for k, v in stage1_state.items())
    with pytest.raises(ValueError, match='holds no TPS stage'):
        tps.build_model(tps.model_config({**cfg, 'affine_weights': str(stage1),
                                          'tps_init': str(stage1)}))


def test_cell_labels_name_the_target_cell_of_each_true_match_and_drop_the_rest():
    flow = torch.zeros(2, 48, 48, 2)
    flow[0, ..., 0] = 16.0                                    # one cell right
    flow[1, ..., 1] = -20.0                                   # 20 px up: from the cell above
    valid = torch.ones(2, 48, 48, dtype=torch.bool)
    valid[1, 24, 40] = False                                  # centre of source cell (1, 2)
    labels = cell_labels(flow, valid)
    assert labels[0].tolist() == [[1, 2, -1], [4, 5, -1], [7, 8, -1]]
    assert labels[1].tolist() == [[-1, -1, -1], [0, 1, -1], [3, 4, 5]]


def test_the_match_loss_rewards_features_that_find_the_true_cell_and_trains_the_trunk():
    net = _net(3, tps=False)
    labels = torch.arange(9).view(1, 3, 3)                    # identity on a 3x3 grid
    feats = F.normalize(torch.randn(1, 8, 3, 3), dim=1)
    right, acc = match_loss(feats, feats, labels, 0.07)
    wrong, _ = match_loss(feats, feats.flip(-1), labels, 0.07)
    assert acc == 1.0 and float(right) < float(wrong)
    none, none_acc = match_loss(feats, feats, torch.full((1, 3, 3), -1), 0.07)
    assert float(none) == 0.0 and none_acc == 0.0            # nothing known: no signal, no NaN
    # Through the task: the trunk gets gradient from the matches when it learns.
    task = CnnGeoAffineTask()
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    batch = {'source': images, 'target': images, 'flow': torch.zeros(2, 64, 64, 2),
             'valid': torch.ones(2, 64, 64, dtype=torch.bool),
             'points': parametric.grid_points(5).float().expand(2, -1, -1)}
    loss_config = task.loss_config({'grid_points': 5, 'match_weight': 0.5})
    loss, metrics = task.loss(net.train(), batch, loss_config)
    loss.backward()
    assert 0.0 <= metrics['match_acc'] <= 1.0 and np.isfinite(metrics['match_ce'])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.backbone.parameters())
    # A wrapper that, like DistributedDataParallel, only sees its forward: the same loss,
    # and the features come from that forward (one trunk pass serves both losses).
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            calls.append(kwargs)
            return self.module(*args, **kwargs)

    net.eval()
    plain, plain_metrics = task.loss(net, batch, loss_config)
    wrapped, wrapped_metrics = task.loss(Wrapper(net), batch, loss_config)
    assert calls == [{'stages': 'affine', 'with_features': True, 'feature_levels': ()}]
    assert torch.allclose(plain, wrapped) and wrapped_metrics == pytest.approx(plain_metrics)
    with torch.no_grad():
        out = net(images.float() / 255, images.float().flip(-1) / 255, stages='affine',
                  with_features=True)
        assert torch.equal(out.features[1], net.features(images.float().flip(-1) / 255))
        assert net(images.float() / 255, images.float() / 255, stages='affine').features is None
    with pytest.raises(ValueError, match='match_temperature'):
        task.loss_config({'match_temperature': 0.0})


def test_the_shallow_level_match_loss_scores_drawn_cells_and_trains_the_levels_above_it():
    # Identity labels on a 4x4 grid of cells, every cell known: the right features win.
    labels = torch.arange(16).view(1, 4, 4)
    feats = torch.randn(1, 8, 4, 4)
    keys = torch.rand(1, 16)
    right, acc = sampled_match_loss(feats, feats, labels, keys, 5, 0.07)
    wrong, _ = sampled_match_loss(feats, feats.flip(-1), labels, keys, 5, 0.07)
    assert acc == 1.0 and float(right) < float(wrong)
    # Only labelled cells are drawn, the highest keys first: with 3 of 16 known and 3 points,
    # exactly those 3 are scored, so corrupting an unknown cell's source feature changes nothing.
    few = torch.full((1, 4, 4), -1)
    few[0, 0, :3] = torch.tensor([0, 1, 2])
    base, _ = sampled_match_loss(feats, feats, few, keys, 3, 0.07)
    other = feats.clone()
    other[0, :, 3, 3] = -other[0, :, 3, 3]
    assert torch.equal(base, sampled_match_loss(other, feats, few, keys, 3, 0.07)[0])
    none, none_acc = sampled_match_loss(feats, feats, torch.full((1, 4, 4), -1), keys, 3, 0.07)
    assert float(none) == 0.0 and none_acc == 0.0
    # Through the task: conv3's loss alone (no pool4 term) reaches the trunk up to conv3,
    # and the batch carries the drawn keys (from the loader's generator: resumes draw alike).
    task = CnnGeoAffineTask()
    loss_config = task.loss_config({'grid_points': 5, 'level_match': ['conv3'],
                                    'level_match_weight': 1.0, 'level_points': 32})
    gen = SyntheticPairGenerator(photos=[_photo(1, 96)], size=(64, 64))
    pairs = [gen.pair(3, i) for i in range(2)]
    extra = task.extra_batch(pairs, np.random.default_rng(0), loss_config)
    assert extra['keys_conv3'].shape == (2, 16 * 16)
    np.testing.assert_array_equal(extra['keys_conv3'],
                                  task.extra_batch(pairs, np.random.default_rng(0), loss_config)['keys_conv3'])
    net = _net(3, tps=False)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    batch = {'source': images, 'target': images, 'flow': torch.zeros(2, 64, 64, 2),
             'valid': torch.ones(2, 64, 64, dtype=torch.bool),
             'points': parametric.grid_points(5).float().expand(2, -1, -1),
             'keys_conv3': torch.from_numpy(extra['keys_conv3'])}
    net.train()
    grid_only, _ = task.loss(net, batch, task.loss_config({'grid_points': 5}))
    loss, metrics = task.loss(net, batch, loss_config)
    assert 0.0 <= metrics['match_acc_conv3'] <= 1.0 and 'match_ce' not in metrics
    assert float(loss.detach()) > float(grid_only.detach())
    net.zero_grad()
    (loss - grid_only).backward()     # the level term alone
    first = net.backbone.blocks[0][0].weight.grad
    assert first is not None and first.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.backbone.blocks[3].parameters())
    with pytest.raises(ValueError, match='level_match'):
        task.loss_config({'level_match': ['pool4'], 'level_match_weight': 1.0})


def test_cli_affine_stage_resumes_exactly_then_the_tps_stage_trains_and_exports(tmp_path):
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    assert main(['cnngeo-affine', '--steps', '20', '--out', str(whole), *TINY_CLI]) == 0
    assert main(['cnngeo-affine', '--steps', '20', '--stop-at', '10', '--out', str(split), *TINY_CLI]) == 0
    assert [s for s, _ in _losses(split)] == list(range(1, 11))
    assert main(['cnngeo-affine', '--steps', '20', '--out', str(split), *TINY_CLI]) == 0
    a, b = _losses(whole), _losses(split)
    assert [s for s, _ in a] == list(range(1, 21)) and [s for s, _ in b] == list(range(1, 21))
    np.testing.assert_array_equal([x for _, x in a], [x for _, x in b])
    assert all(np.isfinite(x) for _, x in a)
    first = ckpt.load_training_state(whole / 'last.pt')
    stage2 = tmp_path / 'tps'
    assert main(['cnngeo-tps', '--steps', '3', '--out', str(stage2), *TINY_CLI,
                 '--set', f'model.affine_weights={whole / "last.pt"}']) == 0
    second = ckpt.load_training_state(stage2 / 'last.pt')
    for k, v in first['model'].items():                                  # stage 1 frozen
        assert torch.equal(second['model'][k], v), k
    assert any(not torch.equal(v, CnnGeoNet(TINY).state_dict()[k]) for k, v in second['model'].items()
               if k.startswith('tps.linear'))
    out = tmp_path / 'w' / 'cnngeo_test.pt'
    assert main(['export', str(stage2), '--out', str(out)]) == 0
    record = json.loads(out.with_suffix('.json').read_text())
    assert record['method'] == 'cnngeo-tps' and record['dtype'] == 'float16'
    # The affine stage's run, never exported itself, heads the stage chain.
    assert [(st['steps'], st['init_weights']) for st in record['stages']] == [
        (20, None), (3, str(whole / 'last.pt'))]
    assert record['stages'][0]['command'].startswith('dense-match-train cnngeo-affine')
    rng = np.random.default_rng(6)
    src = rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)
    for name in ('cnngeo', 'cnngeo-affine'):
        flow, match = load_matcher(name, device='cpu', weights=str(out)).match(src, src)
        assert np.isfinite(flow).all() and np.isfinite(match).all()
    # The fitted sigmas land in the record (each method its own) and the matchers read them.
    from dense_match_ros.training.cnngeo_task import sigma_main
    for name, key in (('cnngeo', 'sigma_px'), ('cnngeo-affine', 'sigma_px_affine')):
        assert sigma_main(['--method', name, '--weights', str(out), '--pairs', '2', '--write']) == 0
        calibration = json.loads(out.with_suffix('.json').read_text())['calibration']
        assert load_matcher(name, device='cpu', weights=str(out)).sigma == calibration[key]
    assert set(calibration['fits']) == {'cnngeo', 'cnngeo-affine'}
    # The record's inference.tps_passes sets the default; an option overrides it.
    assert load_matcher('cnngeo', device='cpu', weights=str(out)).tps_passes == 1
    record = json.loads(out.with_suffix('.json').read_text())
    out.with_suffix('.json').write_text(json.dumps({**record, 'inference': {'tps_passes': 2}}))
    assert load_matcher('cnngeo', device='cpu', weights=str(out)).tps_passes == 2
    assert load_matcher('cnngeo', device='cpu', weights=str(out), tps_passes=1).tps_passes == 1
    out.with_suffix('.json').write_text(json.dumps({**record, 'inference': {'tps_passes': 0}}))
    with pytest.raises(CheckpointError, match='tps_passes'):
        load_matcher('cnngeo', device='cpu', weights=str(out))


def test_shipped_cpu_checkpoint_recovers_a_known_warp():
    """The shipped cnngeo_cpu.pt: loads through the registry for both methods, names the
    commands that made it, and recovers a rotation/zoom/shift of a real photo far better
    than no motion would."""
    if not (cnngeo_method.WEIGHTS.directory / 'cnngeo_cpu.pt').is_file():
        pytest.skip('no shipped cnngeo checkpoint')
    from photo_warp import affine_photo_pair
    record = json.loads((cnngeo_method.WEIGHTS.directory / 'cnngeo_cpu.json').read_text())
    assert record['command'].startswith('dense-match-train cnngeo-tps')
    assert record['dtype'] == 'float16' and record['calibration']['sigma_px'] > 0
    src, tgt, gt = affine_photo_pair(240, 240, 8.0, 1.1, (12.0, -8.0))
    inner = (slice(30, -30), slice(30, -30))
    still = np.median(np.linalg.norm(gt, axis=-1)[inner])
    for name in ('cnngeo', 'cnngeo-affine'):
        m = load_matcher(name, device='cpu', width=0.25)
        flow, match = m.match(src, tgt)
        err = np.median(np.linalg.norm(flow - gt, axis=-1)[inner])
        assert err < 0.5 * still, (name, err, still)
        assert np.isfinite(match).all()


def test_the_network_timing_runs_cnngeo_at_its_one_size_whatever_the_frame():
    # On the lent GPU, `dense-match-bench --network` at 640x480 stopped on CNNGeo's size check.
    from dense_match_ros.evaluation.bench_match import bench_network
    times = bench_network(_net(), 'cpu', [(48, 80), (96, 128)], n=1)
    assert list(times) == ['64x64 fp32'] and times['64x64 fp32']['median_ms'] > 0
