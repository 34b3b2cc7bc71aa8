"""What the soak plays to the node: a moving camera and the node's bad-input catalogue as
messages (the same inputs the node's robustness tests send, one after another in one run).
"""
from __future__ import annotations

import array
import dataclasses
from typing import Callable

import cv2
import numpy as np

FRAME_ID = 'soak_camera_optical_frame'
NS = 1_000_000_000


# ------------------------------------------------------------------------------ input


def camera_frames(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB frames of a textured scene seen by a camera that pans and turns slowly.

    Cheap to make (an affine warp each), textured at every scale so every method finds
    matches, and a loop: the last frame leads back to the first without a jump.
    """
    w, h = size
    rng = np.random.default_rng(seed)
    big = np.zeros((2 * h, 2 * w, 3), np.float32)
    for cells in (4, 8, 16, 32, 64):
        noise = rng.random((cells, cells * w // h + 1, 3), dtype=np.float32)
        big += cv2.resize(noise, (2 * w, 2 * h), interpolation=cv2.INTER_CUBIC)
    big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    frames = []
    for i in range(n):
        phase = 2 * np.pi * i / n
        centre = (w + 0.15 * w * np.cos(phase), h + 0.15 * h * np.sin(phase))
        m = cv2.getRotationMatrix2D(centre, 3.0 * np.sin(phase), 1.0)
        m[:, 2] += (w / 2 - centre[0], h / 2 - centre[1])
        frames.append(cv2.warpAffine(big, m, (w, h), flags=cv2.INTER_LINEAR))
    return frames


def image_msg(pixels: np.ndarray, stamp_ns: int, encoding: str = 'rgb8'):
    from sensor_msgs.msg import Image
    from dense_match_ros.ros.convert import make_image_msg
    if pixels.ndim == 2:
        msg = Image(height=pixels.shape[0], width=pixels.shape[1], encoding=encoding,
                    step=pixels.shape[1], is_bigendian=0)
        msg.data = array.array('B', pixels.tobytes())
        msg.header.frame_id = FRAME_ID
        set_stamp(msg, stamp_ns)
        return msg
    return make_image_msg(pixels, encoding, stamp_ns, FRAME_ID)


def info_msg(size: tuple[int, int], stamp_ns: int, zero: bool = False):
    from sensor_msgs.msg import CameraInfo
    w, h = size
    msg = CameraInfo(width=w, height=h, distortion_model='plumb_bob', d=[0.0] * 5)
    f = 0.0 if zero else 0.8 * w
    msg.k = [f, 0.0, (w - 1) / 2.0 if not zero else 0.0, 0.0, f,
             (h - 1) / 2.0 if not zero else 0.0, 0.0, 0.0, 0.0 if zero else 1.0]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [msg.k[0], 0.0, msg.k[2], 0.0, 0.0, msg.k[4], msg.k[5], 0.0, 0.0, 0.0, msg.k[8], 0.0]
    msg.header.frame_id = FRAME_ID
    set_stamp(msg, stamp_ns)
    return msg


def set_stamp(msg, stamp_ns: int) -> None:
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), NS)


# ------------------------------------------------------------------------------ bad inputs


@dataclasses.dataclass(frozen=True)
class BadInput:
    """One entry of the node's bad-input catalogue, as messages to send.

    ``make(frame, size, stamp_ns, last_stamp_ns)`` returns the (topic, message) list to
    publish; ``reason`` is the tag the node's warning must carry (``[reason]`` in its log).
    """

    reason: str
    make: Callable[[np.ndarray, tuple[int, int], int, int], list[tuple[str, object]]]
    warmup_only: bool = False
    """Sent during the warm-up only: its memory cost is a one-off, not a leak (see below)."""


def _unknown_encoding(frame, size, stamp, last):
    msg = image_msg(frame, stamp)
    msg.encoding = 'yuv422_yuy2'
    msg.step = size[0] * 2
    msg.data = array.array('B', bytes(size[0] * size[1] * 2))
    return [('image', msg)]


def _bad_data_size(frame, size, stamp, last):
    msg = image_msg(frame, stamp)
    msg.data = msg.data[: len(msg.data) // 2]
    return [('image', msg)]


def _size_changed(frame, size, stamp, last):
    half = cv2.resize(frame, (size[0] // 2, size[1] // 2), interpolation=cv2.INTER_AREA)
    return [('image', image_msg(half, stamp))]


def _zero_camera_info(frame, size, stamp, last):
    return [('info', info_msg(size, stamp, zero=True)), ('image', image_msg(frame, stamp))]


def _stamp_backwards(frame, size, stamp, last):
    return [('image', image_msg(frame, last - NS))]


def _duplicate_stamp(frame, size, stamp, last):
    return [('image', image_msg(frame, last))]


def _tiny(frame, size, stamp, last):
    return [('image', image_msg(np.zeros((1, 1, 3), np.uint8), stamp))]


def _huge(frame, size, stamp, last):
    return [('image', image_msg(np.zeros((8000, 8000), np.uint8), stamp, 'mono8'))]


BAD_INPUTS = (
    # Warm-up only. A 64 MB sample leaves ~60 MB resident in the node on some of its first
    # sends (measured: +60 MB at 2 of 4 sends 40 s apart, then flat; the same with input
    # depth 1 and with glibc's mmap threshold fixed, so it is held below Python, where the
    # DDS reader reassembles fragments), which would read as a leak in the RSS trend.
    BadInput('image_too_large', _huge, warmup_only=True),
    BadInput('unknown_encoding', _unknown_encoding),
    BadInput('bad_data_size', _bad_data_size),
    BadInput('size_changed', _size_changed),
    BadInput('zero_camera_info', _zero_camera_info),
    BadInput('stamp_backwards', _stamp_backwards),
    BadInput('duplicate_stamp', _duplicate_stamp),
    BadInput('image_too_small', _tiny),
)
