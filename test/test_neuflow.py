"""The light flow network, its training task, the matcher (refinement, fusion) and padding."""
import cv2
from pathlib import Path

import numpy as np
import pytest
import torch

from dense_match_ros.core import load_matcher
from dense_match_ros.core.device import autocast_dtype, cpu_has_bf16
from dense_match_ros.core.geometry import grid
from dense_match_ros.core.methods import neuflow as neuflow_method, neuflow_variants
from dense_match_ros.core.methods.neuflow import NeuFlowMatcher
from dense_match_ros.core.networks.neuflow import (NeuFlowConfig, NeuFlowNet, local_correlation,
                                                   warp_features, windowed_softmax_flow)
from dense_match_ros.core.networks.padding import InputPadder
from dense_match_ros.training.neuflow_task import NeuFlowLossConfig, NeuFlowTask, sequence_loss
from photo_warp import affine_photo_pair

torch.set_num_threads(1)
TINY = NeuFlowConfig(width=0.25, hidden=16, window=3, radius=1, iterations=2)


def _net(seed: int = 0) -> NeuFlowNet:
    torch.manual_seed(seed)
    return NeuFlowNet(TINY)


def test_shapes_steps_and_multiple_of_16():
    net = _net().eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 32, 48), torch.rand(2, 3, 32, 48))
        more = net(torch.rand(1, 3, 32, 48), torch.rand(1, 3, 32, 48), iterations=5)
    assert len(out.flows) == 1 and len(more.flows) == 1          # eval: the last step only
    assert len(net.train()(torch.rand(1, 3, 32, 48), torch.rand(1, 3, 32, 48)).flows) == 3
    assert all(tuple(f.shape) == (2, 2, 32, 48) for f in out.flows)
    assert tuple(out.matchability.shape) == (2, 1, 32, 48)
    with pytest.raises(ValueError, match='multiple of 16'):
        net(torch.rand(1, 3, 40, 48), torch.rand(1, 3, 40, 48))


def test_a_given_start_flow_replaces_the_global_match():
    """A second pass refines from the flow it is given: with no steps the output is that
    start, upsampled to pixels; a start of the wrong shape is refused."""
    net = _net().eval()
    start = torch.zeros(1, 2, 4, 6)
    start[:, 0], start[:, 1] = 1.0, -0.5                       # 1/8 cells
    with torch.no_grad():
        out = net(torch.rand(1, 3, 32, 48), torch.rand(1, 3, 32, 48), iterations=0,
                  init_flow=start)
        stepped = net(torch.rand(1, 3, 32, 48), torch.rand(1, 3, 32, 48), iterations=1,
                      init_flow=start)
    assert torch.allclose(out.flows[0][:, 0], torch.full((1, 32, 48), 8.0))
    assert torch.allclose(out.flows[0][:, 1], torch.full((1, 32, 48), -4.0))
    assert len(stepped.flows) == 1 and tuple(stepped.flows[-1].shape) == (1, 2, 32, 48)
    with pytest.raises(ValueError, match='init_flow'):
        net(torch.rand(1, 3, 32, 48), torch.rand(1, 3, 32, 48), init_flow=torch.zeros(1, 2, 2, 3))


def test_two_way_shares_the_encoding_and_equals_two_calls():
    net = _net().eval()
    s, t = torch.rand(1, 3, 32, 48), torch.rand(1, 3, 32, 48)
    start = torch.randn(2, 2, 4, 6)
    with torch.no_grad():
        both = net(s, t, two_way=True)
        one, other = net(s, t), net(t, s)
        both_started = net(s, t, iterations=1, init_flow=start, two_way=True)
        other_started = net(t, s, iterations=1, init_flow=start[1:])
    assert torch.allclose(both.flows[-1][:1], one.flows[-1], atol=1e-4)
    assert torch.allclose(both.flows[-1][1:], other.flows[-1], atol=1e-4)
    assert torch.allclose(both.matchability[1:], other.matchability, atol=1e-4)
    assert torch.allclose(both_started.flows[-1][1:], other_started.flows[-1], atol=1e-4)
    with pytest.raises(ValueError, match='init_flow'):
        net(s, t, init_flow=start[:1], two_way=True)


