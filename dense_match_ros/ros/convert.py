"""sensor_msgs <-> numpy without cv_bridge (which has no pip wheel).

Every function here reads messages by field name only (``height``, ``width``, ``encoding``,
``step``, ``data``, ``k``, ``p`` ...), so the same code decodes rclpy messages in the node and
``rosbags`` messages in the offline replay. Decoding failures raise :class:`FrameRejected`
whose ``reason`` is a short stable code (used to throttle warnings per cause) and whose text
says exactly what was wrong with the message, because a robot operator reading the log has
no other way to find out which camera driver setting is off. The pipeline raises the same
exception for frames it cannot match, so every consumer handles one type.

Only :func:`make_image_msg` and :func:`stamp_msg` need the ROS message classes; they import
them lazily so that this module stays importable without rclpy.
"""
from __future__ import annotations

import array
import sys

import cv2
import numpy as np

from dense_match_ros.core.geometry.camera import CameraIntrinsics

# encoding -> (channels, dtype). Input colour encodings and the float outputs we publish.
ENCODINGS: dict[str, tuple[int, np.dtype]] = {
    'rgb8': (3, np.dtype(np.uint8)),
    'bgr8': (3, np.dtype(np.uint8)),
    'rgba8': (4, np.dtype(np.uint8)),
    'bgra8': (4, np.dtype(np.uint8)),
    'mono8': (1, np.dtype(np.uint8)),
    'mono16': (1, np.dtype(np.uint16)),
    '32FC1': (1, np.dtype(np.float32)),
    '32FC2': (2, np.dtype(np.float32)),
}
# Encodings a camera image may arrive in (the float ones are outputs, not pictures).
COLOUR_ENCODINGS = ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16')
_NATIVE_BIG_ENDIAN = sys.byteorder == 'big'


