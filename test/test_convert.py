"""Message <-> numpy conversion without cv_bridge: encodings, padding, errors, intrinsics.

Messages are plain namespaces here (the functions read fields by name, as they must for
rosbags messages), plus one round trip through the real rclpy Image class when present.
"""
from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from dense_match_ros.core.geometry import grid
from dense_match_ros.ros import convert
from dense_match_ros.ros.convert import FrameRejected


def _img(pixels: np.ndarray, encoding: str, pad: int = 0, big: bool = False) -> SimpleNamespace:
    h, w = pixels.shape[:2]
    raw = pixels.astype(pixels.dtype.newbyteorder('>' if big else '<'))
    rows = raw.reshape(h, -1).view(np.uint8)
    if pad:
        rows = np.concatenate([rows, np.full((h, pad), 77, np.uint8)], axis=1)
    return SimpleNamespace(height=h, width=w, encoding=encoding, is_bigendian=int(big),
                           step=rows.shape[1], data=rows.reshape(-1).copy())


RNG = np.random.default_rng(3)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize('encoding,pixels', [
    ('rgb8', RGB), ('bgr8', RGB[..., ::-1]),
    ('rgba8', np.dstack([RGB, np.full((5, 7), 9, np.uint8)])),
    ('bgra8', np.dstack([RGB[..., ::-1], np.full((5, 7), 9, np.uint8)])),
])
@pytest.mark.parametrize('pad', [0, 3])
def test_colour_encodings_to_rgb(encoding, pixels, pad):
    out = convert.image_to_rgb(_img(np.ascontiguousarray(pixels), encoding, pad=pad))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, RGB)


def test_mono8_and_mono16_little_and_big_endian():
    grey = RGB[..., 0]
    out = convert.image_to_rgb(_img(grey, 'mono8', pad=1))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))
    wide = (grey.astype(np.uint16) * 257)  # 0..65535
    for big in (False, True):
        assert convert.image_to_array(_img(wide, 'mono16', big=big)).tolist() == wide.tolist()
        out = convert.image_to_rgb(_img(wide, 'mono16', big=big))
        np.testing.assert_array_equal(out[..., 1], grey)
    # A 12-bit camera: mono16_max maps 4095 to white.
    twelve = np.array([[0, 4095, 2048]], np.uint16)
    out = convert.image_to_rgb(_img(twelve, 'mono16'), mono16_max=4095)
    assert out[0, :, 0].tolist() == [0, 255, 128]


def test_float_images_round_trip_through_fields():
    flow = RNG.standard_normal((4, 6, 2)).astype(np.float32)
    fields = convert.image_fields(flow, '32FC2')
    assert fields['step'] == 6 * 8 and fields['encoding'] == '32FC2'
    back = convert.image_to_array(SimpleNamespace(**fields))
    np.testing.assert_array_equal(back, flow)
    with pytest.raises(ValueError, match='2 channels'):
        convert.image_fields(flow[..., 0], '32FC2')


def test_rclpy_image_message_round_trip():
    pytest.importorskip('sensor_msgs.msg')
    m = convert.make_image_msg(RNG.random((3, 4)).astype(np.float32), '32FC1',
                               1_500_000_123, 'cam')
    assert (m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id) == (1, 500_000_123,
                                                                               'cam')
    assert (m.height, m.width, m.step, len(m.data)) == (3, 4, 16, 48)
    assert convert.stamp_to_ns(m.header.stamp) == 1_500_000_123
    assert convert.image_to_array(m).shape == (3, 4)


@pytest.mark.parametrize('change,reason,text', [
    ({'encoding': 'yuv422'}, 'unknown_encoding', "unknown image encoding 'yuv422'"),
    ({'step': 20}, 'bad_step', 'step 20 is smaller than width*channels*bytes = 7*3*1 = 21'),
    ({'data': np.zeros(104, np.uint8)}, 'bad_data_size',
     'step*height != len(data): 21*5 = 105 but data has 104 bytes'),
    ({'height': 0}, 'empty_image', 'image has no pixels: 7x0'),
    ({'encoding': '32FC1', 'step': 28, 'data': np.zeros(140, np.uint8)}, None, None),
])
def test_image_validation_errors(change, reason, text):
    msg = _img(RGB, 'rgb8')
    for k, v in change.items():
        setattr(msg, k, v)
    if reason is None:
        with pytest.raises(FrameRejected, match='not a camera image') as err:
            convert.image_to_rgb(msg)
        assert err.value.reason == 'unsupported_encoding'
        return
    with pytest.raises(FrameRejected) as err:
        convert.image_to_rgb(msg)
    assert err.value.reason == reason and text in str(err.value)