def test_backward_flows_may_stop_early_and_leave_the_forward_ones_as_they_were():
    """``backward_iterations``: the backward half stops after that many steps (its flow and
    matchability are those of a run with that many steps), the forward half runs them all."""
    net = _net().eval()
    s, t = torch.rand(1, 3, 32, 48), torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        full = net(s, t, iterations=3, two_way=True)
        short = net(s, t, iterations=1, two_way=True)
        mixed = net(s, t, iterations=3, two_way=True, backward_iterations=1)
    assert torch.allclose(mixed.flows[-1][:1], full.flows[-1][:1], atol=1e-5)
    assert torch.allclose(mixed.flows[-1][1:], short.flows[-1][1:], atol=1e-5)
    assert torch.allclose(mixed.matchability[1:], short.matchability[1:], atol=1e-5)
    assert not torch.allclose(mixed.flows[-1][1:], full.flows[-1][1:], atol=1e-3)


def _step_as_written(refiner, hidden, context, corr, flow):
    """A refinement step as its design reads: gate and candidate each convolve (hidden,
    context, motion), the 1x1 cost encoder is a convolution."""
    scaled = flow / 8.0
    motion = torch.cat((refiner.motion(torch.cat((refiner.corr(corr), refiner.flow(scaled)), 1)),
                        scaled), 1)
    x = torch.cat((hidden, context, motion), 1)
    z = torch.sigmoid(refiner.gate(x))
    hidden = (1 - z) * hidden + z * torch.tanh(refiner.cand(x))
    return hidden, refiner.head(hidden)


def test_a_step_computes_the_context_s_share_once_and_matches_the_step_as_written():
    """The context's share of the gate and the candidate is taken once per pass and kept
    (split weights cached at inference); the step gives what the design says, in training
    (gradients reach gate and candidate) and at inference, and new weights are split again."""
    refiner = _net(5).refiner
    hid = TINY.hidden
    hidden, context = torch.rand(2, hid, 4, 6), torch.rand(2, hid, 4, 6)
    corr, flow = torch.randn(2, (2 * TINY.radius + 1) ** 2, 4, 6), torch.randn(2, 2, 4, 6)
    expected = _step_as_written(refiner, hidden, context, corr, flow)
    got = refiner(hidden, refiner.context_term(context), corr, flow)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected))
    got[1].sum().backward()
    assert refiner.gate.weight.grad is not None and refiner.cand.bias.grad.abs().sum() > 0
    refiner.eval()
    with torch.no_grad():
        first = refiner(hidden, refiner.context_term(context), corr, flow)
        refiner.load_state_dict(_net(6).refiner.state_dict())
        expected = _step_as_written(refiner, hidden, context, corr, flow)
        second = refiner(hidden, refiner.context_term(context), corr, flow)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(second, expected))
    assert not torch.allclose(first[1], second[1], atol=1e-3)


