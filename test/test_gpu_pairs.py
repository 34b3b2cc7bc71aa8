"""Batched synthetic pairs on a torch device (run here on the CPU) and the GPU training path."""
import json
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dense_match_ros.core.geometry import transforms as tf
from dense_match_ros.training.losses import flow_to_grid_torch
from dense_match_ros.training import gpu_pairs
from dense_match_ros.training.gpu_pairs import GpuPairConfig, GpuPairSampler, photos_to_tensor

torch.set_num_threads(1)


def _photos(n: int = 3, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [cv2.GaussianBlur(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8), (0, 0), 2.0)
            for _ in range(n)]


@pytest.fixture(scope='module')
def photos():
    return photos_to_tensor(_photos(), (80, 80))


def _warp(target: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    g = flow_to_grid_torch(flow).permute(0, 2, 3, 1)
    return F.grid_sample(target.float(), g, mode='bilinear', align_corners=False)


def test_ground_truth_flow_maps_the_source_onto_the_target(photos):
    s = GpuPairSampler(photos, GpuPairConfig(size=(48, 48), photometric=False))
    b = s.sample(12, seed=0, step=3)
    assert b['source'].shape == (12, 3, 48, 48) and b['source'].dtype == torch.uint8
    assert b['flow'].shape == (12, 48, 48, 2) and b['valid'].dtype == torch.bool
    valid = b['valid']
    assert 0.3 < valid.float().mean() < 1.0
    assert (b['flow'][~valid] == 0).all()
    err = (_warp(b['target'], b['flow']) - b['source'].float()).abs().mean(1)[valid].mean()
    # A flow 2 px off, for scale: the true flow must explain the source far better.
    off = (_warp(b['target'], b['flow'] + 2.0) - b['source'].float()).abs().mean(1)[valid].mean()
    assert err < 2.0 and err < 0.4 * off


def test_identity_ranges_give_identical_images_and_zero_flow(photos):
    cfg = GpuPairConfig(size=(32, 32), kinds=('affine',), rotation_deg=0, shear_deg=0, scale=(1, 1),
                        translation=0, photometric=False)
    b = GpuPairSampler(photos, cfg).sample(4)
    assert b['flow'].abs().max() < 1e-4 and b['valid'].all()
    assert torch.equal(b['source'], b['target'])


def test_batches_are_a_function_of_seed_and_step(photos):
    s = GpuPairSampler(photos, GpuPairConfig(size=(32, 32)))
    a, b, c = s.sample(4, 1, 5), s.sample(4, 1, 5), s.sample(4, 1, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['source'], c['source'])
    # Photometric jitter changes appearance, never the geometry.
    plain = GpuPairSampler(photos, GpuPairConfig(size=(32, 32), photometric=False)).sample(4, 1, 5)
    assert torch.equal(plain['flow'], a['flow']) and not torch.equal(plain['source'], a['source'])


def test_batched_homography_matches_the_numpy_dlt():
    rng = np.random.default_rng(0)
    dst = tf.CORNERS + rng.uniform(-0.3, 0.3, (2, 4, 2))
    src = np.broadcast_to(tf.CORNERS, (2, 4, 2))
    H = gpu_pairs._homography_from_corners(torch.tensor(src, dtype=torch.float64),
                                           torch.tensor(dst, dtype=torch.float64))
    for i in range(2):
        assert np.allclose(H[i].numpy(), tf.homography_from_points(tf.CORNERS, dst[i]), atol=1e-9)


def test_device_pairs_train_dgc_through_the_shared_loop_without_pyyaml(tmp_path, monkeypatch):
    """The GPU path (data.sampler: device, a minutes budget), run here on the CPU: the shared
    loop and CLI with neither PyYAML nor ROS importable, resumed, then ended by the budget."""
    from dense_match_ros.core.methods.dgc import DgcMatcher
    from dense_match_ros.training import checkpoint as ckpt
    from dense_match_ros.training.cli import main
    folder = tmp_path / 'pack'
    folder.mkdir()
    for i, img in enumerate(_photos(6, seed=1)):
        cv2.imwrite(str(folder / f'p{i}.png'), img)
    config = tmp_path / 'cfg.yaml'
    config.write_text('# a comment line\n' + json.dumps({
        'method': 'dgc', 'steps': 4, 'minutes': 5, 'batch_size': 2, 'log_every': 1, 'threads': 1,
        'checkpoint_every': 1000, 'optim': {'warmup_steps': 1},
        'data': {'sampler': 'device', 'image_size': [32, 32], 'photo_short_side': 48},
        'model': {'width': 0.125, 'input_size': [32, 32]}}))
    for name in ('yaml', 'rclpy', 'kornia'):                  # as on the GPU machine
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / 'run'
    args = ['dgc', '--config', str(config), '--out', str(out), '--set', f'data.photos={folder}',
            '--device', 'cpu', '--no-progress']
    assert main([*args, '--stop-at', '2']) == 0
    first = ckpt.load_training_state(out / 'last.pt')
    assert first['step'] == 2 and first['config']['data']['sampler'] == 'device'
    assert main(args) == 0                                    # the same command resumes
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r['loss']) for r in log)
    state = ckpt.load_training_state(out / 'last.pt')
    assert state['step'] == 4 and state['wall_time_s'] > first['wall_time_s']
    # Cosine over 5 minutes, not over 4 steps: seconds in, the rate has hardly decayed.
    assert [r['lr'] for r in log][0] == pytest.approx(1e-3)
    assert all(0.99e-3 < r['lr'] <= 1e-3 for r in log[1:])
    # The budget counts the time already spent: spent, the same run takes no further step ...
    assert main([*args, '--steps', '100', '--minutes', '0.0001']) == 0
    assert ckpt.load_training_state(out / 'last.pt')['step'] == 4
    # ... and a fresh run with a budget shorter than a step ends after its first step.
    short = tmp_path / 'short'
    assert main([*args[:4], str(short), *args[5:], '--steps', '100', '--minutes', '0.0001']) == 0
    assert [json.loads(l)['step'] for l in (short / 'log.jsonl').read_text().splitlines()] == [1]
    m = DgcMatcher(weights=str(out / 'last.pt'))
    flow, match = m.match(np.zeros((40, 50, 3), np.uint8), np.zeros((40, 50, 3), np.uint8))
    assert flow.shape == (40, 50, 2) and match.shape == (40, 50)


