"""The ``hilm`` method: descriptor-map geometry, coarse-to-fine search, the full pipeline.

The pipeline tests use an *oracle* network whose descriptors are a smooth, unique function
of the pixel colour, on images whose colour encodes position. Matching then has one right
answer everywhere, so the tests check the geometry (strides, cell centres, sub-cell
refinement, forward-backward check, densification, resizing back) without training.
"""
import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dense_match_ros.core.geometry import grid
from dense_match_ros.core.methods.hilm_hierarchical import (cells_to_pixels, hierarchical_match, nearest_cells,
                                               pixels_to_cells, refine_in_window, sample_descriptors)
from dense_match_ros.core.methods import hilm as hilm_mod
from dense_match_ros.core.methods.hilm import HilmMatcher
from dense_match_ros.core.registry import available_methods, load_matcher


class OracleNet(torch.nn.Module):
    """Random Fourier features of the (R, G) colour, average-pooled to strides 2 and 8."""

    shallow_stride, deep_stride = 2, 8

    def __init__(self, dim: int = 64, freq: float = 4.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer('w', torch.randn(dim, 2, generator=g) * freq * 2 * math.pi)
        self.register_buffer('b', torch.rand(dim, generator=g) * 2 * math.pi)

    def forward(self, x):
        rg = x[:, :2]                                                    # (B, 2, H, W)
        phase = torch.einsum('dc,bchw->bdhw', self.w, rg) + self.b[None, :, None, None]
        feat = torch.cos(phase)
        return (F.normalize(F.avg_pool2d(feat, 2), dim=1), F.normalize(F.avg_pool2d(feat, 8), dim=1))


def coded_image(h: int, w: int) -> np.ndarray:
    """R = x / W, G = y / H: every pixel's colour says where it is."""
    xs, ys = np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h)
    return np.clip(np.stack([xs, ys, 0.5 * np.ones_like(xs)], -1) * 255, 0, 255).round().astype(np.uint8)


def test_cell_geometry_matches_the_package_pixel_convention():
    pts = torch.tensor([[0.0, 0.0], [3.5, 7.5], [10.0, 2.0]])
    cells = pixels_to_cells(pts, 8)
    ref = grid.rescale_points(pts.numpy(), (64, 64), (8, 8))   # a stride-8 map of a 64 px image
    np.testing.assert_allclose(cells.numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(cells_to_pixels(cells, 8).numpy(), pts.numpy(), atol=1e-6)


def test_sampling_at_a_cell_centre_returns_that_cell():
    fmap = F.normalize(torch.randn(1, 5, 4, 6), dim=1)
    pts = cells_to_pixels(torch.tensor([[[2.0, 1.0], [5.0, 3.0]]]), 4)
    got = sample_descriptors(fmap, pts, 4)[0]
    np.testing.assert_allclose(got[0].numpy(), fmap[0, :, 1, 2].numpy(), atol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), fmap[0, :, 3, 5].numpy(), atol=1e-6)


def test_window_search_finds_the_peak_only_inside_the_window_and_subpixel():
    # A smooth bump of similarity centred at cell (7.3, 4.6) of a stride-2 map.
    h, w = 12, 16
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing='ij')
    q = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    r2 = (xs - 7.3) ** 2 + (ys - 4.6) ** 2
    angle = torch.sqrt(r2) * 0.3
    fmap = torch.stack([torch.cos(angle), torch.sin(angle)])
    peak = cells_to_pixels(torch.tensor([7.3, 4.6]), 2)
    near, _ = refine_in_window(q, fmap, 2, peak[None] + torch.tensor([[3.0, -2.0]]), radius=8.0)
    assert torch.allclose(near[0], peak, atol=0.35)          # sub-cell: better than a cell (2 px)
    far, _ = refine_in_window(q, fmap, 2, torch.tensor([[28.0, 20.0]]), radius=4.0)
    assert (far[0] - peak).norm() > 8.0                       # the peak lies outside that window
    coarse, _ = refine_in_window(q, fmap, 2, peak[None] + 1.0, radius=8.0, subpixel=False)
    assert torch.allclose(coarse[0], cells_to_pixels(torch.tensor([7.0, 5.0]), 2))


def test_hierarchical_match_recovers_a_translation_with_the_oracle():
    net = OracleNet()
    a = coded_image(64, 80)
    b = cv2.warpAffine(a, np.float32([[1, 0, 6], [0, 1, -4]]), (80, 64), borderMode=cv2.BORDER_REPLICATE)
    fa = net(torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255)
    fb = net(torch.from_numpy(b).permute(2, 0, 1)[None].float() / 255)
    pts = torch.tensor([[20.0, 20.0], [40.0, 30.0], [50.0, 45.0]])
    got, deep_sim, shallow_sim = hierarchical_match(pts, fa[0][0], fa[1][0], fb[0][0], fb[1][0], 2, 8, 16.0)
    np.testing.assert_allclose(got.numpy(), (pts + torch.tensor([6.0, -4.0])).numpy(), atol=0.75)
    assert (shallow_sim > 0.9).all() and (deep_sim > 0.5).all()
    only_deep, _ = nearest_cells(sample_descriptors(fa[1], pts[None], 8)[0], fb[1][0], 8)
    assert ((only_deep - got).norm(dim=-1) > 0.1).any()       # refinement did change the coarse answer