def test_folded_batch_norm_gives_the_same_flow_and_refuses_training():
    net = _net(3)
    net.train()
    with torch.no_grad():                          # give BatchNorm non-trivial statistics
        for _ in range(3):
            net(torch.rand(2, 3, 32, 48), torch.rand(2, 3, 32, 48))
    net.eval()
    s, t = torch.rand(1, 3, 32, 48), torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        before = net(s, t, two_way=True)
        after = net.fold_batch_norm()(s, t, two_way=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert torch.allclose(before.flows[-1], after.flows[-1], atol=1e-3)
    with pytest.raises(RuntimeError, match='folded'):
        net.train()


def test_windowed_softmax_finds_a_shift_and_ignores_matches_outside_the_window():
    torch.manual_seed(0)
    feat = torch.randn(1, 32, 6, 7)
    shifted = torch.roll(feat, shifts=(1, 2), dims=(2, 3))    # target(x + (2, 1)) = source(x)
    flow = windowed_softmax_flow(feat, shifted, window=3, temperature=0.01)
    inner = flow[0, :, 1:-1, 2:-2]                             # away from the wrap-around
    assert torch.allclose(inner[0], torch.full_like(inner[0], 2.0), atol=1e-3)
    assert torch.allclose(inner[1], torch.full_like(inner[1], 1.0), atol=1e-3)
    # A window of 1 cell cannot reach a 2-cell shift: no flow beyond 1 cell.
    assert float(windowed_softmax_flow(feat, shifted, 1, 0.01).abs().max()) <= 1.0 + 1e-5


def test_local_correlation_and_feature_warp_agree_with_direct_computation():
    torch.manual_seed(1)
    src, tgt = torch.randn(1, 8, 5, 6), torch.randn(1, 8, 5, 6)
    corr = local_correlation(src, tgt, 1)
    # offset index k = (dy + 1) * 3 + (dx + 1); check (dy, dx) = (1, -1) at pixel (2, 3)
    direct = (src[0, :, 2, 3] * tgt[0, :, 3, 2]).sum() / 8 ** 0.5
    assert torch.allclose(corr[0, 2 * 3 + 0, 2, 3], direct, atol=1e-5)
    flow = torch.zeros(1, 2, 5, 6)
    flow[:, 0] = 1.0                                           # sample one cell to the right
    warped = warp_features(tgt, flow)
    assert torch.allclose(warped[0, :, :, :-1], tgt[0, :, :, 1:], atol=1e-5)
    assert torch.all(warped[0, :, :, -1].abs() < 0.51 * tgt.abs().max())   # half outside


def test_padder_round_trip_keeps_pixels_in_place():
    padder = InputPadder(30, 45, 16)
    x = torch.rand(1, 3, 30, 45)
    (p,) = padder.pad(x)
    assert tuple(p.shape[-2:]) == (32, 48)
    assert torch.equal(p[..., :30, :45], x) and torch.equal(padder.unpad(p), x)


def test_sequence_loss_is_zero_for_the_truth_and_steps_are_weighted():
    b, h, w = 1, 16, 16
    gt = torch.randn(b, h, w, 2)
    truth = gt.permute(0, 3, 1, 2)
    vis = torch.ones(b, h, w, dtype=torch.bool)
    big = torch.full((b, 1, h, w), 20.0)

    class Out:
        flows = [truth, truth, truth]
        matchability = big
    loss, metrics = sequence_loss(Out, gt, vis, NeuFlowLossConfig())
    assert float(loss) < 1e-6 and metrics['epe'] < 1e-6
    Out.flows = [truth, truth + 1.0, truth]          # an early step off by (1, 1): 2 px of L1
    loss, _ = sequence_loss(Out, gt, vis, NeuFlowLossConfig(gamma=0.5))
    assert float(loss) == pytest.approx(0.5 * 2.0, abs=1e-4)


def test_training_step_reduces_the_loss_on_a_fixed_batch():
    task = NeuFlowTask()
    cfg = task.model_config({k: v for k, v in TINY.__dict__.items()})
    torch.manual_seed(0)
    net = task.build_model(cfg)
    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, (2, 3, 32, 32), dtype=np.uint8)
    tgt = np.roll(src, 2, axis=3)                                  # target(x + 2) = source(x)
    flow = np.zeros((2, 32, 32, 2), np.float32)
    flow[..., 0] = 2.0
    batch = {'source': torch.from_numpy(src), 'target': torch.from_numpy(tgt),
             'flow': torch.from_numpy(flow), 'valid': torch.ones(2, 32, 32, dtype=torch.bool)}
    loss_cfg = task.loss_config({})
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    first = None
    for _ in range(15):
        loss, _ = task.loss(net, batch, loss_cfg)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first
    with pytest.raises(ValueError, match='unknown'):
        task.model_config({'widht': 1.0})


def test_a_lighter_refinement_starts_on_another_network_s_frozen_encoder(tmp_path):
    """``encoder_init`` copies the encoder (and nothing else) of a checkpoint of another
    design; ``freeze_encoder`` keeps its weights and BatchNorm statistics through training
    steps, while the new refinement learns; another width is refused by name."""
    from dense_match_ros.training import checkpoint as ckpt
    teacher = _net(seed=3)
    state = {'model': teacher.state_dict(), 'method': 'neuflow', 'step': 1,
             'config': {'model': dict(TINY.__dict__)}}
    ckpt.export_weights(state, tmp_path / 'teacher.pt', {'note': 'teacher'}, half=False)
    task = NeuFlowTask()
    slim = {**TINY.__dict__, 'hidden': 8, 'corr_channels': 8, 'flow_channels': 4,
            'head_channels': 8, 'mask_channels': 16, 'match_channels': 4}
    cfg = task.model_config({**slim, 'encoder_init': str(tmp_path / 'teacher.pt'),
                             'freeze_encoder': True})
    torch.manual_seed(0)
    net = task.build_model(cfg)
    assert net.refiner.gate.out_channels == 8 and net.upmask[0].out_channels == 16
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    for k, v in before.items():
        assert torch.equal(v, teacher.encoder.state_dict()[k].float()), k
    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, (2, 3, 32, 32), dtype=np.uint8)
    flow = np.zeros((2, 32, 32, 2), np.float32)
    flow[..., 0] = 2.0
    batch = {'source': torch.from_numpy(src), 'target': torch.from_numpy(np.roll(src, 2, axis=3)),
             'flow': torch.from_numpy(flow), 'valid': torch.ones(2, 32, 32, dtype=torch.bool)}
    net.train()
    assert not net.encoder.training and net.refiner.training
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=2e-3)
    refiner_before = net.refiner.gate.weight.detach().clone()
    for _ in range(3):
        loss, _ = task.loss(net, batch, task.loss_config({}))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k         # running statistics included
    assert not torch.equal(net.refiner.gate.weight, refiner_before)
    with pytest.raises(ValueError, match='another width'):
        task.build_model(task.model_config({**slim, 'width': 0.5,
                                            'encoder_init': str(tmp_path / 'teacher.pt')}))


