"""The node's processing path without ROS: keyframes, resets, refusals, sizes, pose, swaps."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from dense_match_ros.core.geometry.camera import CameraIntrinsics
from dense_match_ros.ros.pipeline import Frame, FrameRejected, MatchPipeline, PipelineConfig

W, H = 160, 120
SEC = 1_000_000_000


def _texture(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    acc = np.zeros((h, w), np.float32)
    for cell, weight in ((32, 1.0), (8, 0.6), (3, 0.4)):
        small = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
        acc += weight * cv2.resize(small, (w + 2 * cell, h + 2 * cell),
                                   interpolation=cv2.INTER_CUBIC)[cell:cell + h, cell:cell + w]
    acc = (acc - acc.min()) / (acc.max() - acc.min())
    return (np.stack([acc, np.roll(acc, 5, 1), np.roll(acc, 3, 0)], -1) * 255).astype(np.uint8)


TEX = _texture(W + 80, H + 80)
F = 150.0
K = CameraIntrinsics(np.array([[F, 0, (W - 1) / 2], [0, F, (H - 1) / 2], [0, 0, 1.0]]),
                     np.zeros(5), (W, H))


def view(camera_x: float) -> np.ndarray:
    """Camera moved camera_x m along x in front of a surface at 1.2-2.8 m (parallax)."""
    xs, ys = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    depth = 2.0 + 0.8 * np.sin(xs / W * 3.0 + 0.5) * np.cos(ys / H * 2.0)
    return cv2.remap(TEX, xs + 40 + F * camera_x / depth, ys + 40, cv2.INTER_LINEAR)


def shifted(dx: int) -> np.ndarray:
    """Pure image translation: the target is the source moved by dx pixels (flow = +dx)."""
    return np.ascontiguousarray(TEX[40:40 + H, 40 - dx:40 - dx + W])


def frame(image, i: int, intr=K, frame_id='cam') -> Frame:
    return Frame(image=image, stamp_ns=i * SEC // 10 + SEC, frame_id=frame_id, intrinsics=intr)


def _pipe(**kw) -> tuple[MatchPipeline, list]:
    warnings = []
    kw.setdefault('estimate_pose', False)
    p = MatchPipeline(PipelineConfig(**kw), warn=lambda r, m: warnings.append((r, m)))
    return p, warnings


def test_mono_previous_frame_and_fields():
    p, _ = _pipe()
    assert p.process(frame(shifted(0), 0)) is None          # first frame: reference only
    out = p.process(frame(shifted(3), 1))
    assert out.source_stamp_ns == frame(None, 0).stamp_ns
    assert out.target_stamp_ns == frame(None, 1).stamp_ns
    assert out.flow.shape == (H, W, 2) and out.matchability.shape == (H, W)
    assert abs(np.median(out.flow[10:-10, 10:-10, 0]) - 3.0) < 0.3
    assert out.scale == (1.0, 1.0) and out.pose is None and out.pose_status == 'disabled'
    out = p.process(frame(shifted(5), 2))                   # against the previous frame
    assert abs(np.median(out.flow[10:-10, 10:-10, 0]) - 2.0) < 0.3
    assert p.counters.outputs == 2 and p.counters.received == 3


def test_keyframe_stride():
    p, _ = _pipe(keyframe_stride=3)
    sources = []
    for i in range(7):
        out = p.process(frame(shifted(i), i))
        sources.append(None if out is None else out.source_stamp_ns)
    key = [frame(None, i).stamp_ns for i in (0, 3, 6)]
    assert sources == [None, key[0], key[0], key[0], key[1], key[1], key[1]]


def test_keyframe_replaced_when_matchability_drops():
    p, _ = _pipe(keyframe_stride=100, keyframe_min_matchable=1.01)  # never enough
    outs = [p.process(frame(shifted(i), i)) for i in range(3)]
    assert outs[2].source_stamp_ns == frame(None, 1).stamp_ns


def test_size_change_and_backwards_stamps_reset():
    p, warnings = _pipe()
    p.process(frame(shifted(0), 5))
    assert p.process(frame(shifted(1), 6)) is not None
    big = cv2.resize(shifted(2), (2 * W, 2 * H))
    assert p.process(frame(big, 7, intr=None)) is None     # new size: new sequence
    assert warnings[-1][0] == 'size_changed' and f'{W}x{H} to {2 * W}x{2 * H}' in warnings[-1][1]
    assert p.process(frame(cv2.resize(shifted(3), (2 * W, 2 * H)), 8, intr=None)) is not None
    assert p.process(frame(cv2.resize(shifted(3), (2 * W, 2 * H)), 2, intr=None)) is None
    assert warnings[-1][0] == 'stamp_backwards' and 'by 0.600 s' in warnings[-1][1]
    out = p.process(frame(cv2.resize(shifted(4), (2 * W, 2 * H)), 3, intr=None))
    assert out.source_stamp_ns == frame(None, 2).stamp_ns
    assert p.counters.resets == 2
    with pytest.raises(FrameRejected) as err:                # same stamp twice
        p.process(frame(cv2.resize(shifted(4), (2 * W, 2 * H)), 3, intr=None))
    assert err.value.reason == 'duplicate_stamp'


def test_refused_frames_keep_the_reference():
    p, _ = _pipe(max_image_pixels=W * H)
    p.process(frame(shifted(0), 0))
    for image, reason in [(np.zeros((1, 1, 3), np.uint8), 'image_too_small'),
                          (np.zeros((H, W + 1, 3), np.uint8), 'image_too_large'),
                          (np.zeros((H, W), np.uint8), 'bad_image'),
                          (np.zeros((H, W, 3), np.float32), 'bad_image')]:
        with pytest.raises(FrameRejected) as err:
            p.process(frame(image, 1))
        assert err.value.reason == reason
    out = p.process(frame(shifted(2), 2))
    assert out.source_stamp_ns == frame(None, 0).stamp_ns and p.counters.rejected == 4
    # The limit is configurable: raised, the larger frame goes through.
    p.update(max_image_pixels=0)
    p.reset()
    p.process(frame(np.ascontiguousarray(TEX[:H, :W + 1]), 3))
    assert p.process(frame(np.ascontiguousarray(TEX[:H, 1:W + 2]), 4)) is not None


@pytest.mark.parametrize('full', [False, True])
def test_processing_size_and_output_grid(full):
    p, _ = _pipe(process_width=W // 2, full_resolution_output=full)
    p.process(frame(shifted(0), 0))
    out = p.process(frame(shifted(4), 1))
    if full:
        assert out.flow.shape == (H, W, 2) and out.scale == (1.0, 1.0)
        assert abs(np.median(out.flow[10:-10, 10:-10, 0]) - 4.0) < 0.5
    else:  # matched and published at half size: displacements in half-size pixels
        assert out.flow.shape == (H // 2, W // 2, 2) and out.scale == (2.0, 2.0)
        assert abs(np.median(out.flow[5:-5, 5:-5, 0]) - 2.0) < 0.3


def test_pair_with_different_sizes_maps_into_the_target_frame():
    """Source 160x120, target the same view at 320x240: full-res output points into 320x240."""
    p, _ = _pipe(mode='pair', process_width=W, process_height=H, full_resolution_output=True)
    target = cv2.resize(shifted(0), (2 * W, 2 * H), interpolation=cv2.INTER_CUBIC)
    out = p.process_pair(frame(shifted(0), 0, frame_id='left'),
                         frame(target, 0, frame_id='right'))
    xs = np.arange(W, dtype=np.float32)[None, :]
    target_x = xs + out.flow[..., 0]
    expected = (xs + 0.5) * 2 - 0.5                          # pixel-centre convention
    assert np.median(np.abs(target_x - expected)[10:-10, 10:-10]) < 0.3
    assert (out.source_frame_id, out.target_frame_id) == ('left', 'right')


def test_pose_from_parallax_and_without_intrinsics():
    p, _ = _pipe(estimate_pose=True)
    p.process(frame(view(0.0), 0))
    out = p.process(frame(view(0.1), 1))
    assert out.pose is not None and out.pose.valid, out.pose_status
    assert out.pose_status == 'ok' and out.pose.t[0] < -0.9   # X_t = X_s - b x
    assert 0.5 < out.inlier_ratio <= 1.0
    # Missing calibration on either side: flow still, pose skipped with the reason.
    out = p.process(frame(view(0.2), 2, intr=None))
    assert out.pose is None and out.pose_status == 'no_camera_info'
    assert out.flow.shape == (H, W, 2)


def test_flow_then_matchability_are_handed_over_before_the_pose_is_estimated():
    """on_flow sees the flow with the matchability still missing, on_matchability both, each
    while the pose is pending; the returned result is the same object, completed (the node
    publishes in this order: its latency is the flow's)."""
    p, _ = _pipe(estimate_pose=True)
    seen = []

    def hand(stage):
        def on(out):
            seen.append((stage, out, out.pose_status, 'pose' in out.timings, out.flow.copy(),
                         None if out.matchability is None else out.matchability.copy(),
                         out.matchable_fraction, out.counters))
        return on

    callbacks = dict(on_flow=hand('flow'), on_matchability=hand('matchability'))
    assert p.process(frame(view(0.0), 0), **callbacks) is None
    assert seen == []                                  # nothing to match yet
    out = p.process(frame(view(0.1), 1), **callbacks)
    (stage1, early, status1, pose1, flow1, match1, frac1, counters1), \
        (stage2, later, status2, pose2, flow2, match2, frac2, counters2) = seen
    assert (stage1, stage2) == ('flow', 'matchability') and early is out and later is out
    assert status1 == status2 == 'pending' and not pose1 and not pose2
    assert match1 is None and np.isnan(frac1)          # the flow went first
    assert 'match' in out.timings and 'matchability' in out.timings
    np.testing.assert_array_equal(flow1, out.flow)
    np.testing.assert_array_equal(flow2, out.flow)
    np.testing.assert_array_equal(match2, out.matchability)
    assert frac2 == out.matchable_fraction and 0 < frac2 <= 1
    assert counters1 == counters2 == {}                # counted once the result is complete
    assert out.pose.valid and out.pose_status == 'ok' and 'pose' in out.timings
    assert out.counters['outputs'] == 1 and out.counters['pose_valid'] == 1
    seen.clear()
    p2, _ = _pipe(mode='pair', estimate_pose=True, full_resolution_output=True,
                  process_width=W // 2)
    out = p2.process_pair(frame(view(0.0), 0), frame(view(0.1), 0), **callbacks)
    assert [s[0] for s in seen] == ['flow', 'matchability'] and seen[0][1] is out
    assert out.flow.shape == (H, W, 2) and out.matchability.shape == (H, W) and out.pose.valid


def test_pose_with_downscaled_processing_uses_scaled_intrinsics():
    p, _ = _pipe(estimate_pose=True, process_width=W // 2)
    p.process(frame(view(0.0), 0))
    out = p.process(frame(view(0.15), 1))
    assert out.pose.valid and out.pose.t[0] < -0.9, out.pose_status


def test_model_swap_and_invalid_options_keep_the_old_state():
    p, _ = _pipe(method='dis')
    old = p.matcher
    with pytest.raises(ValueError, match='unknown method'):
        p.set_matcher(method='nope')
    with pytest.raises(ValueError, match='no weights'):
        p.set_matcher(weights='/some/file.pt')
    assert p.matcher is old and p.config.method == 'dis' and p.config.weights == ''
    new = p.set_matcher(method='dis', options={'preset': 'fast'})
    assert p.matcher is new and new.preset == 'fast'
    with pytest.raises(ValueError, match='unknown pose options'):
        p.set_pose_options({'ransac_threshold_pix': 2.0})
    with pytest.raises(ValueError):
        p.update(pose_options={'confidence': 2.0})
    p.update(pose_options={'ransac_threshold_px': 2.0})
    assert p.config.pose_options == {'ransac_threshold_px': 2.0}
    with pytest.raises(ValueError):
        p.update(method='dis')
    with pytest.raises(ValueError):
        MatchPipeline(PipelineConfig(mode='stereo'))


def test_the_pose_input_threshold_is_its_own_parameter():
    """The node's matchability_threshold counts matchable pixels; the pose selects its input
    with pose.matchability_threshold (strict by default), and one does not move the other."""
    from dense_match_ros.ros.parameters import parameter_table, pipeline_config_from_params
    table = {p.name: p.default for p in parameter_table()}
    assert table['matchability_threshold'] == 0.5
    assert table['pose.matchability_threshold'] == 0.9
    config = pipeline_config_from_params({'matchability_threshold': 0.2,
                                          'pose.matchability_threshold': 0.7})
    assert config.matchability_threshold == 0.2
    assert config.pose_options['matchability_threshold'] == 0.7
    p = MatchPipeline(PipelineConfig(matchability_threshold=0.1))
    assert p._pose_config.matchability_threshold == 0.9
    p.update(matchability_threshold=0.3)
    assert p._pose_config.matchability_threshold == 0.9
    p.update(pose_options={'matchability_threshold': 0.6})
    assert p._pose_config.matchability_threshold == 0.6


def test_colour_output():
    p, _ = _pipe(color_output=True)
    p.process(frame(shifted(0), 0))
    out = p.process(frame(shifted(3), 1))
    assert out.flow_color.shape == (H, W, 3) and out.flow_color.dtype == np.uint8


@pytest.mark.parametrize('field', ['process_width', 'process_height'])
def test_processing_sizes_below_what_methods_accept_are_refused_and_the_old_value_kept(field):
    pipe = MatchPipeline(PipelineConfig(method='dis'))
    for bad in (1, 11, 15):
        with pytest.raises(ValueError, match=f'{field} must be 0'):
            pipe.update(**{field: bad})
        assert getattr(pipe.config, field) == 0
    pipe.update(**{field: 16})
    assert getattr(pipe.config, field) == 16


def test_missing_poselib_falls_back_to_opencv_with_one_warning(monkeypatch):
    """A robot install without the pip-only poselib still publishes valid poses."""
    import sys
    monkeypatch.setitem(sys.modules, 'poselib', None)  # `import poselib` raises ImportError
    p, warnings = _pipe(estimate_pose=True, device='cpu')
    assert p.pose_estimator == 'opencv-magsac'
    assert [r for r, _ in warnings] == ['pose_estimator_fallback']
    assert "'poselib' not installed" in p.pose_estimator_note
    p.process(frame(view(0.0), 0))
    out = p.process(frame(view(0.1), 1))
    assert out.pose is not None and out.pose.valid, out.pose_status
    assert out.pose.t[0] < -0.9