@pytest.mark.parametrize('target_shape', [(96, 128), (120, 160)])
def test_pipeline_dense_flow_on_a_known_warp(target_shape):
    """Affine warp, and a target at another resolution: flow must come back in its frame."""
    h, w = 96, 128
    th, tw = target_shape
    src = coded_image(h, w)
    # target(T x) = src(x) with T = scale to the target's size after a small affine motion.
    A = np.float64([[1.02, 0.03, 5.0], [-0.02, 0.98, -3.0]])
    S = np.diag([tw / w, th / h])
    M = S @ A
    M[:, 2] = S @ A[:, 2] + 0.5 * np.diag(S) - 0.5   # pixel centres scale, not corners
    tgt = cv2.warpAffine(src, M.astype(np.float32), (tw, th), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    m = HilmMatcher(net=OracleNet(), max_side=256)
    flow, matchability = m.match(src, tgt)
    assert flow.shape == (h, w, 2) and matchability.shape == (h, w)
    pts = grid.pixel_coords(h, w).reshape(-1, 2)
    want = (pts @ M[:, :2].T + M[:, 2]).reshape(h, w, 2) - grid.pixel_coords(h, w)
    inside = grid.in_bounds(want, (tw, th))
    inside[:8], inside[-8:], inside[:, :8], inside[:, -8:] = False, False, False, False
    err = np.linalg.norm(flow - want, axis=-1)[inside]
    assert np.median(err) < 0.5 and (err < 1.0).mean() > 0.9, (np.median(err), (err < 1).mean())
    assert matchability[inside].mean() > 0.7


def test_matchability_is_low_where_there_is_nothing_to_match():
    src = coded_image(64, 64)
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    m = HilmMatcher(net=OracleNet(), max_side=256)
    _, good = m.match(src, src)
    _, bad = m.match(src, noise)
    assert good.mean() > 0.8 and bad.mean() < 0.5 * good.mean()


def test_registered_and_needs_weights(tmp_path, monkeypatch):
    assert 'hilm' in available_methods()
    monkeypatch.setattr(hilm_mod.WEIGHTS, 'directory', tmp_path)
    with pytest.raises(FileNotFoundError, match='dense-match-train hilm'):
        load_matcher('hilm', device='cpu')


def test_loads_exported_weights_by_path(tmp_path):
    from dense_match_ros.core.networks.hilm_net import HilmNet, HilmNetConfig
    from dense_match_ros.training.checkpoint import export_weights
    torch.manual_seed(0)
    cfg = HilmNetConfig(width=0.125, shallow_dim=8, deep_dim=16)
    net = HilmNet(cfg)
    state = {'method': 'hilm', 'step': 3, 'config': {'model': vars(cfg)}, 'model': net.state_dict()}
    path = tmp_path / 'hilm_x.pt'
    export_weights(state, path, {'command': 'test'}, half=False)
    m = load_matcher('hilm', device='cpu', weights=str(path), max_side=64)
    assert m.record['command'] == 'test' and m.record['steps'] == 3
    img = coded_image(40, 56)
    flow, matchability = m.match(img, img[:30, :50].copy())
    assert flow.shape == (40, 56, 2) and np.isfinite(flow).all()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for got, want in zip(m.net(x), net.eval()(x)):
            assert torch.allclose(got, want, atol=1e-5)


def test_feature_pck_analysis_ranks_strategies_on_an_oracle():
    """Fig. 4 machinery: with position-coded descriptors, the deep level only finds the
    right 8 px cell, the hierarchy localises to a pixel."""
    from types import SimpleNamespace

    from dense_match_ros.evaluation.feature_pck import match_errors, pck_curves
    h, w = 64, 80
    src = coded_image(h, w)
    shift = np.float32([[1, 0, 3.0], [0, 1, 2.0]])
    tgt = cv2.warpAffine(src, shift, (w, h), borderMode=cv2.BORDER_REPLICATE)
    pair = SimpleNamespace(source=src, target=tgt, flow=np.broadcast_to(np.float32([3, 2]), (h, w, 2)),
                           valid=np.ones((h, w), bool))
    errors = match_errors(HilmMatcher(net=OracleNet(), max_side=256), pair, step=8)
    curves = pck_curves(errors, thresholds=(1.0, 6.0))
    assert curves['hierarchical_subpixel'][0] > 0.9 > curves['deep'][0]
    assert curves['deep'][1] > 0.9


def test_shipped_checkpoint_verifies_and_beats_dis_on_heldout_pairs():
    """The committed weights load (sha256 checked) and do what they were shipped for."""
    try:
        path = hilm_mod.WEIGHTS.shipped()
    except FileNotFoundError:
        pytest.skip('no shipped hilm checkpoint yet')
    record = json.loads(path.with_suffix('.json').read_text())
    assert record['command'].startswith('dense-match-train hilm')
    from dense_match_ros.data.synthetic import heldout_pairs
    hilm = load_matcher('hilm', device='cpu', max_side=160)
    dis = load_matcher('dis')
    scores = {'hilm': [], 'dis': []}
    for pair in heldout_pairs(2, size=(160, 160)):
        for name, m in (('hilm', hilm), ('dis', dis)):
            flow, _ = m.match(pair.source, pair.target)
            err = np.linalg.norm(flow - pair.flow, axis=-1)[pair.valid]
            scores[name].append((err < 5).mean())
    assert np.mean(scores['hilm']) > 0.8
    assert np.mean(scores['hilm']) > np.mean(scores['dis']) + 0.1, scores


@pytest.mark.parametrize('n', [0, 1, 5, 40])
def test_densify_is_finite_whatever_the_number_of_matches(n):
    rng = np.random.default_rng(n)
    img = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    m = HilmMatcher(net=OracleNet())
    pts_a = rng.uniform(0, 47, (n, 2)).astype(np.float32)
    flow = m._densify(img, pts_a, img, pts_a + np.float32([2.0, -1.0]))
    assert flow.shape == (48, 64, 2) and np.isfinite(flow).all()
    if n:
        np.testing.assert_allclose(np.median(flow.reshape(-1, 2), axis=0), [2.0, -1.0], atol=1e-3)