def test_bf16_is_detected_not_assumed():
    dtype = autocast_dtype('cpu')
    assert (dtype is torch.bfloat16) == cpu_has_bf16()
    assert autocast_dtype('cpu', enabled=False) is None


def _tiny_matcher(**options) -> NeuFlowMatcher:
    return NeuFlowMatcher(device='cpu', net=_net(), **options)


def test_matcher_contract_and_option_checks():
    src, tgt, _ = affine_photo_pair(72, 50, 3.0, 1.0, (2.0, 1.0))
    for options in ({'fuse': 'none', 'refine': 'none'}, {'fuse': 'dis'}, {'max_side': 32},
                    {'fb_check': 'working'}, {'fb_cross': True, 'agree_px': 2.0},
                    {'dis_cross': True, 'dis_margin_px': 1.0}, {'backward_iterations': 1}):
        flow, matchability = _tiny_matcher(**options).match(src, tgt)
        assert flow.shape == (50, 72, 2) and flow.dtype == np.float32
        assert matchability.shape == (50, 72) and 0 <= matchability.min() <= matchability.max() <= 1
    # Different target size: the flow points into the target's own pixels.
    flow, _ = _tiny_matcher(fuse='none', refine='none').match(src, tgt[:40, :60])
    assert flow.shape == (50, 72, 2)
    for bad in ({'fuse': 'raft'}, {'fb_sigma': 0}, {'precision': 'fp8'}, {'max_side': 8},
                {'refine': 'sift'}, {'iterations': -1}, {'fb_check': 'half'},
                {'cascade_side': 8}, {'cascade_steps': 0}, {'polish': -1},
                {'polish_min_texture': -1.0}, {'agree_px': -1.0}, {'dis_margin_px': -1.0},
                {'backward_iterations': -1}):
        with pytest.raises(ValueError):
            _tiny_matcher(**bad)


def test_cascade_refines_the_first_pass_at_the_finer_size():
    """The second pass gets both directions' first-pass flows, resized and rescaled to its
    grid and in 1/8 cells; no second pass when the finer size is not larger."""
    matcher = _tiny_matcher(max_side=32, cascade_side=64, fuse='none', refine='none', polish=0)
    calls = []
    forward = matcher.net.forward

    def spy(source, target, iterations=None, init_flow=None, **options):
        calls.append((tuple(source.shape), iterations,
                      None if init_flow is None else init_flow.clone()))
        return forward(source, target, iterations=iterations, init_flow=init_flow, **options)
    matcher.net.forward = spy
    src, tgt, _ = affine_photo_pair(72, 50, 3.0, 1.0, (2.0, 1.0))
    coarse = grid.working_size((72, 50), 32, min_side=32)            # (46, 32): min side 32
    first = matcher._pass(src, tgt, coarse, matcher.iterations)
    calls.clear()
    flow, _ = matcher.match(src, tgt)
    assert flow.shape == (50, 72, 2)
    assert [c[0] for c in calls] == [(1, 3, 32, 48), (1, 3, 48, 64)]   # 46x32 and 64x44, padded
    assert calls[0][2] is None and calls[1][1] == matcher.cascade_steps
    start = calls[1][2]
    assert tuple(start.shape) == (2, 2, 6, 8)
    # Inside the unpadded grid the start is the first pass's flow rescaled to 64x44, in cells.
    expect = neuflow_method._flow_tensor(first[0], (64, 44))[0, :, :40, :].mean((1, 2)) / 8.0
    assert torch.allclose(start[0, :, :5, :].mean((1, 2)), expect, atol=1e-4)
    calls.clear()
    matcher.cascade_side = 32
    matcher.match(src, tgt)
    assert len(calls) == 1