class FrameRejected(ValueError):
    """An input (image message, camera_info, decoded frame) is refused.

    ``reason`` is a stable short code (warnings are throttled per code, replay reports count
    per code); the text says what was wrong with this particular input.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time (rclpy or rosbags) -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _buffer(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    if isinstance(data, (bytes, bytearray, memoryview, array.array)):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8).reshape(-1)


def image_to_array(msg, max_pixels: int = 0) -> np.ndarray:
    """sensor_msgs/Image -> array (H, W) or (H, W, C) in the message's own dtype and channels.

    Rows padded to ``step`` are cut, big-endian multi-byte data is swapped to native. With
    ``max_pixels`` > 0 an image larger than that is refused *before* its data is touched,
    so a runaway driver cannot make the node allocate gigabytes.
    """
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise FrameRejected('unknown_encoding',
                             f'unknown image encoding {encoding!r}; supported: '
                             f'{", ".join(ENCODINGS)}')
    channels, dtype = ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise FrameRejected('empty_image', f'image has no pixels: {width}x{height}')
    if max_pixels > 0 and height * width > max_pixels:
        raise FrameRejected('image_too_large',
                             f'image {width}x{height} ({height * width} pixels) exceeds '
                             f'max_image_pixels={max_pixels}')
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise FrameRejected('bad_step', f'step {step} is smaller than width*channels*bytes '
                                         f'= {width}*{channels}*{dtype.itemsize} = {row_bytes} '
                                         f'for {encoding}')
    buf = _buffer(msg.data)
    if buf.size != step * height:
        raise FrameRejected('bad_data_size', f'step*height != len(data): {step}*{height} = '
                                              f'{step * height} but data has {buf.size} bytes')
    rows = buf.reshape(height, step)[:, :row_bytes]
    big = bool(msg.is_bigendian)
    pixels = np.ascontiguousarray(rows).view(dtype.newbyteorder('>' if big else '<'))
    pixels = pixels.astype(dtype, copy=False)  # native byte order
    shape = (height, width) if channels == 1 else (height, width, channels)
    return pixels.reshape(shape).copy()


def to_rgb8(pixels: np.ndarray, encoding: str, mono16_max: float = 65535.0) -> np.ndarray:
    """An array in one of :data:`COLOUR_ENCODINGS` -> RGB uint8 (H, W, 3).

    mono16 is mapped linearly with ``mono16_max`` -> 255 (not per-frame min/max: a
    brightness normalisation that changes from frame to frame would show up as flow).
    """
    if encoding == 'rgb8':
        return pixels
    if encoding == 'bgr8':
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    if encoding == 'rgba8':
        return cv2.cvtColor(pixels, cv2.COLOR_RGBA2RGB)
    if encoding == 'bgra8':
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGB)
    if encoding in ('mono8', 'mono16'):
        if encoding == 'mono16':
            scale = 255.0 / max(float(mono16_max), 1.0)
            pixels = np.clip(pixels.astype(np.float32) * scale + 0.5, 0, 255).astype(np.uint8)
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    raise FrameRejected('unsupported_encoding',
                         f'encoding {encoding!r} is not a camera image; expected one of '
                         f'{", ".join(COLOUR_ENCODINGS)}')


def image_to_rgb(msg, max_pixels: int = 0, mono16_max: float = 65535.0) -> np.ndarray:
    """sensor_msgs/Image in any colour encoding -> RGB uint8 (H, W, 3)."""
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        # Named here, not in image_to_array, whose list includes the float encodings we
        # publish (and which are refused as pictures below, 'unsupported_encoding').
        raise FrameRejected('unknown_encoding',
                            f'unknown image encoding {encoding!r}; camera images must be one '
                            f'of {", ".join(COLOUR_ENCODINGS)}')
    pixels = image_to_array(msg, max_pixels=max_pixels)
    return to_rgb8(pixels, str(msg.encoding), mono16_max)


def decode_image(msg, compressed: bool, max_pixels: int = 0,
                 mono16_max: float = 65535.0) -> np.ndarray:
    """An Image (or, with ``compressed``, a CompressedImage) message -> RGB uint8 (H, W, 3)."""
    decode = compressed_to_rgb if compressed else image_to_rgb
    return decode(msg, max_pixels=max_pixels, mono16_max=mono16_max)


def compressed_to_rgb(msg, max_pixels: int = 0, mono16_max: float = 65535.0) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg or png, as image_transport writes it) -> RGB uint8.

    image_transport compresses colour images as BGR, so the decoded channel order is taken
    as BGR whatever the ``format`` string says the raw image was.
    """
    fmt = str(msg.format).lower()
    if 'jpeg' not in fmt and 'jpg' not in fmt and 'png' not in fmt:
        raise FrameRejected('unknown_format',
                             f'unknown compressed format {msg.format!r}; supported: jpeg, png')
    buf = _buffer(msg.data)
    if buf.size == 0:
        raise FrameRejected('empty_image', 'compressed image has no data')
    if max_pixels > 0:
        # Peek at the header dimensions before decoding a possibly huge image.
        size = _compressed_size(buf)
        if size is not None and size[0] * size[1] > max_pixels:
            raise FrameRejected('image_too_large',
                                 f'image {size[0]}x{size[1]} ({size[0] * size[1]} pixels) '
                                 f'exceeds max_image_pixels={max_pixels}')
    decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise FrameRejected('decode_failed', f'could not decode {msg.format!r} data '
                                              f'({buf.size} bytes)')
    if decoded.ndim == 2:
        return to_rgb8(decoded, 'mono16' if decoded.dtype == np.uint16 else 'mono8', mono16_max)
    if decoded.dtype == np.uint16:
        decoded = (decoded >> 8).astype(np.uint8)
    return to_rgb8(decoded, 'bgra8' if decoded.shape[2] == 4 else 'bgr8')