def test_size_limit_checked_before_data():
    # An 8000x8000 header with no data: refused for its size, the data is never looked at.
    msg = SimpleNamespace(height=8000, width=8000, encoding='rgb8', is_bigendian=0,
                          step=24000, data=b'')
    with pytest.raises(FrameRejected) as err:
        convert.image_to_rgb(msg, max_pixels=4096 * 4096)
    assert err.value.reason == 'image_too_large' and '8000x8000' in str(err.value)
    with pytest.raises(FrameRejected) as err:
        convert.image_to_rgb(msg, max_pixels=0)  # no limit: now the data is wrong
    assert err.value.reason == 'bad_data_size'


@pytest.mark.parametrize('ext,fmt', [('.png', 'png'), ('.png', 'rgb8; png compressed bgr8'),
                                     ('.jpg', 'jpeg'), ('.jpg', 'bgr8; jpeg compressed bgr8')])
def test_compressed_jpeg_png(ext, fmt):
    rgb = cv2.GaussianBlur(RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8), (5, 5), 0)
    ok, buf = cv2.imencode(ext, rgb[..., ::-1].copy())
    assert ok
    out = convert.compressed_to_rgb(SimpleNamespace(format=fmt, data=buf.reshape(-1)))
    assert out.shape == (40, 60, 3)
    tol = 0 if ext == '.png' else 12
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() <= tol
    with pytest.raises(FrameRejected) as err:
        convert.compressed_to_rgb(SimpleNamespace(format=fmt, data=buf.reshape(-1)),
                                  max_pixels=40 * 60 - 1)
    assert err.value.reason == 'image_too_large' and '60x40' in str(err.value)


def test_compressed_mono_and_errors():
    grey = RNG.integers(0, 256, (8, 9), dtype=np.uint8)
    ok, buf = cv2.imencode('.png', grey)
    out = convert.compressed_to_rgb(SimpleNamespace(format='png', data=bytes(buf)))
    np.testing.assert_array_equal(out[..., 2], grey)
    for fmt, data, reason in [('tiff', bytes(buf), 'unknown_format'),
                              ('png', b'', 'empty_image'),
                              ('jpeg', b'\x00garbage' * 10, 'decode_failed')]:
        with pytest.raises(FrameRejected) as err:
            convert.compressed_to_rgb(SimpleNamespace(format=fmt, data=data))
        assert err.value.reason == reason


def _info(k=None, d=(0.1, -0.05, 0, 0, 0), p=None, w=640, h=480):
    k = [500.0, 0, 320.0, 0, 510.0, 240.0, 0, 0, 1] if k is None else k
    p = [450.0, 0, 300.0, 0, 0, 450.0, 250.0, 0, 0, 0, 1, 0] if p is None else p
    return SimpleNamespace(k=k, d=list(d), p=p, width=w, height=h,
                           distortion_model='plumb_bob')


def test_camera_info_k_d_and_rectified_p():
    cam = convert.camera_info_to_intrinsics(_info())
    assert cam.K[0, 0] == 500 and cam.K[1, 1] == 510 and cam.size == (640, 480)
    assert cam.has_distortion
    rect = convert.camera_info_to_intrinsics(_info(), rectified=True)
    assert rect.K.tolist() == [[450, 0, 300], [0, 450, 250], [0, 0, 1]]
    assert not rect.has_distortion
    assert convert.camera_info_to_intrinsics(_info(w=0, h=0)).size is None


@pytest.mark.parametrize('info,reason', [
    (_info(k=[0.0] * 9), 'zero_camera_info'),
    (_info(k=[-5.0, 0, 1, 0, 5, 1, 0, 0, 1]), 'invalid_camera_info'),
    (_info(k=[5.0, 0, 1, 0, 5, 1, 0, 0, 0]), 'invalid_camera_info'),
    (_info(k=[5.0, 0, 1]), 'invalid_camera_info'),
    (_info(k=[float('nan')] + [1.0] * 8), 'invalid_camera_info'),
])
def test_camera_info_refused(info, reason):
    with pytest.raises(FrameRejected) as err:
        convert.camera_info_to_intrinsics(info)
    assert err.value.reason == reason


def test_scaled_intrinsics_follow_the_pixel_centre_convention():
    cam = convert.camera_info_to_intrinsics(_info())
    small = cam.scaled((640, 480), (160, 120))
    X = np.array([[0.3, -0.2, 2.0], [-1.0, 0.4, 5.0]])
    full = (cam.K @ X.T).T
    full = full[:, :2] / full[:, 2:]
    low = (small.K @ X.T).T
    low = low[:, :2] / low[:, 2:]
    np.testing.assert_allclose(low, grid.rescale_points(full, (640, 480), (160, 120)),
                               atol=1e-9)
    assert small.size == (160, 120) and cam.scaled((640, 480), (640, 480)) is cam


def test_unknown_encodings_are_told_the_camera_encodings_only():
    msg = _img(RGB, 'rgb8')
    msg.encoding = 'yuv422'
    with pytest.raises(FrameRejected) as info:
        convert.image_to_rgb(msg)
    offered = str(info.value).split('one of')[1]
    assert 'rgb8' in offered and 'mono16' in offered and '32FC' not in offered
