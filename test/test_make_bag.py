"""dense-match-make-bag: folder layouts, stamps, intrinsics, synthetic sequences."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import yaml

pytest.importorskip('rclpy')

from dense_match_ros.ros import convert  # noqa: E402
from dense_match_ros.ros.tools import bag_io, make_bag  # noqa: E402
from dense_match_ros.ros.tools.trajectory import read_tum  # noqa: E402


def _write_png(path, value: int, size=(32, 24)):
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[..., 0] = value  # R channel identifies the frame; G/B show channel order mistakes
    img[..., 1] = 7
    img[..., 2] = 200
    cv2.imwrite(str(path), img[..., ::-1])


def _read(bag):
    with bag_io.BagReader(bag) as r:
        return r.topics, [m for m in r.messages()]


def test_tum_layout_stamps_intrinsics_and_missing_files(tmp_path):
    folder = tmp_path / 'tum'
    (folder / 'rgb').mkdir(parents=True)
    stamps = ['1341847980.722988', '1341847980.754743', '1341847980.786856', '1341847980.822978']
    for i, s in enumerate(stamps):
        if i != 2:  # listed but absent: skipped, as in the shared subset
            _write_png(folder / 'rgb' / f'{s}.png', 10 * i)
    (folder / 'rgb.txt').write_text('# timestamp filename\n' +
                                    ''.join(f'{s} rgb/{s}.png\n' for s in stamps))
    (folder / 'intrinsics.txt').write_text('# fx fy cx cy w h\n30.5 31.5 15.25 11.75 32 24\n')
    out = tmp_path / 'bag'
    rc = make_bag.main([str(folder), '-o', str(out), '--image-topic', '/cam/rgb',
                        '--camera-info-topic', '/cam/info', '--frame-id', 'optical'])
    assert rc == 0
    topics, msgs = _read(out)
    assert topics['/cam/rgb'] == bag_io.TopicSummary(bag_io.IMAGE, 3)
    assert topics['/cam/info'] == bag_io.TopicSummary(bag_io.CAMERA_INFO, 3)
    images = [m.to_ros() for m in msgs if m.topic == '/cam/rgb']
    infos = [m.to_ros() for m in msgs if m.topic == '/cam/info']
    expected_ns = [1341847980722988000, 1341847980754743000, 1341847980822978000]
    assert [convert.stamp_to_ns(i.header.stamp) for i in images] == expected_ns
    assert [m.timestamp for m in msgs if m.topic == '/cam/rgb'] == expected_ns
    assert [convert.stamp_to_ns(i.header.stamp) for i in infos] == expected_ns
    assert {i.header.frame_id for i in images + infos} == {'optical'}
    # camera_info precedes its image: a reader keeping "the latest" never lacks one
    order = [m.topic for m in msgs]
    assert order[0] == '/cam/info' and order[1] == '/cam/rgb'
    intr = convert.camera_info_to_intrinsics(infos[0])
    np.testing.assert_allclose(intr.K, [[30.5, 0, 15.25], [0, 31.5, 11.75], [0, 0, 1]])
    assert intr.size == (32, 24) and not intr.has_distortion
    rgb = [convert.image_to_rgb(i) for i in images]
    assert [int(x[0, 0, 0]) for x in rgb] == [0, 10, 30]
    assert tuple(rgb[0][0, 0, 1:]) == (7, 200)


def test_numbered_layout_rate_yaml_intrinsics_and_mcap(tmp_path):
    folder = tmp_path / 'seq'
    folder.mkdir()
    for n in (10, 2, 1):  # natural order 1, 2, 10 (not 1, 10, 2)
        _write_png(folder / f'frame_{n}.png', n)
    calib = {'image_width': 32, 'image_height': 24, 'distortion_model': 'plumb_bob',
             'camera_matrix': {'rows': 3, 'cols': 3, 'data': [40, 0, 16, 0, 41, 12, 0, 0, 1]},
             'distortion_coefficients': {'rows': 1, 'cols': 5, 'data': [-0.2, 0.05, 0, 0, 0]}}
    (tmp_path / 'cam.yaml').write_text(yaml.safe_dump(calib))
    out = tmp_path / 'bag'
    rc = make_bag.main([str(folder), '-o', str(out), '--rate', '10', '--start', '5',
                        '--intrinsics', str(tmp_path / 'cam.yaml'), '--storage', 'mcap',
                        '--encoding', 'bgr8'])
    assert rc == 0
    assert (out / 'bag.mcap').is_file()
    topics, msgs = _read(out)
    images = [m.to_ros() for m in msgs if m.topic == make_bag.DEFAULT_IMAGE_TOPIC]
    assert [convert.stamp_to_ns(i.header.stamp) for i in images] == \
        [5_000_000_000, 5_100_000_000, 5_200_000_000]
    assert {i.encoding for i in images} == {'bgr8'}
    assert [int(convert.image_to_rgb(i)[0, 0, 0]) for i in images] == [1, 2, 10]
    info = next(m.to_ros() for m in msgs if m.topic == make_bag.DEFAULT_INFO_TOPIC)
    intr = convert.camera_info_to_intrinsics(info)
    np.testing.assert_allclose(intr.D, [-0.2, 0.05, 0, 0, 0])
    assert intr.K[1, 1] == 41 and intr.has_distortion
    np.testing.assert_allclose(np.reshape(info.p, (3, 4))[:, :3], intr.K)


def test_flag_intrinsics_png_compressed_and_size_mismatch(tmp_path, capsys):
    folder = tmp_path / 'seq'
    folder.mkdir()
    for n in range(2):
        _write_png(folder / f'{n:03d}.png', 50 + n)
    out = tmp_path / 'bag'
    rc = make_bag.main([str(folder), '-o', str(out), '--fx', '20', '--fy', '20', '--cx', '15.5',
                        '--cy', '11.5', '--format', 'png', '--image-topic', '/c/image/compressed'])
    assert rc == 0
    topics, msgs = _read(out)
    assert topics['/c/image/compressed'].msgtype == bag_io.COMPRESSED_IMAGE
    comp = [m.to_ros() for m in msgs if m.topic == '/c/image/compressed']
    rgb = convert.compressed_to_rgb(comp[1])  # png is lossless: exact pixels back
    assert rgb.shape == (24, 32, 3) and tuple(rgb[3, 4]) == (51, 7, 200)
    info = next(m.to_ros() for m in msgs if m.topic == make_bag.DEFAULT_INFO_TOPIC)
    assert (info.width, info.height) == (32, 24)  # filled from the images

    (tmp_path / 'wrong.txt').write_text('20 20 15.5 11.5 640 480\n')
    rc = make_bag.main([str(folder), '-o', str(tmp_path / 'bag2'),
                        '--intrinsics', str(tmp_path / 'wrong.txt')])
    assert rc == 2
    assert 'intrinsics are for 640x480' in capsys.readouterr().err
    rc = make_bag.main([str(folder), '-o', str(tmp_path / 'bag3')])
    assert rc == 2
    assert 'no intrinsics' in capsys.readouterr().err


def test_synthetic_sequence_with_ground_truth(tmp_path):
    out = tmp_path / 'syn'
    rc = make_bag.main(['-o', str(out), '--frames', '3', '--size', '64x48', '--rate', '20'])
    assert rc == 0
    topics, msgs = _read(out)
    images = [convert.image_to_rgb(m.to_ros()) for m in msgs if m.topic == make_bag.DEFAULT_IMAGE_TOPIC]
    stamps = [m.timestamp for m in msgs if m.topic == make_bag.DEFAULT_IMAGE_TOPIC]
    assert [im.shape for im in images] == [(48, 64, 3)] * 3
    assert stamps == [1_000_000_000, 1_050_000_000, 1_100_000_000]
    assert images[0].std() > 20  # textured, not blank
    assert np.abs(images[1].astype(int) - images[0]).mean() > 3  # the camera moved
    traj = read_tum(out / 'groundtruth.txt')
    np.testing.assert_allclose(traj.stamps, [1.0, 1.05, 1.1])
    np.testing.assert_allclose(traj.poses[0], np.eye(4), atol=1e-6)
    assert 0.05 < np.linalg.norm(traj.poses[1][:3, 3]) < 0.1  # ~1.5 m/s at 20 Hz
    # Rendering is a pure function of pose and intrinsics: a re-render matches the bag.
    frames, intr, poses = make_bag.synthetic_sequence(3, (64, 48), 20.0)
    np.testing.assert_array_equal(frames[2].pixels, images[2])
    np.testing.assert_allclose(poses, traj.poses, atol=1e-5)


def test_synthetic_render_is_geometrically_consistent():
    """Warping view 1 by the flow implied by depth and poses reproduces view 0.

    A renderer whose images disagree with the ground-truth trajectory would make every
    pose score of the synthetic demo meaningless; a wrong pose must warp visibly worse.
    """
    size = (128, 96)
    intr = make_bag.synthetic_intrinsics(size)
    poses = make_bag.synthetic_poses(3, 10.0)  # 15 cm apart: large parallax
    tex = make_bag._texture(256, np.random.default_rng(0))
    a, depth = make_bag.render_view(poses[0], intr.K, size, tex, return_depth=True)
    b = make_bag.render_view(poses[1], intr.K, size, tex)
    assert depth.min() > 1.0 and depth.max() < 8.0  # inside the room

    def warp_error(T_w_b):
        xs, ys = np.meshgrid(np.arange(size[0], dtype=float), np.arange(size[1], dtype=float))
        rays = np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(intr.K).T
        X_a = rays * depth[..., None]  # z-depth: rays have unit z
        T_b_a = np.linalg.inv(T_w_b) @ poses[0]
        X_b = X_a @ T_b_a[:3, :3].T + T_b_a[:3, 3]
        uv = X_b @ intr.K.T
        mx = (uv[..., 0] / uv[..., 2]).astype(np.float32)
        my = (uv[..., 1] / uv[..., 2]).astype(np.float32)
        warped = cv2.remap(b, mx, my, cv2.INTER_LINEAR)
        inside = (mx > 1) & (my > 1) & (mx < size[0] - 2) & (my < size[1] - 2)
        err = np.abs(warped.astype(float) - a).mean(-1)[inside]
        return float(np.median(err)), float(np.mean(err < 8))

    median_err, good = warp_error(poses[1])
    wrong_median, _ = warp_error(poses[2])
    assert median_err < 4.0 and good > 0.85  # occlusion edges and borders aside
    assert wrong_median > 3 * median_err + 5
