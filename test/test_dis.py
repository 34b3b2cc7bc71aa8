"""The classical baseline through the public interface."""
import cv2
import numpy as np
import pytest

from dense_match_ros.core import available_methods, load_matcher
from dense_match_ros.core.geometry import grid


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), 2.0)
    return ((n - n.min()) / (n.max() - n.min()) * 255).astype(np.uint8)


def _translated(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, img.shape[1::-1], flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_REFLECT)


def test_registry_lists_dis_and_rejects_unknown():
    assert 'dis' in available_methods()
    with pytest.raises(KeyError, match='unknown method'):
        load_matcher('no-such-method')
    with pytest.raises(ValueError, match='no weights'):
        load_matcher('dis', device='cpu', weights='/tmp/x.pt')


@pytest.mark.parametrize('dx,dy', [(3.3, -2.1), (-1.7, 0.6), (0.25, 4.4)])
def test_dis_recovers_translation_within_0p1px(dx, dy):
    src = _texture(240, 320)
    tgt = _translated(src, dx, dy)
    flow, matchability = load_matcher('dis', device='cpu').match(src, tgt)
    assert flow.dtype == np.float32 and flow.shape == (240, 320, 2)
    assert matchability.dtype == np.float32 and matchability.shape == (240, 320)
    inner = flow[24:-24, 24:-24].reshape(-1, 2)
    assert np.allclose(np.median(inner, axis=0), [dx, dy], atol=0.1)
    assert matchability.min() >= 0 and matchability.max() <= 1
    assert np.median(matchability[24:-24, 24:-24]) > 0.5


def test_dis_handles_different_sizes_in_target_pixels():
    src = _texture(120, 160, seed=1)
    tgt_small = _translated(src, 2.0, 1.0)
    tgt = cv2.resize(tgt_small, (320, 240), interpolation=cv2.INTER_CUBIC)
    flow, _ = load_matcher('dis', device='cpu').match(src, tgt)
    assert flow.shape == (120, 160, 2)
    expected = grid.rescale_points(grid.pixel_coords(120, 160) + [2.0, 1.0], (160, 120), (320, 240))
    err = np.linalg.norm(grid.flow_to_map(flow) - expected, axis=-1)[16:-16, 16:-16]
    assert np.median(err) < 0.3


def test_dis_matchability_low_where_target_is_unrelated():
    src = _texture(120, 160, seed=2)
    unrelated = _texture(120, 160, seed=3)
    _, same = load_matcher('dis', device='cpu').match(src, _translated(src, 1, 1))
    _, diff = load_matcher('dis', device='cpu').match(src, unrelated)
    assert diff.mean() < same.mean() - 0.3


def test_a_coarser_backward_flow_keeps_the_forward_flow_and_the_check():
    """``fb_scale`` only changes the consistency check: the output flow is the same, the
    round trip of a clean translation still closes, an unrelated target still scores low,
    and images too small to shrink keep a full-size backward flow."""
    src = _texture(240, 320, seed=4)
    tgt = _translated(src, 2.6, -1.3)
    full = load_matcher('dis', device='cpu').match(src, tgt)
    half = load_matcher('dis', device='cpu', fb_scale=0.5).match(src, tgt)
    assert np.array_equal(full.flow, half.flow)
    assert np.median(half.matchability[24:-24, 24:-24]) > 0.8
    _, unrelated = load_matcher('dis', device='cpu', fb_scale=0.5).match(src, _texture(240, 320, 5))
    assert unrelated.mean() < np.mean(half.matchability) - 0.3
    small = _texture(20, 22, seed=6)
    tiny = load_matcher('dis', device='cpu', fb_scale=0.5).match(small, small)
    assert tiny.flow.shape == (20, 22, 2) and np.all(np.isfinite(tiny.matchability))
    with pytest.raises(ValueError, match='fb_scale'):
        load_matcher('dis', device='cpu', fb_scale=0.05)


def test_the_backward_flow_beside_the_forward_one_changes_nothing_but_the_time():
    src = _texture(120, 160, seed=7)
    tgt = _translated(src, 1.5, -0.5)
    apart = load_matcher('dis', device='cpu', concurrent='off').match(src, tgt)
    beside = load_matcher('dis', device='cpu', concurrent='on')
    for _ in range(2):   # the worker thread is reused from the second call on
        result = beside.match(src, tgt)
        assert np.array_equal(result.flow, apart.flow)
        assert np.array_equal(result.matchability, apart.matchability)
    assert load_matcher('dis', device='cpu', concurrent=True).concurrent == 'on'  # YAML `on`
    with pytest.raises(ValueError, match='concurrent'):
        load_matcher('dis', device='cpu', concurrent='yes')