def _compressed_size(buf: np.ndarray) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG SOF marker; None when not found."""
    data = buf.tobytes()[:65536]
    if data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) >= 24:
        return int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
    if data[:2] == b'\xff\xd8':
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            length = int.from_bytes(data[i + 2:i + 4], 'big')
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                          0xCE, 0xCF):
                h = int.from_bytes(data[i + 5:i + 7], 'big')
                w = int.from_bytes(data[i + 7:i + 9], 'big')
                return w, h
            i += 2 + length
    return None


def camera_info_to_intrinsics(msg, rectified: bool = False) -> CameraIntrinsics:
    """sensor_msgs/CameraInfo -> :class:`CameraIntrinsics`.

    ``rectified``: the images are already rectified (e.g. ``image_rect``), so the camera
    matrix is the left 3x3 of P and there is no distortion. An all-zero or otherwise
    unusable matrix (what an uncalibrated driver publishes) is refused: a pose from it would
    be garbage with a valid-looking flag.
    """
    if rectified:
        P = np.asarray(msg.p, dtype=np.float64).reshape(-1)
        if P.size != 12:
            raise FrameRejected('invalid_camera_info', f'P has {P.size} values, expected 12')
        K = P.reshape(3, 4)[:, :3].copy()
        D = np.zeros(0)
        source = 'P'
    else:
        K = np.asarray(msg.k, dtype=np.float64).reshape(-1)
        if K.size != 9:
            raise FrameRejected('invalid_camera_info', f'K has {K.size} values, expected 9')
        K = K.reshape(3, 3)
        D = np.asarray(msg.d, dtype=np.float64).reshape(-1)
        source = 'K'
    if not np.all(np.isfinite(K)) or not np.all(np.isfinite(D)):
        raise FrameRejected('invalid_camera_info', f'camera_info {source} or D is not finite')
    if not np.any(K):
        raise FrameRejected('zero_camera_info', f'camera_info {source} is all zeros '
                                                 f'(uncalibrated camera?)')
    if K[0, 0] <= 0 or K[1, 1] <= 0 or abs(K[2, 2] - 1.0) > 1e-6 or np.any(K[2, :2] != 0):
        raise FrameRejected('invalid_camera_info',
                             f'camera_info {source} is not a pinhole matrix: fx={K[0, 0]}, '
                             f'fy={K[1, 1]}, last row={K[2].tolist()}')
    width, height = int(msg.width), int(msg.height)
    size = (width, height) if width > 0 and height > 0 else None
    return CameraIntrinsics(K, D, size, str(msg.distortion_model))


def image_fields(pixels: np.ndarray, encoding: str) -> dict:
    """The sensor_msgs/Image fields (without header) for an array, little-endian, unpadded.

    Returned as a dict so that either rclpy's or rosbags' Image class can be built from it.
    """
    channels, dtype = ENCODINGS[encoding]
    pixels = np.ascontiguousarray(pixels, dtype=dtype.newbyteorder('<'))
    height, width = pixels.shape[:2]
    got = 1 if pixels.ndim == 2 else pixels.shape[2]
    if got != channels:
        raise ValueError(f'{encoding} needs {channels} channels, array has {got}')
    return {'height': int(height), 'width': int(width), 'encoding': encoding,
            'is_bigendian': 0, 'step': int(width * channels * dtype.itemsize),
            'data': pixels.reshape(-1).view(np.uint8)}


def stamp_msg(stamp_ns: int):
    """Integer nanoseconds -> builtin_interfaces/Time (rclpy class)."""
    from builtin_interfaces.msg import Time
    return Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))


def make_image_msg(pixels: np.ndarray, encoding: str, stamp_ns: int, frame_id: str):
    """numpy array -> rclpy sensor_msgs/Image with header."""
    from sensor_msgs.msg import Image
    fields = image_fields(pixels, encoding)
    data = array.array('B')
    data.frombytes(fields.pop('data').tobytes())
    msg = Image(**fields)
    msg.data = data  # array.array('B') skips rclpy's per-element check
    msg.header.stamp = stamp_msg(stamp_ns)
    msg.header.frame_id = frame_id
    return msg
