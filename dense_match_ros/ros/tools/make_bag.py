"""``dense-match-make-bag``: a rosbag2 of camera images + camera_info from a folder or a synthetic scene.

Input folders come in two layouts:

* TUM RGB-D: ``rgb.txt`` lists ``timestamp path`` per image; those stamps are used and
  entries whose file is absent are skipped (the shared TUM subset keeps 16 of the
  sequence's images but the full rgb.txt), and ``intrinsics.txt`` is picked up if present;
* numbered files (``000.png``, ``frame_12.jpg`` ...): sorted by the number in the name,
  stamped at ``--rate`` from ``--start``.

Intrinsics come from ``--intrinsics`` (TUM-style ``fx fy cx cy [w h]`` text, or a YAML: ROS
camera_info calibration or flat ``fx/fy/cx/cy/width/height/D`` keys) or from flags.

With no folder, a synthetic sequence is rendered: a camera moving through a textured box
room with an occluding panel (real depth structure, so the essential matrix is
well-conditioned), with its exact camera-to-world trajectory written in TUM format beside
the bag. The demo and the tests use it where the real data is absent.

Every frame's camera_info is written just before its image with the same stamp, the way a
camera driver publishes them, so a reader taking "the latest camera_info" never misses one.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import yaml

from dense_match_ros.ros.tools import bag_io
from dense_match_ros.ros.tools.trajectory import write_tum

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.ppm', '.pgm', '.bmp', '.tif', '.tiff')
DEFAULT_IMAGE_TOPIC = '/camera/image'
DEFAULT_INFO_TOPIC = '/camera/camera_info'
DEFAULT_FRAME_ID = 'camera_optical_frame'
NS = 1_000_000_000


@dataclasses.dataclass
class Intrinsics:
    """Pinhole camera as written into CameraInfo; size may be unknown until an image is read."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int = 0
    height: int = 0
    D: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)
    distortion_model: str = 'plumb_bob'

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], dtype=np.float64)