def test_moving_objects_keep_the_ground_truth_exact_and_hide_what_they_cover(photos):
    """With objects on every pair: some pixels belong to objects and some are hidden; where a
    pixel is visible the target at x + flow shows the source at x (as without objects), and
    the hidden ones do not. Without objects the batch is bit for bit what it was."""
    plain = GpuPairSampler(photos, GpuPairConfig(size=(48, 48), photometric=False))
    moving = GpuPairSampler(photos, GpuPairConfig(size=(48, 48), photometric=False, objects=1.0))
    a, b = plain.sample(12, seed=2, step=1), moving.sample(12, seed=2, step=1)
    assert torch.equal(a['source'], GpuPairSampler(photos, GpuPairConfig(
        size=(48, 48), photometric=False, objects=0.0)).sample(12, seed=2, step=1)['source'])
    changed = (a['source'] != b['source']).any(1)
    assert 0.05 < changed.float().mean() < 0.9             # objects cover part of each image
    in_frame = (b['flow'][..., 0] + torch.arange(48.0) >= 0) & (b['flow'][..., 0] + torch.arange(48.0) <= 47)
    hidden = ~b['valid'] & a['valid'] & in_frame
    assert hidden.float().mean() > 0.01                    # occlusions exist
    diff = (_warp(b['target'], b['flow']) - b['source'].float()).abs().mean(1)
    inner = torch.zeros(48, 48, dtype=torch.bool)
    inner[4:-4, 4:-4] = True
    seen = b['valid'] & inner
    assert diff[seen].mean() < 3.0 and diff[hidden & inner].mean() > 3 * diff[seen].mean()
    assert torch.equal(b['flow'], moving.sample(12, seed=2, step=1)['flow'])


def test_device_pairs_refuse_what_they_cannot_make(photos):
    from dense_match_ros.training import config as cfgmod
    from dense_match_ros.training.gpu_pairs import DeviceBatches
    from dense_match_ros.training.tasks import get_task
    config = cfgmod.from_dict({'method': 'hilm', 'data': {'sampler': 'device'}})
    with pytest.raises(ValueError, match='sampler: cpu'):
        DeviceBatches.from_config(config, get_task('hilm'), 0, torch.device('cpu'))
    config = cfgmod.from_dict({'method': 'dgc', 'data': {'sampler': 'device',
                                                         'kind_weights': [1.0, 2.0, 1.0]}})
    with pytest.raises(ValueError, match='kind_weights'):
        DeviceBatches.from_config(config, get_task('dgc'), 0, torch.device('cpu'))
    config = cfgmod.from_dict({'method': 'dgc', 'data': {'sampler': 'device', 'ranges': 'paper'}})
    with pytest.raises(ValueError, match='data.ranges needs data.sampler: cpu'):
        DeviceBatches.from_config(config, get_task('dgc'), 0, torch.device('cpu'))
    source = DeviceBatches(GpuPairSampler(photos, GpuPairConfig(size=(32, 32))), 2, seed=1)
    batches = list(source(5, 7))
    assert [int(b['step']) for b in batches] == [5, 6]
    assert torch.equal(batches[0]['flow'], source.sampler.sample(2, 1, 5)['flow'])


def test_train_pack_names_split_like_the_original_folders(tmp_path):
    from dense_match_ros.data.photos import PhotoSource
    nested, flat = tmp_path / 'images', tmp_path / 'pack'
    (nested / 'set').mkdir(parents=True)
    flat.mkdir()
    for i in range(40):
        img = np.full((8, 8, 3), i, np.uint8)
        cv2.imwrite(str(nested / 'set' / f'p{i}.png'), img)
        cv2.imwrite(str(flat / f'set__p{i}.png'), img)
    want = sorted(int(PhotoSource(nested, split='heldout', short_side=None)[i][0, 0, 0])
                  for i in range(len(PhotoSource(nested, split='heldout'))))
    got = sorted(gpu_pairs.load_photo_tensor(str(flat), (8, 8), split='heldout')[:, 0, 0, 0].tolist())
    assert got == want and 0 < len(got) < 40
    # The CPU sampler reading the pack (as on the GPU machine) holds out the same photos.
    pack = PhotoSource(flat, split='heldout', short_side=None)
    assert sorted(int(pack[i][0, 0, 0]) for i in range(len(pack))) == want