class _CountingDis:
    """Stands in for a DIS instance and counts its flows."""

    def __init__(self, dis) -> None:
        self.dis, self.calls = dis, 0

    def calc(self, *args):
        self.calls += 1
        return self.dis.calc(*args)


@pytest.mark.parametrize('concurrent', ['off', 'on'])
@pytest.mark.parametrize('max_side', [0, 96])
def test_the_flow_comes_before_the_backward_flow_of_its_check(concurrent, max_side):
    """match_staged hands the flow out before the check's backward flow is computed (the
    node publishes it meanwhile), and both equal match()'s."""
    src = _texture(120, 160, seed=3)
    tgt = cv2.resize(_translated(src, 2.5, 1.0), (150, 110))
    whole = load_matcher('dis', device='cpu', max_side=max_side).match(src, tgt)
    matcher = load_matcher('dis', device='cpu', max_side=max_side, concurrent=concurrent)
    matcher._dis_backward = counting = _CountingDis(matcher._dis_backward)
    staged = matcher.match_staged(src, tgt)
    if concurrent == 'off':
        assert counting.calls == 0          # the flow is out, its check not started
    np.testing.assert_array_equal(staged.flow, whole.flow)
    first = staged.matchability()
    assert counting.calls == 1 and staged.matchability() is first   # computed once
    np.testing.assert_array_equal(first, whole.matchability)
    assert first.dtype == np.float32 and 0 <= first.min() and first.max() <= 1


def test_methods_without_a_split_hand_out_both_at_once():
    """The default match_staged: match()'s two results, checked the same way."""
    from dense_match_ros.core.registry import Matcher

    class Constant(Matcher):
        def _match(self, source, target):
            return np.ones(source.shape[:2] + (2,), np.float64), np.full(source.shape[:2], 2.0)

    staged = Constant().match_staged(_texture(20, 30), _texture(20, 30, seed=1))
    assert staged.flow.dtype == np.float32 and staged.flow.shape == (20, 30, 2)
    assert staged.matchability().max() == 1.0               # clipped like match()'s
    flow, matchability = staged.result()
    assert flow is staged.flow and matchability.shape == (20, 30)


def test_dis_refuses_what_would_break_it_with_its_own_errors():
    with pytest.raises(ValueError, match='fb_sigma'):
        load_matcher('dis', device='cpu', fb_sigma=0)
    with pytest.raises(ValueError, match='max_side'):
        load_matcher('dis', device='cpu', max_side=8)
    tiny = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match='at least 12 px a side for dis|dis needs images of at least 12 px'):
        load_matcher('dis', device='cpu').match(tiny, tiny)
    # Identical frames with the smallest accepted tolerance: finite matchability, no warning.
    img = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    m = load_matcher('dis', device='cpu', fb_sigma=0.01).match(img, img).matchability
    assert np.all(np.isfinite(m))


def test_unknown_methods_and_options_are_named_plainly():
    with pytest.raises(ValueError) as info:
        load_matcher('foo', device='cpu')
    assert str(info.value).startswith("unknown method 'foo'; available: ")   # no extra quotes
    with pytest.raises(ValueError) as info:
        load_matcher('dis', device='cpu', presett='fast')
    assert "dis has no option 'presett'" in str(info.value) and 'preset' in str(info.value)
    assert 'unexpected keyword' not in str(info.value)


def test_threads_setting_reaches_torch_and_opencv():
    import cv2
    import torch
    from dense_match_ros.core.device import set_threads
    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        assert set_threads(1) == 1 and cv2.getNumThreads() == 1
        with pytest.raises(ValueError):
            set_threads(-1)
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


@pytest.mark.skipif(__import__('platform').libc_ver()[0] != 'glibc', reason='glibc only')
def test_retained_memory_serves_each_frame_without_fresh_pages():
    """After ``retain_freed_memory`` a frame-sized array freed and allocated again reuses the
    same pages: twenty 640x480x2 float32 arrays (600 pages each) written in turn fault in
    almost nothing after the first."""
    import resource
    from dense_match_ros.core.device import retain_freed_memory
    assert retain_freed_memory(False) is False
    assert retain_freed_memory() is True

    def frame() -> None:
        buffer = np.empty((480, 640, 2), np.float32)
        buffer.fill(1.0)

    frame()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        frame()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 200
