"""Synthetic pairs: exact flow for every transform kind, determinism, photo split, CLI."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from dense_match_ros.core.geometry import grid, gt_flow, transforms as tf
from dense_match_ros.data import photos as photos_mod
from dense_match_ros.data.make_pairs import load_pairs, main as make_pairs_main
from dense_match_ros.data.photos import PhotoSource, heldout_score
from dense_match_ros.data.synthetic import (KINDS, PhotometricJitter, SyntheticPairDataset,
                                            SyntheticPairGenerator, heldout_pairs,
                                            random_affine, random_homography, random_tps)

SIZE = (48, 64)  # (H, W): small, and non-square on purpose


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured colour image with structure at several scales."""
    coarse = cv2.resize(rng.random((h // 16 + 2, w // 16 + 2, 3)).astype(np.float32), (w, h),
                        interpolation=cv2.INTER_CUBIC)
    fine = cv2.resize(rng.random((h // 4 + 2, w // 4 + 2, 3)).astype(np.float32), (w, h),
                      interpolation=cv2.INTER_LINEAR)
    img = 0.6 * coarse + 0.4 * fine
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


@pytest.fixture(scope='module')
def photo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('photos')
    rng = np.random.default_rng(7)
    (root / 'sub').mkdir()
    for i in range(6):
        h, w = (120, 160) if i % 2 else (150, 110)
        name = root / ('sub' if i % 3 == 0 else '.') / f'p{i}.{"png" if i % 2 else "jpg"}'
        cv2.imwrite(str(name), _photo(rng, h, w))
    (root / 'notes.txt').write_text('not a photo')
    return root


@pytest.fixture(scope='module')
def photos(photo_dir):
    return PhotoSource(photo_dir, split='all', short_side=None)


def _interior(pair) -> np.ndarray:
    """Valid pixels whose whole bilinear footprint lies inside the target."""
    h, w = pair.target.shape[:2]
    m = grid.flow_to_map(pair.flow)
    return pair.valid & (m[..., 0] >= 0) & (m[..., 0] <= w - 1) & (m[..., 1] >= 0) & (m[..., 1] <= h - 1)


@pytest.mark.parametrize('kind', KINDS)
def test_generator_flow_is_exact_for_every_kind(photos, kind):
    gen = SyntheticPairGenerator(photos, size=SIZE, kinds=(kind,), photometric=False)
    for seed in range(8):
        pair = gen.sample(np.random.default_rng(seed))
        assert pair.kind == kind
        assert pair.source.shape == pair.target.shape == SIZE + (3,)
        assert pair.source.dtype == pair.target.dtype == np.uint8
        assert pair.flow.shape == SIZE + (2,) and pair.flow.dtype == np.float32
        assert pair.valid.shape == SIZE and pair.valid.dtype == bool
        inside = _interior(pair)
        assert inside.mean() > 0.2, (seed, pair.valid.mean())
        err = np.abs(grid.warp(pair.target, pair.flow).astype(np.float32)
                     - pair.source.astype(np.float32))[inside]
        identity = np.abs(pair.target.astype(np.float32) - pair.source.astype(np.float32))
        # Same bilinear sampling of the same photo: equal up to uint8 rounding.
        assert err.max() <= 2.0 and err.mean() < 0.1, (seed, err.max(), err.mean())
        assert identity.mean() > 20 * max(err.mean(), 0.05)


@pytest.mark.parametrize('kind', KINDS)
def test_generator_flow_equals_transform_displacement(photos, kind):
    gen = SyntheticPairGenerator(photos, size=SIZE, kinds=(kind,), photometric=False)
    h, w = SIZE
    for seed in range(5):
        pair = gen.sample(np.random.default_rng(100 + seed))
        theta = np.asarray(pair.params['theta'])
        rng = np.random.default_rng(seed)
        xs, ys = rng.integers(0, w, 30), rng.integers(0, h, 30)
        pts = np.stack([xs, ys], 1).astype(np.float64)
        mapped = tf.to_pixels(tf.apply_transform(kind, theta, tf.to_normalized(pts, (w, h))), (w, h))
        np.testing.assert_allclose(pair.flow[ys, xs], mapped - pts, atol=1e-4)
        # ...and the whole field matches the gt_flow builder for that family.
        if kind in ('affine', 'similarity'):
            ref, ref_valid = gt_flow.flow_from_affine(theta, (w, h), (w, h))
        elif kind == 'tps':
            ref, ref_valid = gt_flow.flow_from_tps(theta, (w, h), (w, h))
        else:
            ref, ref_valid = gt_flow.flow_from_normalized_homography(theta.reshape(3, 3), (w, h), (w, h))
        np.testing.assert_allclose(pair.flow, ref, atol=1e-3)
        assert (pair.valid != ref_valid).mean() < 1e-3  # only float32/float64 ties at the border


def test_random_transforms_respect_the_paper_ranges():
    rng = np.random.default_rng(0)
    for _ in range(200):
        theta = random_affine(rng)
        sv = np.linalg.svd(theta.reshape(2, 3)[:, :2], compute_uv=False)
        assert 0.75 - 1e-9 <= sv.min() and sv.max() <= 1.25 + 1e-9
        assert np.abs(theta[[2, 5]]).max() <= 0.25
        assert np.linalg.det(theta.reshape(2, 3)[:, :2]) > 0
        offsets = random_tps(rng) - tf.tps_identity()
        assert np.abs(offsets).max() <= 0.4
        H = random_homography(rng)
        moved, w = tf.apply_homography(H, tf.CORNERS)
        assert np.abs(moved - tf.CORNERS).max() <= 2 / 3 + 1e-9
        assert (w > 0).all()
    # The ranges are actually used, not just bounded.
    thetas = np.array([random_affine(rng) for _ in range(300)])
    assert np.abs(thetas[:, 2]).max() > 0.2
    assert np.abs(np.array([random_tps(rng) for _ in range(50)]) - tf.tps_identity()).max() > 0.35


def test_photometric_jitter_changes_appearance_not_geometry(photos):
    on = SyntheticPairGenerator(photos, size=SIZE, photometric=PhotometricJitter(p=1.0, p_blur=1.0))
    off = SyntheticPairGenerator(photos, size=SIZE, photometric=False)
    for seed in range(4):
        a, b = on.sample(np.random.default_rng(seed)), off.sample(np.random.default_rng(seed))
        np.testing.assert_array_equal(a.flow, b.flow)
        np.testing.assert_array_equal(a.valid, b.valid)
        assert np.abs(a.source.astype(int) - b.source).mean() > 1
        assert np.abs(a.target.astype(int) - b.target).mean() > 1
        jit = a.params['photometric']
        assert jit['source'] != jit['target']  # independent draws per image
    with pytest.raises(ValueError):
        SyntheticPairGenerator(photos, kinds=('spline',))


def test_dataset_is_deterministic_and_order_independent(photos):
    gen = SyntheticPairGenerator(photos, size=(32, 40))
    ds = SyntheticPairDataset(gen, length=4, seed=5)
    items = list(ds)
    assert len(items) == len(ds) == 4
    again = ds[2]
    np.testing.assert_array_equal(again.source, items[2].source)
    np.testing.assert_array_equal(again.flow, items[2].flow)
    np.testing.assert_array_equal(ds[-1].target, items[3].target)
    other_seed = SyntheticPairDataset(gen, length=4, seed=6)[2]
    assert not np.array_equal(other_seed.source, again.source)
    with pytest.raises(IndexError):
        ds[4]
    endless = iter(SyntheticPairDataset(gen, seed=5))
    np.testing.assert_array_equal(next(endless).source, items[0].source)


def test_heldout_set_is_bit_identical_and_from_heldout_photos():
    a = heldout_pairs(n=3, size=(40, 56))
    b = heldout_pairs(n=2, size=(40, 56))
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p.source, q.source)
        np.testing.assert_array_equal(p.target, q.target)
        np.testing.assert_array_equal(p.flow, q.flow)
        np.testing.assert_array_equal(p.valid, q.valid)
        assert p.params == q.params
    held = set(PhotoSource(split='heldout').keys)
    assert all(p.params['photo'] in held for p in a)
    assert not np.array_equal(a[0].source, a[1].source)


def test_photo_split_is_disjoint_stable_and_about_ten_percent(tmp_path):
    for i in range(300):
        cv2.imwrite(str(tmp_path / f'img_{i:03d}.png'), np.full((4, 4, 3), i % 255, np.uint8))
    train = PhotoSource(tmp_path, split='train')
    held = PhotoSource(tmp_path, split='heldout')
    everything = PhotoSource(tmp_path)
    assert set(train.keys).isdisjoint(held.keys)
    assert sorted(train.keys + held.keys) == everything.keys
    assert 0.05 < len(held) / len(everything) < 0.15
    # Adding photos moves no existing photo across the split.
    for i in range(300, 330):
        cv2.imwrite(str(tmp_path / f'img_{i:03d}.png'), np.zeros((4, 4, 3), np.uint8))
    assert set(held.keys) <= set(PhotoSource(tmp_path, split='heldout').keys)
    assert all((heldout_score(k) < 0.1) for k in held.keys)


def test_photo_source_reads_recursively_and_keeps_small_folders_usable(photo_dir):
    src = PhotoSource(photo_dir, short_side=60)
    assert len(src) == 6 and any(k.startswith('sub/') for k in src.keys)
    img = src[0]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) == 60
    # Colour order: a pure red PNG decodes as red.
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 2] = 255  # BGR on disk
    one = photo_dir.parent / 'red'
    one.mkdir(exist_ok=True)
    cv2.imwrite(str(one / 'r.ppm'), red)
    cv2.imwrite(str(one / 's.bmp'), red)
    pix = PhotoSource(one, short_side=None)[0][0, 0]
    assert pix.tolist() == [255, 0, 0]
    # Six photos: 10 % is below one, yet the held-out split is non-empty and disjoint.
    assert len(PhotoSource(photo_dir, split='heldout')) >= 1
    assert len(PhotoSource(photo_dir, split='train')) >= 1


def test_evaluation_data_is_never_a_photo_source(tmp_path, monkeypatch):
    bad = tmp_path / 'hpatches_v_machines'
    bad.mkdir()
    cv2.imwrite(str(bad / '1.png'), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError):
        PhotoSource(bad)
    # With no configured folder, the defaults still produce photos (skimage fallback),
    # and the Middlebury motorcycle pair shipped with scikit-image is not among them.
    monkeypatch.setenv(photos_mod.ENV_VAR, str(tmp_path / 'missing'))
    fallback = PhotoSource(short_side=64)
    assert len(fallback) > 0
    assert not any('motorcycle' in k for k in fallback.keys)
    assert fallback[0].shape[2] == 3


def test_make_pairs_cli_round_trips_and_matches_heldout(tmp_path, photo_dir):
    out = tmp_path / 'pairs'
    assert make_pairs_main([str(out), '--n', '3', '--size', '32', '48', '--seed', '9',
                            '--kinds', 'tps', 'homography', '--photos', str(photo_dir),
                            '--quiet']) == 0
    index = json.loads((out / 'index.json').read_text())
    assert index['n'] == 3 and index['size_hw'] == [32, 48] and len(index['pairs']) == 3
    loaded = load_pairs(out)
    gen = SyntheticPairGenerator(PhotoSource(photo_dir, split='train'), size=(32, 48),
                                 kinds=('tps', 'homography'))
    for i, p in enumerate(loaded):
        ref = gen.pair(9, i)
        assert p.kind in ('tps', 'homography') and p.kind == ref.kind
        np.testing.assert_array_equal(p.source, ref.source)  # PNG is lossless
        np.testing.assert_array_equal(p.target, ref.target)
        np.testing.assert_array_equal(p.flow, ref.flow)
        np.testing.assert_array_equal(p.valid, ref.valid)
    held_out = tmp_path / 'held'
    make_pairs_main([str(held_out), '--n', '2', '--size', '40', '56', '--split', 'heldout', '--quiet'])
    for p, q in zip(load_pairs(held_out), heldout_pairs(n=2, size=(40, 56))):
        np.testing.assert_array_equal(p.source, q.source)
        np.testing.assert_array_equal(p.flow, q.flow)


def test_moving_objects_keep_the_flow_exact_and_mark_what_they_hide(photos):
    plain = SyntheticPairGenerator(photos, size=(96, 128), photometric=False)
    gen = SyntheticPairGenerator(photos, size=(96, 128), photometric=False, objects=1.0)
    occluded_any = False
    for seed in range(6):
        pair = gen.sample(np.random.default_rng(seed))
        assert 2 <= pair.params['objects'] <= 6
        inside = _interior(pair)
        err = np.abs(grid.warp(pair.target, pair.flow).astype(np.float32)
                     - pair.source.astype(np.float32)).mean(-1)
        # Visible pixels look the same in both images (object edges: nearest-pixel layers).
        assert np.median(err[inside]) < 2.0 and np.mean(err[inside] > 40) < 0.02, seed
        # Pixels whose landing point another layer covers are not visible there.
        h, w = pair.valid.shape
        background = plain.sample(np.random.default_rng(seed))
        moved = np.abs(pair.flow - background.flow).max(-1) > 1e-3
        occluded_any |= bool((~pair.valid & grid.in_bounds(pair.flow, (w, h))).any())
        assert moved.mean() > 0.02
    assert occluded_any
    # Without objects the stream is the one it always was (the held-out set depends on it).
    a = SyntheticPairGenerator(photos, size=(48, 64)).sample(np.random.default_rng(3))
    b = SyntheticPairGenerator(photos, size=(48, 64), objects=0.0).sample(np.random.default_rng(3))
    assert np.array_equal(a.source, b.source) and np.array_equal(a.flow, b.flow)


def test_similarity_kind_covers_wide_rotation_and_zoom():
    from dense_match_ros.data.synthetic import random_similarity
    rng = np.random.default_rng(0)
    angles, zooms = [], []
    for _ in range(400):
        a = np.asarray(random_similarity(rng)).reshape(2, 3)   # [A | t], rows x and y
        angles.append(np.degrees(np.arctan2(a[1, 0], a[0, 0])))
        zooms.append(np.sqrt(abs(np.linalg.det(a[:, :2]))))
    assert min(angles) < -40 and max(angles) > 40
    assert min(zooms) < 0.75 and max(zooms) > 1.3


def test_make_pairs_help_states_each_default_once():
    from dense_match_ros.data.make_pairs import build_parser
    text = build_parser().format_help()
    assert 'default: None' not in text
    options = text.split('\n  -')[1:]
    assert options and all(o.count('default') <= 1 for o in options), text
