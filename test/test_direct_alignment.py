"""Direct alignment of cnngeo's spline, and the backward transform's pass count."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dense_match_ros.core.geometry import direct_alignment as da, parametric, transforms as tf
from dense_match_ros.core.methods.cnngeo import CnnGeoAffineMatcher, CnnGeoMatcher
from dense_match_ros.core.networks.cnngeo import CnnGeoConfig, CnnGeoNet

torch.set_num_threads(1)
TINY = CnnGeoConfig(width=0.125, input_size=(64, 64), channels=(16, 8), kernel_sizes=(3, 1))


def _photo(seed: int = 3, size: int = 160) -> np.ndarray:
    """Texture at several scales: smooth blobs plus finer detail, as a photo has."""
    rng = np.random.default_rng(seed)
    out = np.zeros((size, size, 3), np.float32)
    for cells, weight in ((6, 0.6), (20, 0.3), (48, 0.1)):
        small = rng.random((cells, cells, 3)).astype(np.float32)
        out += weight * cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return (out.clip(0, 1) * 255).astype(np.uint8)


def _rendered(target: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """source(x) = target(T(x)): what the generator renders for a TPS theta."""
    h, w = target.shape[:2]
    grid = parametric.dense_map('tps', torch.tensor(theta)[None].float(), (w, h))
    img = torch.from_numpy(target).permute(2, 0, 1)[None].float()
    out = F.grid_sample(img, grid, align_corners=False, padding_mode='border')
    return out[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def _epe(theta: np.ndarray, truth: np.ndarray, size: int) -> float:
    flows = [parametric.dense_flow('tps', torch.tensor(t)[None].float(), (size, size), (size, size))
             for t in (theta, truth)]
    return float((flows[0] - flows[1]).norm(dim=-1).mean())


def _case(seed: int = 4, off: float = 0.07):
    rng = np.random.default_rng(seed)
    truth = tf.tps_identity() + rng.uniform(-0.12, 0.12, 18)
    target = _photo(seed)
    source = _rendered(target, truth)
    start = truth + rng.uniform(-off, off, 18)
    return source, target, truth, start


def test_the_alignment_recovers_a_spline_from_a_nearby_start_under_gain_and_bias():
    """A start a few pixels off reaches a tenth of a pixel, also when the source's contrast and
    brightness differ from the target's (gain and bias are refitted at every step)."""
    source, target, truth, start = _case()
    size = source.shape[0]
    before = _epe(start, truth, size)
    assert before > 2.0, before
    for image in (source, (source.astype(np.float32) * 0.7 + 30).astype(np.uint8)):
        result = da.refine_tps(image, target, start)
        assert result.accepted and result.steps > 0
        assert _epe(result.theta, truth, size) < 0.1 * before, (_epe(result.theta, truth, size), before)


def test_a_correction_beyond_the_trust_region_is_refused_and_the_input_returned():
    source, target, _, start = _case()
    result = da.refine_tps(source, target, start, da.AlignmentSettings(max_shift=1e-4))
    assert not result.accepted and result.shift_px > 0
    np.testing.assert_array_equal(result.theta, start.astype(np.float32))


def test_bad_settings_and_parameters_are_refused():
    with pytest.raises(ValueError, match='levels'):
        da.AlignmentSettings(levels=((4, 3),))
    with pytest.raises(ValueError, match='max_shift'):
        da.AlignmentSettings(max_shift=0)
    source, target, _, start = _case()
    with pytest.raises(ValueError, match='finite'):
        da.refine_tps(source, target, np.full(18, np.nan))
    with pytest.raises(ValueError, match='18'):
        da.refine_tps(source, target, start[:6])


class _Fixed(CnnGeoMatcher):
    """The matcher around a fixed forward transform (what the network would say)."""

    def __init__(self, forward, **kw):
        torch.manual_seed(0)
        super().__init__(net=CnnGeoNet(TINY), **kw)
        self._theta = torch.tensor(np.stack([forward, tf.tps_identity()]), dtype=torch.float32)

    def predict(self, source, target):
        return 'tps', self._theta, torch.tensor(np.stack([tf.AFFINE_IDENTITY] * 2)).float()


def test_the_matcher_aligns_its_spline_only_when_asked_and_keeps_the_affine_stage_plain():
    """``align='photometric'`` refines the network's spline on the input-size copies (64x64
    here); without it the flow is the network's. cnngeo-affine refuses the option."""
    source, target, truth, start = _case(off=0.05)
    size = source.shape[0]
    truth_flow = parametric.dense_flow('tps', torch.tensor(truth)[None].float(), (size, size),
                                       (size, size))[0].numpy()
    errors = {}
    for align in ('none', 'photometric'):
        matcher = _Fixed(start, align=align)
        assert matcher.align == align
        flow, match = matcher.match(source, target)
        assert np.isfinite(flow).all() and np.isfinite(match).all()
        errors[align] = float(np.linalg.norm(flow - truth_flow, axis=-1).mean())
    assert errors['photometric'] < 0.5 * errors['none'], errors
    assert _Fixed(start).align == 'none'                   # a record without the key
    with pytest.raises(ValueError, match='align'):
        _Fixed(start, align='edges')
    with pytest.raises(ValueError, match='affine'):
        CnnGeoAffineMatcher(net=CnnGeoNet(TINY), align='photometric')


def test_backward_passes_cap_only_the_backward_rows_of_a_two_way_run():
    """``two_way(backward_passes=1)``: the forward transforms get every TPS pass, the backward
    ones (which serve only the round trip) stop after the first."""
    torch.manual_seed(2)
    net = CnnGeoNet(TINY).eval()
    src, tgt = (torch.tensor(_photo(seed, 64)[None]).permute(0, 3, 1, 2).float() / 255.0
                for seed in (1, 2))
    with torch.no_grad():
        one = net.two_way(src, tgt, tps_passes=1)
        two = net.two_way(src, tgt, tps_passes=2)
        capped = net.two_way(src, tgt, tps_passes=2, backward_passes=1)
    torch.testing.assert_close(capped.composed[:1], two.composed[:1])
    torch.testing.assert_close(capped.composed[1:], one.composed[1:])
    assert not torch.allclose(two.composed[1:], one.composed[1:])
    with pytest.raises(ValueError, match='round_trip_passes'):
        _Fixed(tf.tps_identity(), round_trip_passes=0)


def test_a_flat_pair_leaves_the_spline_as_it_was():
    """No texture, no evidence: the steps stop and the input comes back, finite."""
    flat = np.full((64, 64, 3), 128, np.uint8)
    start = tf.tps_identity() + 0.05
    result = da.refine_tps(flat, flat, start)
    assert result.steps == 0 and result.accepted
    np.testing.assert_allclose(result.theta, start.astype(np.float32))