@dataclasses.dataclass
class FrameSource:
    """One image to write: its stamp and a way to get RGB/mono pixels (loaded lazily)."""

    stamp_ns: int
    path: Path | None = None
    pixels: np.ndarray | None = None

    def load(self) -> np.ndarray:
        if self.pixels is not None:
            return self.pixels
        img = cv2.imread(str(self.path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ValueError(f'cannot read image {self.path}')
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
            if img.dtype == np.uint16:
                img = (img >> 8).astype(np.uint8)
        return img


# --------------------------------------------------------------------------- intrinsics


def read_intrinsics(path: str | Path) -> Intrinsics:
    """Intrinsics from a TUM-style text file or a YAML file (see module docstring)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in ('.yaml', '.yml'):
        return _intrinsics_from_yaml(yaml.safe_load(text), path)
    for line in text.splitlines():
        line = line.split('#', 1)[0].strip()
        if not line:
            continue
        values = [float(v) for v in line.replace(',', ' ').split()]
        if len(values) not in (4, 6):
            raise ValueError(f'{path}: expected "fx fy cx cy [width height]", got {line!r}')
        w, h = (int(values[4]), int(values[5])) if len(values) == 6 else (0, 0)
        return Intrinsics(*values[:4], width=w, height=h)
    raise ValueError(f'{path}: no intrinsics line')


def _intrinsics_from_yaml(data: dict, path: Path) -> Intrinsics:
    if not isinstance(data, dict):
        raise ValueError(f'{path}: not a YAML mapping')
    if 'camera_matrix' in data:  # camera_calibration_parsers layout
        K = np.asarray(data['camera_matrix']['data'], dtype=np.float64).reshape(3, 3)
        D = tuple(float(v) for v in (data.get('distortion_coefficients') or {}).get('data', []))
        return Intrinsics(K[0, 0], K[1, 1], K[0, 2], K[1, 2],
                          int(data.get('image_width', 0)), int(data.get('image_height', 0)),
                          D or (0.0,) * 5, str(data.get('distortion_model', 'plumb_bob')))
    try:
        D = tuple(float(v) for v in data.get('D', data.get('d', (0.0,) * 5)))
        return Intrinsics(float(data['fx']), float(data['fy']), float(data['cx']), float(data['cy']),
                          int(data.get('width', 0)), int(data.get('height', 0)), D,
                          str(data.get('distortion_model', 'plumb_bob')))
    except KeyError as err:
        raise ValueError(f'{path}: missing key {err} (need fx, fy, cx, cy or camera_matrix)') from None


def camera_info_msg(intr: Intrinsics, stamp_ns: int, frame_id: str):
    """rclpy sensor_msgs/CameraInfo for an unrectified-but-undistorted pinhole camera."""
    from sensor_msgs.msg import CameraInfo
    from dense_match_ros.ros.convert import stamp_msg
    msg = CameraInfo()
    msg.header.stamp = stamp_msg(stamp_ns)
    msg.header.frame_id = frame_id
    msg.width, msg.height = int(intr.width), int(intr.height)
    msg.distortion_model = intr.distortion_model
    msg.d = [float(v) for v in intr.D]
    msg.k = intr.K.reshape(-1).tolist()
    msg.r = np.eye(3).reshape(-1).tolist()
    P = np.zeros((3, 4))
    P[:, :3] = intr.K
    msg.p = P.reshape(-1).tolist()
    return msg


# --------------------------------------------------------------------------- folders


def read_rgb_txt(folder: Path) -> tuple[list[FrameSource], int]:
    """TUM rgb.txt -> frames whose files exist, and the number of listed-but-missing files."""
    frames, missing = [], 0
    for line in (folder / 'rgb.txt').read_text().splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        fields = line.split()
        if len(fields) < 2:
            raise ValueError(f'{folder / "rgb.txt"}: expected "timestamp path", got {line!r}')
        path = folder / fields[1]
        if not path.is_file():
            missing += 1
            continue
        frames.append(FrameSource(_seconds_to_ns(fields[0]), path))
    frames.sort(key=lambda f: f.stamp_ns)
    return frames, missing


def _seconds_to_ns(text: str) -> int:
    """Decimal seconds -> ns without float rounding (TUM stamps have 6 decimals on 1e9 s)."""
    whole, _, frac = text.strip().partition('.')
    return int(whole) * NS + int((frac + '000000000')[:9])


def numbered_images(folder: Path) -> list[Path]:
    """Image files of a folder in the order of the (last) number in their names."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]

    def key(p: Path):
        numbers = re.findall(r'\d+', p.stem)
        return (int(numbers[-1]) if numbers else -1, p.name)
    return sorted(files, key=key)


def folder_frames(folder: Path, rate: float, start: float) -> tuple[list[FrameSource], str]:
    """Frames of either layout, and a one-line description of what was found."""
    if (folder / 'rgb.txt').is_file():
        frames, missing = read_rgb_txt(folder)
        note = f'TUM layout: {len(frames)} images from rgb.txt'
        if missing:
            note += f' ({missing} listed files absent, skipped)'
        return frames, note
    paths = numbered_images(folder)
    start_ns = int(round(start * NS))
    frames = [FrameSource(start_ns + int(round(i * NS / rate)), p) for i, p in enumerate(paths)]
    return frames, f'numbered files: {len(frames)} images at {rate:g} Hz'


# --------------------------------------------------------------------------- synthetic


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Tileable multi-scale noise (float32 RGB in [0, 1]) for the room's walls.

    The finest octave has cells of size/64 texels (2.5 cm at the renderer's density), which
    the supersampled renderer resolves without aliasing at the usual image sizes.
    """
    acc = np.zeros((size, size, 3), np.float32)
    for cells, weight in ((4, 1.0), (8, 0.9), (16, 0.8), (32, 0.7), (64, 0.6)):
        coarse = rng.random((cells, cells, 3), dtype=np.float32)
        tiled = np.tile(coarse, (3, 3, 1))  # resize a 3x3 tiling and crop the middle: seamless
        big = cv2.resize(tiled, (3 * size, 3 * size), interpolation=cv2.INTER_CUBIC)
        acc += weight * big[size:2 * size, size:2 * size]
    acc -= acc.min()
    return acc / max(float(acc.max()), 1e-6)


@dataclasses.dataclass
class _Plane:
    normal: tuple[float, float, float]
    offset: float  # normal . X = offset
    axes: tuple[int, int]  # world axes used as texture coordinates
    tint: tuple[float, float, float]
    bounds: tuple[float, float, float, float] | None = None  # (a0, a1, b0, b1) in texture coords


_ROOM = (
    _Plane((0, 0, 1), 4.5, (0, 1), (1.0, 0.9, 0.8)),           # back wall
    _Plane((0, 1, 0), 1.2, (0, 2), (0.7, 0.8, 1.0)),           # floor (y down)
    _Plane((0, 1, 0), -1.5, (0, 2), (0.9, 1.0, 0.9)),          # ceiling
    _Plane((1, 0, 0), -2.2, (2, 1), (1.0, 0.8, 0.9)),          # left wall
    _Plane((1, 0, 0), 2.2, (2, 1), (0.8, 1.0, 1.0)),           # right wall
    _Plane((0, 0, 1), 2.2, (0, 1), (1.0, 1.0, 0.7), (-1.0, 0.1, -0.6, 1.2)),  # panel in front
)


def synthetic_poses(n: int, rate: float, speed: float = 1.5) -> np.ndarray:
    """T_w_c (n, 4, 4) of a camera moving sideways and forward while turning slightly.

    World = the first camera's optical frame. ``speed`` (m/s) sets the baseline between
    frames: at 30 Hz, 1.5 m/s is 5 cm per frame, about 1 degree of parallax on the walls
    (enough for the pose estimator's degenerate-motion check at consecutive frames).
    """
    from scipy.spatial.transform import Rotation
    poses = np.zeros((n, 4, 4))
    for i in range(n):
        t = i / rate
        phase = 2 * np.pi * 0.5 * t
        # Mostly sideways (strong parallax), some forward, a little wobble: a hand-held pan.
        position = speed * np.array([0.8 * t, 0.1 * t + 0.02 * np.sin(phase), 0.55 * t])
        angles = np.radians([1.5 * np.sin(phase), 3.0 * np.sin(0.7 * phase), 0.8 * t])
        poses[i] = np.eye(4)
        poses[i, :3, :3] = Rotation.from_euler('xyz', angles).as_matrix()
        poses[i, :3, 3] = position
    return poses


def render_view(T_w_c: np.ndarray, K: np.ndarray, size: tuple[int, int],
                texture: np.ndarray, texels_per_metre: float = 160.0, supersample: int = 3,
                return_depth: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image of the synthetic room seen from camera pose T_w_c (ray casting).

    Rendered at ``supersample`` times the resolution and area-averaged, like a real
    sensor integrating over its pixels: point-sampled textures alias, and aliased views of
    one wall disagree pixel by pixel, which no flow can reproduce. With ``return_depth``
    also the z-depth (metres, HxW) at the pixel centres, from which the exact flow between
    two views follows (the tests check the renderer with it).
    """
    s = max(1, int(supersample))
    w, h = size
    K_fine = K.astype(np.float64).copy()
    K_fine[:2, :2] *= s
    K_fine[:2, 2] = (K[:2, 2] + 0.5) * s - 0.5  # pixel centres, as grid.rescale_points
    colour, _ = _cast(T_w_c, K_fine, (w * s, h * s), texture, texels_per_metre)
    if s > 1:
        colour = cv2.resize(colour, (w, h), interpolation=cv2.INTER_AREA)
    image = np.clip(colour * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if return_depth:
        return image, _cast(T_w_c, K, size, texture, texels_per_metre)[1]
    return image


def _cast(T_w_c: np.ndarray, K: np.ndarray, size: tuple[int, int], texture: np.ndarray,
          texels_per_metre: float) -> tuple[np.ndarray, np.ndarray]:
    """(float32 RGB in [0, 1], z-depth) by casting one ray through each pixel centre."""
    w, h = size
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    # Camera rays with unit z, so the ray parameter of a hit is its z-depth.
    rays = np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(K).T @ T_w_c[:3, :3].T
    origin = T_w_c[:3, 3]
    best = np.full((h, w), np.inf)
    colour = np.zeros((h, w, 3), np.float32)
    tex_size = texture.shape[0]
    for k, plane in enumerate(_ROOM):
        n = np.asarray(plane.normal, dtype=np.float64)
        denom = rays @ n
        with np.errstate(divide='ignore', invalid='ignore'):
            depth = (plane.offset - origin @ n) / denom
        hit = origin + depth[..., None] * rays
        a, b = hit[..., plane.axes[0]], hit[..., plane.axes[1]]
        ok = np.isfinite(depth) & (depth > 1e-3) & (depth < best)
        if plane.bounds is not None:
            a0, a1, b0, b1 = plane.bounds
            ok &= (a >= a0) & (a <= a1) & (b >= b0) & (b <= b1)
        if not ok.any():
            continue
        # Each plane reads a different part of the tiled texture so that walls differ.
        mx = ((a * texels_per_metre + 97.0 * k) % tex_size).astype(np.float32)
        my = ((b * texels_per_metre + 41.0 * k) % tex_size).astype(np.float32)
        sample = cv2.remap(texture, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        shade = np.float32(1.0 / (1.0 + 0.05 * k))
        colour[ok] = sample[ok] * np.asarray(plane.tint, np.float32) * shade
        best[ok] = depth[ok]
    return colour, best


def synthetic_intrinsics(size: tuple[int, int]) -> Intrinsics:
    w, h = size
    return Intrinsics(0.8 * w, 0.8 * w, (w - 1) / 2.0, (h - 1) / 2.0, w, h)


def synthetic_sequence(n: int = 16, size: tuple[int, int] = (320, 240), rate: float = 30.0,
                       start: float = 1.0, speed: float = 1.5, seed: int = 0
                       ) -> tuple[list[FrameSource], Intrinsics, np.ndarray]:
    """(frames, intrinsics, T_w_c poses) of a rendered moving-camera sequence."""
    if n < 1:
        raise ValueError('a synthetic sequence needs at least one frame')
    rng = np.random.default_rng(seed)
    texture = _texture(256, rng)
    intr = synthetic_intrinsics(size)
    poses = synthetic_poses(n, rate, speed)
    start_ns = int(round(start * NS))
    frames = [FrameSource(start_ns + int(round(i * NS / rate)),
                          pixels=render_view(poses[i], intr.K, size, texture))
              for i in range(n)]
    return frames, intr, poses


# --------------------------------------------------------------------------- writing


def _image_msg(pixels: np.ndarray, fmt: str, encoding: str, stamp_ns: int, frame_id: str):
    from dense_match_ros.ros.convert import make_image_msg, stamp_msg
    if pixels.ndim == 2:
        encoding = 'mono16' if pixels.dtype == np.uint16 else 'mono8'
    elif encoding == 'bgr8':
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    elif encoding == 'mono8':
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    if fmt == 'raw':
        return make_image_msg(pixels, encoding, stamp_ns, frame_id)
    from sensor_msgs.msg import CompressedImage
    # image_transport's convention: colour goes in as BGR, format names the raw encoding.
    bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR) if encoding == 'rgb8' else pixels
    ok, buf = cv2.imencode('.jpg' if fmt == 'jpeg' else '.png', bgr)
    if not ok:
        raise ValueError(f'could not encode a {pixels.shape} image as {fmt}')
    msg = CompressedImage()
    msg.header.stamp = stamp_msg(stamp_ns)
    msg.header.frame_id = frame_id
    msg.format = f'{encoding}; {fmt} compressed {"bgr8" if encoding == "rgb8" else encoding}'
    msg.data = buf.tobytes()
    return msg


def write_bag(out: str | Path, frames: Sequence[FrameSource], intrinsics: Intrinsics | None, *,
              image_topic: str = DEFAULT_IMAGE_TOPIC, camera_info_topic: str = DEFAULT_INFO_TOPIC,
              frame_id: str = DEFAULT_FRAME_ID, fmt: str = 'raw', encoding: str = 'rgb8',
              storage: str = 'sqlite3', overwrite: bool = False) -> dict[str, int]:
    """Write frames (+ camera_info when intrinsics are given) to a new bag; counts per topic.

    The intrinsics' size is checked against every image: a calibration for another
    resolution would silently give wrong poses downstream.
    """
    if fmt not in ('raw', 'jpeg', 'png'):
        raise ValueError(f'format must be raw, jpeg or png, got {fmt!r}')
    if not frames:
        raise ValueError('no images to write')
    with bag_io.BagWriter(out, storage=storage, overwrite=overwrite) as writer:
        for frame in frames:
            pixels = frame.load()
            h, w = pixels.shape[:2]
            if intrinsics is not None:
                if intrinsics.width == 0 or intrinsics.height == 0:
                    intrinsics = dataclasses.replace(intrinsics, width=w, height=h)
                if (intrinsics.width, intrinsics.height) != (w, h):
                    raise ValueError(f'intrinsics are for {intrinsics.width}x{intrinsics.height} '
                                     f'but {frame.path or "a frame"} is {w}x{h}')
                writer.write(camera_info_topic, camera_info_msg(intrinsics, frame.stamp_ns, frame_id),
                             frame.stamp_ns)
            writer.write(image_topic, _image_msg(pixels, fmt, encoding, frame.stamp_ns, frame_id),
                         frame.stamp_ns)
        return dict(writer.counts)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='dense-match-make-bag',
        description='Build a rosbag2 (images + camera_info) from an image folder (TUM layout '
                    'with rgb.txt, or numbered files), or render a synthetic moving-camera '
                    'sequence with its ground-truth trajectory when no folder is given.')
    p.add_argument('folder', nargs='?', type=Path, help='image folder (omit for a synthetic sequence)')
    p.add_argument('-o', '--out', type=Path, required=True, help='output bag directory')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output bag')
    p.add_argument('--storage', choices=sorted(bag_io.STORAGES), default='sqlite3')
    p.add_argument('--image-topic', default=DEFAULT_IMAGE_TOPIC)
    p.add_argument('--camera-info-topic', default=DEFAULT_INFO_TOPIC)
    p.add_argument('--frame-id', default=DEFAULT_FRAME_ID)
    p.add_argument('--format', choices=('raw', 'jpeg', 'png'), default='raw',
                   help='raw sensor_msgs/Image, or sensor_msgs/CompressedImage (the topic is used as given)')
    p.add_argument('--encoding', choices=('rgb8', 'bgr8', 'mono8'), default='rgb8',
                   help='encoding of colour images (grey files are always mono8/mono16)')
    p.add_argument('--rate', type=float, default=30.0,
                   help='Hz, for numbered files and synthetic sequences (TUM stamps come from rgb.txt)')
    p.add_argument('--start', type=float, default=1.0, help='first stamp in seconds (numbered/synthetic)')
    p.add_argument('--max-frames', type=int, default=0, help='keep only the first N images (0: all)')
    p.add_argument('--stride', type=int, default=1, help='keep every N-th image')
    intr = p.add_argument_group('intrinsics (default: FOLDER/intrinsics.txt if present)')
    intr.add_argument('--intrinsics', type=Path, help='TUM-style "fx fy cx cy [w h]" text, or YAML')
    for name in ('fx', 'fy', 'cx', 'cy'):
        intr.add_argument(f'--{name}', type=float)
    intr.add_argument('--no-camera-info', action='store_true', help='write images only')
    syn = p.add_argument_group('synthetic sequence (no folder)')
    syn.add_argument('--frames', type=int, default=16)
    syn.add_argument('--size', default='320x240', help='WIDTHxHEIGHT')
    syn.add_argument('--speed', type=float, default=1.5, help='camera speed in m/s')
    syn.add_argument('--seed', type=int, default=0)
    syn.add_argument('--groundtruth-out', type=Path,
                     help='TUM trajectory file to write (default: OUT/groundtruth.txt)')
    return p


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r'\s*(\d+)\s*[xX]\s*(\d+)\s*', text)
    if not m or int(m.group(1)) < 2 or int(m.group(2)) < 2:
        raise ValueError(f'size must be WIDTHxHEIGHT (at least 2x2), got {text!r}')
    return int(m.group(1)), int(m.group(2))


def _flag_intrinsics(args) -> Intrinsics | None:
    given = [getattr(args, n) for n in ('fx', 'fy', 'cx', 'cy')]
    if all(v is None for v in given):
        return None
    if any(v is None for v in given):
        raise ValueError('give all of --fx --fy --cx --cy')
    return Intrinsics(*given)


def build(args) -> tuple[dict[str, int], str, Path | None]:
    """Run the CLI's job; (counts, description, ground-truth path or None)."""
    gt_path = None
    if args.folder is None:
        frames, intr, poses = synthetic_sequence(args.frames, parse_size(args.size), args.rate,
                                                 args.start, args.speed, args.seed)
        note = f'synthetic: {len(frames)} frames {args.size} at {args.rate:g} Hz'
    else:
        if not args.folder.is_dir():
            raise ValueError(f'{args.folder} is not a folder')
        frames, note = folder_frames(args.folder, args.rate, args.start)
        intr = _flag_intrinsics(args)
        if args.intrinsics is not None:
            intr = read_intrinsics(args.intrinsics)
        elif intr is None and (args.folder / 'intrinsics.txt').is_file():
            intr = read_intrinsics(args.folder / 'intrinsics.txt')
        poses = None
        if intr is None and not args.no_camera_info:
            raise ValueError('no intrinsics: give --intrinsics FILE, --fx/--fy/--cx/--cy, '
                             'or --no-camera-info')
    if args.no_camera_info:
        intr = None
    keep = list(range(0, len(frames), max(1, args.stride)))
    if args.max_frames > 0:
        keep = keep[:args.max_frames]
    frames = [frames[i] for i in keep]
    counts = write_bag(args.out, frames, intr, image_topic=args.image_topic,
                       camera_info_topic=args.camera_info_topic, frame_id=args.frame_id,
                       fmt=args.format, encoding=args.encoding, storage=args.storage,
                       overwrite=args.overwrite)
    if poses is not None:
        gt_path = args.groundtruth_out or (args.out / 'groundtruth.txt')
        write_tum(gt_path, np.array([f.stamp_ns / NS for f in frames]), poses[keep])
    return counts, note, gt_path


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        counts, note, gt_path = build(args)
    except (ValueError, FileExistsError, OSError) as err:
        print(f'dense-match-make-bag: error: {err}', file=sys.stderr)
        return 2
    print(f'{note}')
    print(f'wrote {args.out} ({args.storage}): ' + ', '.join(f'{t}: {n}' for t, n in counts.items()))
    if gt_path is not None:
        print(f'ground truth (TUM, camera-to-world): {gt_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
