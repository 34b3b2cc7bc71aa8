"""DGC-Net / DGC+M-Net: network shapes, correlation, losses, training step, matcher, export."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dense_match_ros.core.geometry import grid
from dense_match_ros.training import losses
from dense_match_ros.core.methods import dgc as dgc_method
from dense_match_ros.core.methods.dgc import DgcMatcher
from dense_match_ros.core.networks.correlation import global_correlation, normalize_correlation
from dense_match_ros.core.networks.dgc import PYRAMID, DgcNet, DgcNetConfig, DgcOutput
from dense_match_ros.core.geometry.transforms import base_grid_torch
from dense_match_ros.training import checkpoint as ckpt
from dense_match_ros.training.dgc_task import DgcLossConfig, DgcTask, dgc_loss

torch.set_num_threads(1)
TINY = DgcNetConfig(width=0.125, input_size=(32, 32))


def _net(seed: int = 0, **kw) -> DgcNet:
    torch.manual_seed(seed)
    return DgcNet(DgcNetConfig(**{**TINY.__dict__, **kw}))


def test_pyramid_levels_and_shapes_follow_the_input():
    net = _net().eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    assert isinstance(out, DgcOutput) and len(out.grids) == len(PYRAMID) == 5
    assert [tuple(g.shape) for g in out.grids] == [(2, 2, s, s) for s in (2, 4, 8, 16, 32)]
    assert out.matchability.shape == (2, 1, 32, 32)
    # Bigger, non-square source and a differently sized target: the coarsest level runs on
    # both images at the trained 32x32 (its 2x2 grid is that of the resized pair), the
    # finer levels follow the source.
    src, tgt = torch.rand(1, 3, 64, 48), torch.rand(1, 3, 48, 80)
    with torch.no_grad():
        out = net(src, tgt)
        small = net(*(torch.nn.functional.interpolate(x, size=(32, 32), mode='bilinear',
                                                      align_corners=False, antialias=True)
                      for x in (src, tgt)))
    assert [tuple(g.shape[-2:]) for g in out.grids] == [(2, 2), (8, 6), (16, 12), (32, 24), (64, 48)]
    assert torch.allclose(out.grids[0], small.grids[0], atol=1e-5)
    assert _net(matchability=False).eval()(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)).matchability is None
    with pytest.raises(ValueError, match='multiples of 16'):
        DgcNet(DgcNetConfig(input_size=(40, 40)))


def test_width_scales_the_network():
    small = sum(p.numel() for p in _net(width=0.125).parameters())
    big = sum(p.numel() for p in _net(width=0.25).parameters())
    assert big > 2.5 * small


def test_correlation_indexes_target_positions_and_is_normalised():
    torch.manual_seed(0)
    feat = torch.nn.functional.normalize(torch.randn(1, 16, 4, 5), dim=1)
    shifted = torch.roll(feat, shifts=1, dims=3)          # target(x + 1) = source(x)
    corr = global_correlation(feat, shifted)
    assert corr.shape == (1, 20, 4, 5)
    best = corr[0].argmax(dim=0)                          # channel = ty * Wt + tx
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(5), indexing='ij')
    assert torch.equal(best, ys * 5 + (xs + 1) % 5)
    assert torch.allclose(corr.amax(dim=1), torch.ones(1, 4, 5), atol=1e-5)  # cosines, peak 1
    normed = normalize_correlation(corr)
    assert (normed >= 0).all()
    assert torch.allclose(normed.norm(dim=1), torch.ones(1, 4, 5), atol=1e-4)
    # A source position with no positive score stays all-zero (no division blow-up).
    assert torch.count_nonzero(normalize_correlation(-corr.abs())) == 0


def test_flow_grid_conversions_match_the_numpy_convention():
    rng = np.random.default_rng(0)
    flow = rng.normal(0, 5, (1, 6, 7, 2)).astype(np.float32)
    g = losses.flow_to_grid_torch(torch.from_numpy(flow), target_size=(9, 11))
    ref = grid.flow_to_grid(flow[0], (11, 9))
    assert np.allclose(g[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    back = losses.grid_to_flow_torch(g, target_size=(9, 11))
    assert np.allclose(back.numpy(), flow, atol=1e-4)


def test_ground_truth_downsampling_keeps_pixel_centres_and_strict_validity():
    ident = base_grid_torch(16, 16, 1).permute(0, 3, 1, 2)
    valid = torch.ones(1, 16, 16, dtype=torch.bool)
    valid[0, 0, 0] = False
    g, ok = losses.downsample_target(ident, valid, (4, 4))
    coarse = base_grid_torch(4, 4, 1).permute(0, 3, 1, 2)
    assert not ok[0, 0, 0] and ok.sum() == 15                # one bad fine pixel spoils its cell
    m = ok[:, None].expand_as(g)
    assert torch.allclose(g[m], coarse[m], atol=1e-6)        # the others: exact pixel centres


def test_masked_loss_ignores_invalid_pixels():
    torch.manual_seed(0)
    pred = [torch.randn(1, 2, s, s, requires_grad=True) for s in (2, 4, 8)]
    gt = torch.randn(1, 2, 8, 8)
    valid = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid[:, :, :4] = True                                    # left half known
    garbage = gt.clone()
    garbage[:, :, :, 4:] = float('nan')                       # unknown pixels: anything at all
    a, _ = losses.hierarchical_l1(pred, gt, valid)
    b, _ = losses.hierarchical_l1(pred, garbage, valid)
    assert torch.isfinite(b) and torch.allclose(a, b)
    b.backward()
    assert all(torch.isfinite(p.grad).all() for p in pred)
    assert pred[-1].grad[..., 4:].abs().sum() == 0            # no gradient from invalid pixels
    moved = gt.clone()
    moved[:, :, :, :4] += 0.5                                 # but valid pixels do count
    c, _ = losses.hierarchical_l1(pred, moved, valid)
    assert not torch.allclose(a, c)
    # BCE pushes matchability towards the mask.
    logits = torch.where(valid, 5.0, -5.0)[:, None].float()
    assert losses.matchability_bce(logits, valid) < losses.matchability_bce(-logits, valid)


def _identity_batch(b: int = 2, size: int = 32) -> dict:
    torch.manual_seed(1)
    # Smooth random images: matchable texture at every level.
    img = torch.nn.functional.interpolate(torch.rand(b, 3, size // 4, size // 4), size=(size, size),
                                          mode='bilinear', align_corners=False)
    img = (img * 255).round().to(torch.uint8)
    return {'source': img, 'target': img.clone(), 'flow': torch.zeros(b, size, size, 2),
            'valid': torch.ones(b, size, size, dtype=torch.bool)}


def test_training_steps_lower_the_loss_on_an_identity_batch():
    net = _net(3)
    batch = _identity_batch()
    cfg = DgcLossConfig()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    first, metrics = dgc_loss(net, batch, cfg)
    assert set(f'epe_{lv}' for lv in PYRAMID) <= set(metrics)
    for _ in range(6):
        loss, _ = dgc_loss(net, batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, _ = dgc_loss(net, batch, cfg)
    assert float(last.detach()) < 0.7 * float(first.detach())
    with pytest.raises(ValueError, match='input_size'):
        dgc_loss(net, {**batch, 'source': batch['source'][..., :16], 'target': batch['target'][..., :16],
                       'flow': batch['flow'][:, :, :16], 'valid': batch['valid'][:, :, :16]}, cfg)


def test_task_configs_fill_defaults_and_reject_typos():
    task = DgcTask()
    model = task.model_config({'width': 0.25})
    assert model['input_size'] == [240, 240] and model['freeze_backbone'] is False
    assert task.loss_config({})['level_weights'] == [1.0] * 5
    with pytest.raises(ValueError, match='widht'):
        task.model_config({'widht': 1})
    with pytest.raises(ValueError, match='level_weights'):
        task.loss_config({'level_weights': [1.0, 1.0]})
    frozen = task.build_model(task.model_config({**TINY.__dict__, 'input_size': [32, 32],
                                                 'freeze_backbone': True}))
    frozen.train()
    assert not frozen.backbone.training and frozen.decoders.training
    assert not any(p.requires_grad for p in frozen.backbone.parameters())


def _state(net: DgcNet) -> dict:
    cfg = DgcTask().model_config({**net.config.__dict__, 'input_size': list(net.config.input_size)})
    return {'method': 'dgc', 'step': 7, 'config': {'model': cfg}, 'model': net.state_dict()}


def test_fp16_export_round_trip(tmp_path):
    net = _net(5).eval()
    record = ckpt.export_weights(_state(net), tmp_path / 'dgc_test.pt', {'note': 'test'}, half=True)
    assert record['dtype'] == 'float16' and json.loads((tmp_path / 'dgc_test.json').read_text())['sha256']
    loaded, rec = dgc_method.WEIGHTS.load(tmp_path / 'dgc_test.pt')
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a, b = net(x, y), loaded(x, y)
    for ga, gb in zip(a.grids, b.grids):
        assert torch.allclose(ga, gb, atol=2e-2)
    assert rec['steps'] == 7
    with pytest.raises(ValueError, match='hilm'):
        ckpt.load_weights(tmp_path / 'dgc_test.pt', 'hilm')


def test_matcher_interface_with_a_random_tiny_checkpoint(tmp_path):
    net = _net(6)
    path = tmp_path / 'last.pt'
    torch.save({'format': ckpt.TRAIN_FORMAT, **_state(net)}, path)
    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    tgt = rng.integers(0, 255, (40, 45, 3), dtype=np.uint8)
    for mode in ('resize', 'pyramid'):
        m = DgcMatcher(weights=str(path), mode=mode, max_side=64)
        flow, match = m.match(src, tgt)
        assert flow.shape == (50, 70, 2) and flow.dtype == np.float32
        assert match.shape == (50, 70) and match.min() >= 0 and match.max() <= 1
        assert np.isfinite(flow).all()
    with pytest.raises(ValueError, match='mode'):
        DgcMatcher(weights=str(path), mode='bogus')


def test_no_checkpoint_gives_an_error_naming_the_training_command(tmp_path, monkeypatch):
    monkeypatch.setattr(dgc_method.WEIGHTS, 'directory', tmp_path)
    with pytest.raises(FileNotFoundError, match='dense-match-train'):
        DgcMatcher()


class _IdentityNet(DgcNet):
    """Predicts 'every source pixel maps to the same normalised position in the target'."""

    def forward(self, source, target):
        b, _, h, w = source.shape
        g = base_grid_torch(h, w, b).permute(0, 3, 1, 2)
        return DgcOutput([g], None)


def test_matcher_converts_grids_to_the_package_flow_convention():
    m = DgcMatcher(net=_IdentityNet(TINY))
    src = np.zeros((30, 40, 3), np.uint8)
    tgt = np.zeros((60, 80, 3), np.uint8)                     # the same view at twice the size
    flow, match = m.match(src, tgt)
    expected = grid.map_to_flow(grid.rescale_points(grid.pixel_coords(30, 40), (40, 30), (80, 60)))
    # Inside, exact; on the outermost pixels bilinear upsampling (resize_flow) clamps instead of
    # extrapolating, by less than one working pixel.
    assert np.allclose(flow[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1e-3)
    assert np.abs(flow - expected).max() < 80 / 32
    assert np.allclose(match, 1.0)                            # in bounds everywhere
    flow, _ = m.match(src, src)
    assert np.abs(flow[1:-1, 1:-1]).max() < 1e-3


def test_level_flows_end_with_the_matched_flow(tmp_path):
    m = DgcMatcher(net=_net(8))
    rng = np.random.default_rng(1)
    src = rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)
    tgt = rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)
    flows = m.level_flows(src, tgt)
    assert len(flows) == 5 and all(f.shape == (40, 36, 2) for f in flows)
    assert np.allclose(flows[-1], m.match(src, tgt).flow, atol=1e-4)
    assert m.level_labels(src) == ['pool4 (2 px)', 'conv4 (4 px)', 'conv3 (8 px)',
                                   'conv2 (16 px)', 'conv1 (32 px)']   # trained at 32x32


def test_registered_and_loadable_through_the_registry(tmp_path, monkeypatch):
    from dense_match_ros.core.registry import available_methods, load_matcher
    assert 'dgc' in available_methods()
    path = tmp_path / 'last.pt'
    torch.save({'format': ckpt.TRAIN_FORMAT, **_state(_net(9))}, path)
    m = load_matcher('dgc', device='cpu', weights=str(path), mode='pyramid')
    assert m.name == 'dgc' and m.mode == 'pyramid'
    monkeypatch.setattr(dgc_method.WEIGHTS, 'directory', tmp_path / 'none')
    with pytest.raises(FileNotFoundError, match='gpu_train_dgc'):
        load_matcher('dgc', device='cpu')


def test_grids_stay_float32_with_half_or_bf16_features():
    net = _net(10).eval()
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(x, y)
    assert all(g.dtype == torch.float32 for g in out.grids)


def test_init_weights_starts_every_layer_from_a_checkpoint(tmp_path):
    """Stage two of a frozen-then-fine-tuned recipe: the whole net from stage one, trunk free."""
    first = _net(11)
    path = tmp_path / 'last.pt'
    torch.save({'format': ckpt.TRAIN_FORMAT, **_state(first)}, path)
    task = DgcTask()
    second = task.build_model(task.model_config({**TINY.__dict__, 'input_size': [32, 32],
                                                 'init_weights': str(path)}))
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(p.requires_grad for p in second.backbone.parameters())


def test_shipped_cpu_checkpoint_recovers_a_known_warp():
    """The shipped dgc_cpu.pt: loads through the registry, names the command that made it,
    and recovers a homography-like warp of a real photo to within a few pixels."""
    from dense_match_ros.core.registry import load_matcher
    from photo_warp import affine_photo_pair
    record = json.loads((dgc_method.WEIGHTS.directory / 'dgc_cpu.json').read_text())
    assert record['command'].startswith('dense-match-train dgc --config config/train_dgc_cpu_hilm.yaml')
    assert record['evaluation'] and record['dtype'] == 'float16'
    m = load_matcher('dgc', device='cpu')
    assert Path(m.weights).name == 'dgc_cpu.pt' and m.input_size == (128, 128)
    src, tgt, gt = affine_photo_pair(160, 160, 6.0, 1.08, (5.0, -3.0))
    flow, match = m.match(src, tgt)
    inner = (slice(20, -20), slice(20, -20))
    err = np.linalg.norm(flow - gt, axis=-1)[inner]
    assert np.median(err) < 2.0, np.median(err)
    assert match[inner].mean() > 0.5
    # The DIS residual at full resolution makes the same match more precise.
    refined, match_refined = load_matcher('dgc', device='cpu', refine='dis').match(src, tgt)
    err_refined = np.linalg.norm(refined - gt, axis=-1)[inner]
    assert np.median(err_refined) < 0.8 * np.median(err), (np.median(err_refined), np.median(err))
    np.testing.assert_array_equal(match_refined, match)  # the network's matchability


def test_refine_option_is_checked_when_the_matcher_is_built():
    with pytest.raises(ValueError, match='refine must be one of'):
        DgcMatcher(net=_net(), refine='raft')
    with pytest.raises(ValueError, match='refine_preset must be one of'):
        DgcMatcher(net=_net(), refine='dis', refine_preset='slow')
    with pytest.raises(ValueError, match='fb_sigma must be >= 0'):
        DgcMatcher(net=_net(), fb_sigma=-1.0)


def test_fb_sigma_multiplies_the_head_by_the_round_trip_consistency():
    """fb_sigma > 0: the same flow, and matchability = head x exp(-(e / sigma)^2) of the
    round trip through the matcher's own backward flow."""
    rng = np.random.default_rng(3)
    src = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    tgt = np.roll(src, 2, axis=1)
    net = _net()
    plain = DgcMatcher(net=net, refine='dis')
    checked = DgcMatcher(net=net, refine='dis', fb_sigma=2.0)
    flow, head = plain.match(src, tgt)
    backward, _ = plain.match(tgt, src)
    flow_checked, match_checked = checked.match(src, tgt)
    np.testing.assert_array_equal(flow_checked, flow)
    expected = head * grid.forward_backward_consistency(flow, backward, 2.0)
    np.testing.assert_allclose(match_checked, expected, rtol=1e-6, atol=1e-7)
    assert match_checked.max() <= head.max()