def test_an_upscaled_second_pass_keeps_the_first_where_its_round_trip_is_better():
    """Below the cascade size the second pass runs on an upscaled copy; per pixel and per
    direction the pass with the smaller forward-backward error wins, on the finer grid."""
    size = (40, 30)                                             # second pass grid (W, H)
    first = (np.full((15, 20, 2), 0.5, np.float32),             # coarse grid, 2x smaller:
             np.full((15, 20, 2), -0.5, np.float32), None)      # a perfect round trip
    second_fwd = np.full((30, 40, 2), 1.0, np.float32)          # the same in fine pixels ...
    second_bwd = np.full((30, 40, 2), -1.0, np.float32)
    second_bwd[:, :20] = 3.0                                     # ... but a broken left half
    vis = np.full((30, 40), 0.3, np.float32)
    fwd, bwd, v = neuflow_method._better_round_trip(first, (second_fwd, second_bwd, vis), size)
    assert fwd.shape == (30, 40, 2) and v is vis
    inner = (slice(2, -4), slice(2, -4))                        # round trips stay in frame
    assert np.allclose(bwd[inner], -1.0)                        # broken half: the first pass
    assert np.allclose(fwd[inner], 1.0)                         # (x2 for the finer grid)
    assert np.allclose(bwd[:, 25:], -1.0)
    # Where the second pass is the consistent one, it stays.
    second_fwd[5:10, 5:10] = 1.25
    fwd, _, _ = neuflow_method._better_round_trip((first[0] * 3, first[1], None),
                                             (second_fwd, -second_fwd, vis), size)
    assert np.allclose(fwd[6:9, 6:9], 1.25) and np.allclose(fwd[20:25, 20:25], 1.0)


def test_flow_tensor_rescales_values_with_the_grid():
    flow = np.zeros((10, 20, 2), np.float32)
    flow[..., 0], flow[..., 1] = 3.0, -1.0
    t = neuflow_method._flow_tensor(flow, (40, 30))
    assert tuple(t.shape) == (1, 2, 30, 40)
    assert torch.allclose(t[0, 0], torch.full((30, 40), 6.0))
    assert torch.allclose(t[0, 1], torch.full((30, 40), -3.0))


def test_variational_polish_brings_a_noisy_flow_closer_to_the_truth():
    from dense_match_ros.core.refine import variational_polish
    src, tgt, gt = affine_photo_pair(160, 128, 2.0, 1.0, (3.0, -2.0))
    rng = np.random.default_rng(0)
    noisy = (gt + rng.normal(0.0, 0.7, gt.shape)).astype(np.float32)
    polished = variational_polish(src, tgt, noisy, 10)
    inner = (slice(12, -12), slice(12, -12))

    def err(f):
        return float(np.linalg.norm(f - gt, axis=-1)[inner].mean())
    assert err(polished) < 0.6 * err(noisy), (err(polished), err(noisy))
    # Where the source is flat the flow is kept as it came (only smoothness would act there).
    flat_src = src.copy()
    flat_src[:, :80] = 128
    kept = variational_polish(flat_src, tgt, noisy, 10, min_texture=1e-4)
    assert np.array_equal(kept[10:-10, 5:70], noisy[10:-10, 5:70])
    assert not np.array_equal(kept[10:-10, 95:-5], noisy[10:-10, 95:-5])
    assert variational_polish(src, tgt[:100], noisy, 10) is noisy    # sizes differ: unchanged
    assert variational_polish(src, tgt, noisy, 0) is noisy


def test_polish_at_half_scale_removes_a_smooth_error_at_a_quarter_of_the_pixels():
    """``scale`` < 1 polishes a smaller copy and adds its update back: smooth errors (the
    seams and biases a fusion leaves) go, the full-resolution flow's detail stays."""
    from dense_match_ros.core.refine import variational_polish
    src, tgt, gt = affine_photo_pair(192, 160, 2.0, 1.0, (3.0, -2.0))
    h, w = gt.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    off = (gt + np.stack([0.8 + 0.2 * np.sin(xs / 30.0), -0.6 + 0.2 * np.cos(ys / 25.0)], -1)
           ).astype(np.float32)
    inner = (slice(16, -16), slice(16, -16))

    def err(f):
        return float(np.linalg.norm(f - gt, axis=-1)[inner].mean())
    half = variational_polish(src, tgt, off, 10, scale=0.5)
    assert half.shape == gt.shape and half.dtype == np.float32
    assert err(half) < 0.5 * err(off), (err(half), err(off))
    assert np.array_equal(variational_polish(src, tgt, gt, 0, scale=0.5), gt)


def test_fusion_keeps_dis_where_the_network_is_wrong():
    """An untrained network is wrong everywhere; fused with DIS the flow is DIS's quality."""
    src, tgt, gt = affine_photo_pair(160, 128, 2.0, 1.0, (3.0, -2.0))
    plain, _ = _tiny_matcher(fuse='none', refine='none').match(src, tgt)
    fused, _ = _tiny_matcher(fuse='dis', refine='none').match(src, tgt)
    dis_flow, _ = load_matcher('dis', device='cpu').match(src, tgt)
    inner = (slice(12, -12), slice(12, -12))
    err = {name: float(np.linalg.norm(f - gt, axis=-1)[inner].mean())
           for name, f in (('plain', plain), ('fused', fused), ('dis', dis_flow))}
    assert err['fused'] < 0.5 * err['plain'], err
    assert err['fused'] < err['dis'] + 0.3, err


def _shifted_texture(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 64x48 blurred noise image and its copy shifted 3 px right, with the true flow:
    source (x, y) <-> target (x + 3, y)."""
    rng = np.random.default_rng(seed)
    source = cv2.GaussianBlur(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), (5, 5), 1.5)
    truth = np.zeros((48, 64, 2), np.float32)
    truth[..., 0] = 3.0
    return source, np.roll(source, 3, axis=1), truth


def test_fusion_cross_check_and_agreement():
    """The network's refined flow right, its coarse round trip poor; DIS 2 px off with a
    good round trip. The plain rule takes DIS; through DIS's backward flow (``fb_cross``)
    the network's flow is seen to be right and kept. And where the two agree within
    ``agree_px``, DIS is taken whatever the costs."""
    source, target, truth = _shifted_texture(0)
    dis_fwd = truth + np.array([2.0, 0.0], np.float32)
    dis_bwd = -truth                                        # right: DIS's forward misses by 2 px
    error = np.full((48, 64), 3.0, np.float32)              # the network's coarse round trip
    inner = (slice(8, -8), slice(8, -8))

    def fused(network, **options):
        flow, _ = _tiny_matcher(fuse='dis', **options)._fuse_with_dis(
            source, target, network, error,
            tuple(neuflow_method._done(x) for x in
                  (dis_fwd, dis_bwd, grid.forward_backward_error(dis_fwd, dis_bwd))))
        return float(np.abs(flow - truth)[inner].max())

    assert fused(truth) == pytest.approx(2.0)
    assert fused(truth, fb_cross=True) == 0.0
    assert fused(truth, fb_cross=True, agree_px=3.0) == pytest.approx(2.0)
    assert fused(truth, fb_cross=True, agree_px=1.5) == 0.0


def test_fusion_checks_dis_through_the_network_s_backward_flow_and_leans_to_dis():
    """DIS's forward flow right, its backward flow wrong (its own round trip misses by
    15 px); the network 4 px off. The plain rule takes the network wherever its cost is
    lower; through the network's backward flow (``dis_cross``) DIS's flow is seen to close
    and is kept; a ``dis_margin_px`` larger than the gap in cost keeps DIS as well."""
    source, target, truth = _shifted_texture(1)
    network = truth + np.array([0.0, 4.0], np.float32)
    dis_bwd = -truth + np.array([0.0, 15.0], np.float32)     # DIS cannot find its way back
    net_bwd = cv2.resize(-truth, (32, 24)) / 2.0             # right, on a half-size working grid
    inner = (slice(8, -8), slice(8, -8))

    def fused(net_error, **options):
        flow, _ = _tiny_matcher(fuse='dis', **options)._fuse_with_dis(
            source, target, network, np.full((48, 64), net_error, np.float32),
            tuple(neuflow_method._done(x) for x in
                  (truth, dis_bwd, grid.forward_backward_error(truth, dis_bwd))), net_bwd)
        return float(np.abs(flow - truth)[inner].max())

    assert fused(1.2) == pytest.approx(4.0)
    assert fused(1.2, dis_cross=True) == 0.0
    assert fused(1.2, dis_margin_px=30.0) == 0.0
    assert fused(1.2, dis_margin_px=0.5) == pytest.approx(4.0)


def test_dis_beside_the_network_changes_nothing_but_the_time_and_restores_the_threads():
    import cv2
    src, tgt, _ = affine_photo_pair(96, 64, 3.0, 1.0, (2.0, 1.0))
    apart = _tiny_matcher(concurrent='off').match(src, tgt)
    beside = _tiny_matcher(concurrent='on')
    threads = torch.get_num_threads(), cv2.getNumThreads()
    for _ in range(2):
        result = beside.match(src, tgt)
        assert np.array_equal(result.flow, apart.flow)
        # OpenCV's thread count changes the last bit of a resize on the way.
        np.testing.assert_allclose(result.matchability, apart.matchability, atol=1e-6)
    assert (torch.get_num_threads(), cv2.getNumThreads()) == threads
    assert _tiny_matcher(concurrent=True).concurrent == 'on'   # YAML `on`
    with pytest.raises(ValueError, match='concurrent'):
        _tiny_matcher(concurrent='yes')


def test_registered_and_missing_weights_name_the_training_command(tmp_path, monkeypatch):
    monkeypatch.setattr(neuflow_method.WEIGHTS, 'directory', tmp_path)
    with pytest.raises(FileNotFoundError, match='dense-match-train neuflow'):
        load_matcher('neuflow', device='cpu')


def test_each_variant_loads_the_checkpoint_that_measured_best_for_it(tmp_path, monkeypatch):
    """``neuflow-fast`` takes the GPU stage where it ships (else the CPU one), ``neuflow``
    the CPU stage, unless a variant or weights are named."""
    from dense_match_ros.training import checkpoint as ckpt
    net = _net()
    state = {'model': net.state_dict(), 'method': 'neuflow', 'step': 1,
             'config': {'model': dict(TINY.__dict__)}}
    for variant in ('cpu', 'gpu', 'lite'):
        ckpt.export_weights(state, tmp_path / f'neuflow_{variant}.pt', {'note': variant})
    monkeypatch.setattr(neuflow_method.WEIGHTS, 'directory', tmp_path)

    def loaded(method, **options):
        return Path(load_matcher(method, device='cpu', **options).weights).name

    assert loaded('neuflow-fast') == 'neuflow_gpu.pt'
    assert loaded('neuflow') == 'neuflow_cpu.pt'
    assert loaded('neuflow-lite') == 'neuflow_lite.pt'
    assert loaded('neuflow', variant='gpu') == 'neuflow_gpu.pt'
    assert loaded('neuflow-fast', variant='cpu') == 'neuflow_cpu.pt'
    (tmp_path / 'neuflow_gpu.pt').unlink()
    assert loaded('neuflow-fast') == 'neuflow_cpu.pt'


@pytest.mark.parametrize('method', ['neuflow', 'neuflow-fast', 'neuflow-lite'])
def test_shipped_checkpoint_loads_and_tracks_a_real_warp(method):
    try:
        matcher = load_matcher(method, device='cpu')
    except FileNotFoundError:
        pytest.skip('no shipped neuflow checkpoint')
    src, tgt, gt = affine_photo_pair(320, 240, 10.0, 1.1, (12.0, -8.0))
    flow, matchability = matcher.match(src, tgt)
    inside = grid.in_bounds(gt, (320, 240))
    epe = np.linalg.norm(flow - gt, axis=-1)[inside]
    assert float(np.median(epe)) < 1.0 and float(matchability[inside].mean()) > 0.3


def test_prealignment_makes_the_shipped_matcher_hold_a_half_turn():
    """A 180 degree turn is beyond any window of the network; the sparse homography takes
    it out first (``prealign``, on by default), and switching it off shows the difference."""
    try:
        matcher = load_matcher('neuflow', device='cpu', cascade_side=0, polish=0)
    except FileNotFoundError:
        pytest.skip('no shipped neuflow checkpoint')
    src, tgt, gt = affine_photo_pair(320, 240, 180.0, 1.0, (3.0, -2.0))
    inside = grid.in_bounds(gt, (320, 240))
    epe = np.linalg.norm(matcher.match(src, tgt).flow - gt, axis=-1)[inside]
    assert float(np.median(epe)) < 1.0
    plain = load_matcher('neuflow', device='cpu', cascade_side=0, polish=0, prealign=False)
    assert float(np.median(np.linalg.norm(plain.match(src, tgt).flow - gt, axis=-1)[inside])) > 20


def test_the_fast_variant_is_neuflow_with_its_own_defaults_and_every_option_open():
    fast = load_matcher('neuflow-fast', device='cpu', net=_net())
    assert isinstance(fast, NeuFlowMatcher)
    got = {'max_side': fast.max_side, 'iterations': fast.iterations,
           'cascade_side': fast.cascade_side, 'polish': fast.polish,
           'refine_preset': fast.refine_preset, 'prealign_features': fast.prealign_config.features,
           'fb_cross': fast.fb_cross, 'agree_px': fast.agree_px, 'concurrent': fast.concurrent,
           'settled_share': fast.settled_share, 'dis_cross': fast.dis_cross,
           'dis_margin_px': fast.dis_margin_px}
    assert got == neuflow_variants.FAST_DEFAULTS
    lite = load_matcher('neuflow-lite', device='cpu', net=_net())
    assert lite.iterations == 3 and lite.max_side == fast.max_side and lite.dis_cross
    assert lite.calibration_key == 'neuflow-lite' != fast.calibration_key
    assert load_matcher('neuflow-fast', device='cpu', net=_net(), max_side=320).max_side == 320
    with pytest.raises(ValueError, match="neuflow-fast has no option 'windows'"):
        load_matcher('neuflow-fast', device='cpu', windows=3)


def test_matcher_applies_the_checkpoint_calibration():
    src, tgt, _ = affine_photo_pair(64, 48, 2.0, 1.0, (1.0, 1.0))
    raw = _tiny_matcher(fuse='none', refine='none')
    m_raw = raw.match(src, tgt).matchability
    raw.calibration = {'matchability': [0.0, 1.0], 'probability': [0.2, 0.3]}
    flow, m_cal = raw.match(src, tgt)
    inside = grid.in_bounds(flow, (64, 48))
    np.testing.assert_allclose(m_cal[inside], 0.2 + 0.1 * m_raw[inside], atol=1e-5)
    assert (m_cal[~inside] == 0).all()


def test_a_variant_reads_its_own_calibration_table_and_falls_back_to_the_methods(monkeypatch):
    own = {'matchability': [0.0, 1.0], 'probability': [0.5, 0.6]}
    shared = {'matchability': [0.0, 1.0], 'probability': [0.1, 0.2]}
    record = {'method': 'neuflow', 'calibration': shared, 'calibrations': {'neuflow-fast': own}}
    monkeypatch.setattr(neuflow_method.WEIGHTS, 'network_for',
                        lambda net, weights, variant, device: (net, record, None))
    assert load_matcher('neuflow', device='cpu', net=_net()).calibration is shared
    assert load_matcher('neuflow-fast', device='cpu', net=_net()).calibration is own
    assert load_matcher('neuflow-fast', device='cpu', net=_net(), calibrated=False).calibration is None
    del record['calibrations']
    assert load_matcher('neuflow-fast', device='cpu', net=_net()).calibration is shared
    # dense-match-calibrate --write puts a variant's table beside the method's.
    from dense_match_ros.evaluation.calibrate import store_table
    assert store_table(record, 'neuflow-fast', own) == 'calibrations.neuflow-fast'
    assert store_table(record, 'neuflow', shared) == 'calibration'
    assert record['calibration'] is shared and record['calibrations'] == {'neuflow-fast': own}


def test_the_calibration_floor_does_not_reach_matches_that_leave_the_target():
    src, tgt, _ = affine_photo_pair(96, 64, 0.0, 1.0, (-12.0, 0.0))
    matcher = _tiny_matcher(refine='none')       # fused with DIS, which follows the shift
    matcher.calibration = {'matchability': [0.0, 1.0], 'probability': [0.2, 0.3]}
    flow, matchability = matcher.match(src, tgt)
    outside = ~grid.in_bounds(flow, (96, 64))
    assert outside[:, :8].mean() > 0.9                # the columns shifted out of view
    assert (matchability[outside] == 0).all() and (matchability[~outside] >= 0.2 - 1e-6).all()


def test_a_pair_that_dis_settles_gets_dis_s_result_without_the_network(monkeypatch):
    """``settled_share``: where DIS's round trip closes within ``settled_px`` on all but that
    share of the pixels, the result is ``dis``'s, flow and matchability, and the network is
    not run; where it does not, DIS's flows computed for the check feed the fusion."""
    calls = []
    original = NeuFlowMatcher.network_flows

    def counted(self, source, target):
        calls.append(source.shape)
        return original(self, source, target)

    monkeypatch.setattr(NeuFlowMatcher, 'network_flows', counted)
    small = affine_photo_pair(128, 96, 0.0, 1.0, (2.0, 1.0))[:2]
    large = affine_photo_pair(128, 96, 25.0, 1.2, (9.0, -6.0))[:2]
    gated = _tiny_matcher(settled_share=0.05, prealign=False)
    flow, matchability = gated.match(*small)
    expected = load_matcher('dis', device='cpu').match(*small)
    assert calls == []
    assert np.array_equal(flow, expected.flow)
    np.testing.assert_array_equal(matchability, expected.matchability)
    gated_large = gated.match(*large)
    assert len(calls) == 1
    plain = _tiny_matcher(prealign=False).match(*large)
    assert np.array_equal(gated_large.flow, plain.flow)
    for bad in ({'settled_share': 1.0}, {'settled_share': -0.1}, {'settled_px': 0.0},
                {'settled_share': 0.05, 'fuse': 'none'}):
        with pytest.raises(ValueError, match='settled'):
            _tiny_matcher(**bad)
