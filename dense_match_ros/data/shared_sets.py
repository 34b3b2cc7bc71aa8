"""Loaders for the real evaluation data in ``../shared/data`` (see its README.md).

The data is never part of the package: every loader takes a root folder (default
:func:`data_root`) and raises :class:`FileNotFoundError` when its set is absent, so
callers can skip that set with a message instead of crashing.

Two kinds of pairs come out, both in the package's conventions (core/geometry/grid.py):

* :class:`FlowPair`: ground-truth flow on the source grid (Sintel, HPatches);
* :class:`PosePair`: intrinsics and the relative pose ``T_target_source`` (4x4, maps
  points from the source camera frame to the target camera frame), optionally depth
  (TUM RGB-D, Middlebury multi-view).

Images are RGB uint8, the form :meth:`Matcher.match` takes.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import cv2
import numpy as np

from dense_match_ros import paths
from dense_match_ros.core.geometry.gt_flow import flow_from_homography, scale_homography

FLO_MAGIC = 202021.25
"""First float32 of a Middlebury .flo file; reading it back also checks byte order."""

SINTEL_SIZE = (1024, 436)
HPATCHES_SIZE = (845, 1126)
HPATCHES_SMALL_SIZE = (240, 240)
TUM_FRAME_OFFSETS = (5, 10, 15)
MIDDLEBURY_OBJECTS = ('templeSparseRing', 'dinoSparseRing')
MIDDLEBURY_MAX_NEIGHBOUR_DEG = 30.0
"""Consecutive Middlebury views further apart than this are not ring neighbours: some
views of the temple ring are taken from the opposite latitude, rotated 180 degrees in
the image plane, and those pairs test in-plane rotation rather than baseline."""


@dataclasses.dataclass
class FlowPair:
    """Two images and the ground-truth flow from ``source`` to ``target``."""

    name: str
    source: np.ndarray
    target: np.ndarray
    flow: np.ndarray
    """float32 HxWx2 on the source grid (pixels)."""
    valid: np.ndarray
    """bool HxW: ground truth exists here."""
    occluded: np.ndarray | None = None
    """bool HxW or None: valid ground truth whose target point is hidden in ``target``.
    Metrics are given on all valid pixels and on valid & ~occluded ('noc')."""


@dataclasses.dataclass
class PosePair:
    """Two views with calibration and the relative pose between them."""

    name: str
    source: np.ndarray
    target: np.ndarray
    K_source: np.ndarray
    K_target: np.ndarray
    T_target_source: np.ndarray
    """4x4 float64: X_target = R X_source + t."""
    depth_source: np.ndarray | None = None
    """float32 HxW metres, 0 where unknown."""
    depth_target: np.ndarray | None = None


def data_root() -> Path:
    """``$DENSE_MATCH_DATA`` if set, else ``<repository>/../shared/data``."""
    return paths.data_root()


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else data_root()


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Image file -> RGB uint8 (OpenCV reads BGR; the matchers want RGB)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f'cannot read image {path}')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _read_mask(path: Path) -> np.ndarray:
    """Sintel-style mask PNG (white = set) -> bool."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise FileNotFoundError(f'cannot read mask {path}')
    return img > 127


# --------------------------------------------------------------------------- .flo


def read_flo(path: str | os.PathLike) -> np.ndarray:
    """Middlebury .flo -> float32 HxWx2 (u, v). Raises ValueError on a bad header.

    Layout: float32 magic 202021.25, int32 width, int32 height, then W*H (u, v) float32
    pairs in row-major order, all little-endian.
    """
    with open(path, 'rb') as f:
        magic = np.fromfile(f, '<f4', 1)
        if magic.size != 1 or magic[0] != np.float32(FLO_MAGIC):
            raise ValueError(f'{path}: not a .flo file (bad magic)')
        w, h = (int(v) for v in np.fromfile(f, '<i4', 2))
        data = np.fromfile(f, '<f4', 2 * w * h)
    if w <= 0 or h <= 0 or data.size != 2 * w * h:
        raise ValueError(f'{path}: truncated .flo ({w}x{h}, {data.size} values)')
    return data.reshape(h, w, 2).astype(np.float32)


def write_flo(path: str | os.PathLike, flow: np.ndarray) -> None:
    """float HxWx2 flow -> Middlebury .flo (the inverse of :func:`read_flo`)."""
    flow = np.asarray(flow, dtype='<f4')
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f'flow must be HxWx2, got {flow.shape}')
    h, w = flow.shape[:2]
    with open(path, 'wb') as f:
        np.array([FLO_MAGIC], '<f4').tofile(f)
        np.array([w, h], '<i4').tofile(f)
        np.ascontiguousarray(flow).tofile(f)


# --------------------------------------------------------------------------- Sintel


def sintel_pairs(root: str | os.PathLike | None = None) -> list[FlowPair]:
    """Every pair under ``sintel_subset/``: frame_N -> frame_N+1 with gt/frame_N.flo.

    Valid = not marked in gt/invalid; occluded (gt/occlusions) is kept separately since
    occluded pixels have ground-truth flow but no visible match.
    """
    base = _root(root) / 'sintel_subset'
    if not base.is_dir():
        raise FileNotFoundError(f'{base} absent')
    pairs = []
    for seq in sorted(p for p in base.iterdir() if p.is_dir()):
        for flo in sorted((seq / 'gt').glob('frame_*.flo')):
            m = re.fullmatch(r'frame_(\d+)\.flo', flo.name)
            if not m:
                continue
            n = int(m.group(1))
            digits = len(m.group(1))
            src_path = seq / f'frame_{n:0{digits}d}.png'
            tgt_path = seq / f'frame_{n + 1:0{digits}d}.png'
            flow = read_flo(flo)
            invalid_path = seq / 'gt' / 'invalid' / f'{flo.stem}.png'
            occ_path = seq / 'gt' / 'occlusions' / f'{flo.stem}.png'
            invalid = (_read_mask(invalid_path) if invalid_path.exists()
                       else np.zeros(flow.shape[:2], bool))
            occluded = _read_mask(occ_path) if occ_path.exists() else None
            pairs.append(FlowPair(name=f'{seq.name}/{flo.stem}', source=read_rgb(src_path),
                                  target=read_rgb(tgt_path), flow=flow,
                                  valid=~invalid & np.all(np.isfinite(flow), axis=-1),
                                  occluded=occluded))
    if not pairs:
        raise FileNotFoundError(f'no Sintel pairs under {base}')
    return pairs


# --------------------------------------------------------------------------- HPatches


def read_homography(path: str | os.PathLike) -> np.ndarray:
    """3x3 float64 from a text file of three rows, ignoring '#' comment lines."""
    rows = [line.split() for line in Path(path).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith('#')]
    H = np.array(rows, dtype=np.float64)
    if H.shape != (3, 3):
        raise ValueError(f'{path}: expected a 3x3 matrix, got {H.shape}')
    return H


def hpatches_pair(root: str | os.PathLike | None = None,
                  size: tuple[int, int] | None = None) -> FlowPair:
    """HPatches v_machines 1 -> 2 with the flow of its homography.

    ``size`` (W, H) resizes both images (area interpolation) and re-expresses the
    homography for the new pixel grids; None keeps full resolution (845x1126 source).
    Valid = lands inside image 2. No occlusion is modelled: the scene is planar.
    """
    base = _root(root) / 'hpatches_v_machines'
    if not (base / 'H_1_2.txt').exists():
        raise FileNotFoundError(f'{base} absent')
    source = read_rgb(base / '1.ppm')
    target = read_rgb(base / '2.ppm')
    H = read_homography(base / 'H_1_2.txt')
    src_size = (source.shape[1], source.shape[0])
    tgt_size = (target.shape[1], target.shape[0])
    name = 'v_machines/1-2'
    if size is not None:
        size = (int(size[0]), int(size[1]))
        H = scale_homography(H, (src_size, size), (tgt_size, size))
        source = cv2.resize(source, size, interpolation=cv2.INTER_AREA)
        target = cv2.resize(target, size, interpolation=cv2.INTER_AREA)
        src_size = tgt_size = size
        name += f'@{size[0]}x{size[1]}'
    flow, valid = flow_from_homography(H, src_size, tgt_size)
    return FlowPair(name=name, source=source, target=target, flow=flow, valid=valid)


VIEWPOINT_CHANGES = (('rot+30', 30.0, 1.0), ('rot-30', -30.0, 1.0), ('zoom0.7', 0.0, 0.7),
                     ('zoom1.4', 0.0, 1.4), ('rot90', 90.0, 1.0), ('rot180', 180.0, 1.0))
"""(label, rotation in degrees counter-clockwise, zoom) of the ``hpatches_viewpoint`` set."""


def rotate_zoom_target(pair: FlowPair, angle_deg: float, zoom: float, label: str) -> FlowPair:
    """``pair`` with its target rotated and zoomed about the image centre (same canvas).

    The exact flow follows: a target point p moves to A p, so the new flow is
    A (x + f(x)) - x; pixels whose new target point leaves the canvas become invalid.
    """
    h, w = pair.target.shape[:2]
    A = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle_deg, zoom)
    target = cv2.warpAffine(pair.target, A, (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    sh, sw = pair.flow.shape[:2]
    ys, xs = np.mgrid[0:sh, 0:sw].astype(np.float64)
    px, py = xs + pair.flow[..., 0], ys + pair.flow[..., 1]
    flow = np.stack((A[0, 0] * px + A[0, 1] * py + A[0, 2] - xs,
                     A[1, 0] * px + A[1, 1] * py + A[1, 2] - ys), -1).astype(np.float32)
    landed = np.stack((xs + flow[..., 0], ys + flow[..., 1]), -1)
    inside = (landed[..., 0] >= -0.5) & (landed[..., 0] <= w - 0.5) \
        & (landed[..., 1] >= -0.5) & (landed[..., 1] <= h - 0.5)
    return FlowPair(name=f'{pair.name}/{label}', source=pair.source, target=target, flow=flow,
                    valid=pair.valid & inside)


def hpatches_viewpoint_pairs(root: str | os.PathLike | None = None) -> list[FlowPair]:
    """The HPatches pair at 240x240, then its target rotated (+-30, 90, 180 deg) or zoomed
    (0.7x, 1.4x): how a matcher holds up under viewpoint changes beyond the pair's own."""
    base = hpatches_pair(root, HPATCHES_SMALL_SIZE)
    return [base] + [rotate_zoom_target(base, angle, zoom, label)
                     for label, angle, zoom in VIEWPOINT_CHANGES]


# --------------------------------------------------------------------------- TUM


def quaternion_to_matrix(q_xyzw: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w), TUM's order -> 3x3 rotation (renormalised first)."""
    x, y, z, w = np.asarray(q_xyzw, dtype=np.float64) / np.linalg.norm(q_xyzw)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _stamped_files(folder: Path) -> list[tuple[float, Path]]:
    """Files named <timestamp>.png, sorted by time."""
    out = []
    for p in folder.glob('*.png'):
        try:
            out.append((float(p.stem), p))
        except ValueError:
            continue
    return sorted(out)


def _read_tum_groundtruth(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps N, camera-to-world 4x4 poses Nx4x4)."""
    stamps, poses = [], []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith('#'):
            continue
        v = [float(s) for s in line.split()]
        T = np.eye(4)
        T[:3, :3] = quaternion_to_matrix(v[4:8])
        T[:3, 3] = v[1:4]
        stamps.append(v[0])
        poses.append(T)
    return np.array(stamps), np.array(poses)


def _nearest(stamps: np.ndarray, t: float) -> int:
    return int(np.argmin(np.abs(stamps - t)))


def tum_pairs(root: str | os.PathLike | None = None,
              offsets: tuple[int, ...] = TUM_FRAME_OFFSETS) -> list[PosePair]:
    """TUM fr3 office: frame 0 against frames ``offsets`` (by time order of rgb/).

    Poses (camera-to-world, T_w_c) and depth images are each taken at the nearest
    timestamp to the colour frame; T_target_source = inv(T_w_target) @ T_w_source.
    Depth is PNG / 5000 in metres (0 = unknown), registered to the colour camera.
    """
    base = _root(root) / 'tum_fr3_office'
    if not (base / 'groundtruth.txt').exists():
        raise FileNotFoundError(f'{base} absent')
    vals = [line.split() for line in (base / 'intrinsics.txt').read_text().splitlines()
            if line.strip() and not line.startswith('#')][0]
    fx, fy, cx, cy = (float(v) for v in vals[:4])
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)
    rgb = _stamped_files(base / 'rgb')
    depth = _stamped_files(base / 'depth')
    depth_stamps = np.array([t for t, _ in depth])
    gt_stamps, gt_poses = _read_tum_groundtruth(base / 'groundtruth.txt')

    def frame(i: int):
        t, path = rgb[i]
        d = cv2.imread(str(depth[_nearest(depth_stamps, t)][1]), cv2.IMREAD_UNCHANGED)
        return read_rgb(path), d.astype(np.float32) / 5000.0, gt_poses[_nearest(gt_stamps, t)]

    src_img, src_depth, T_w_s = frame(0)
    pairs = []
    for k in offsets:
        if k >= len(rgb):
            continue
        tgt_img, tgt_depth, T_w_t = frame(k)
        pairs.append(PosePair(name=f'fr3_office/0-{k}', source=src_img, target=tgt_img,
                              K_source=K.copy(), K_target=K.copy(),
                              T_target_source=np.linalg.inv(T_w_t) @ T_w_s,
                              depth_source=src_depth, depth_target=tgt_depth))
    return pairs


# --------------------------------------------------------------------------- Middlebury


def _read_middlebury_par(path: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(image name, K, R, t) per view; P = K [R | t] maps world to camera."""
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    count = int(lines[0][0])
    views = []
    for row in lines[1:count + 1]:
        v = np.array(row[1:22], dtype=np.float64)
        views.append((row[0], v[0:9].reshape(3, 3), v[9:18].reshape(3, 3), v[18:21]))
    return views


def relative_pose(R_s: np.ndarray, t_s: np.ndarray, R_t: np.ndarray,
                  t_t: np.ndarray) -> np.ndarray:
    """T_target_source from two world-to-camera poses (X_c = R X + t)."""
    T = np.eye(4)
    T[:3, :3] = R_t @ R_s.T
    T[:3, 3] = t_t - R_t @ R_s.T @ t_s
    return T


def middlebury_pairs(root: str | os.PathLike | None = None,
                     objects: tuple[str, ...] = MIDDLEBURY_OBJECTS,
                     max_angle_deg: float = MIDDLEBURY_MAX_NEIGHBOUR_DEG) -> list[PosePair]:
    """Neighbouring views of both sparse rings: consecutive entries of ``*_par.txt``
    whose relative rotation is at most ``max_angle_deg`` (about 23 degrees apart)."""
    base = _root(root) / 'middlebury_mview'
    pairs = []
    for obj in objects:
        folder = base / obj
        par = next(iter(folder.glob('*_par.txt')), None) if folder.is_dir() else None
        if par is None:
            continue
        views = _read_middlebury_par(par)
        for (n_s, K_s, R_s, t_s), (n_t, K_t, R_t, t_t) in zip(views, views[1:]):
            T = relative_pose(R_s, t_s, R_t, t_t)
            cos = np.clip((np.trace(T[:3, :3]) - 1.0) / 2.0, -1.0, 1.0)
            if np.degrees(np.arccos(cos)) > max_angle_deg:
                continue
            pairs.append(PosePair(name=f'{obj}/{Path(n_s).stem}-{Path(n_t).stem}',
                                  source=read_rgb(folder / n_s), target=read_rgb(folder / n_t),
                                  K_source=K_s, K_target=K_t, T_target_source=T))
    if not pairs:
        raise FileNotFoundError(f'no Middlebury rings under {base}')
    return pairs


# --------------------------------------------------------------------------- by name

FLOW_SETS = ('sintel', 'hpatches240', 'hpatches', 'hpatches_viewpoint')
POSE_SETS = ('tum', 'middlebury')


def load_flow_set(name: str, root: str | os.PathLike | None = None) -> list[FlowPair]:
    """Flow pairs of a named shared set (one of :data:`FLOW_SETS`)."""
    if name == 'sintel':
        return sintel_pairs(root)
    if name == 'hpatches':
        return [hpatches_pair(root)]
    if name == 'hpatches240':
        return [hpatches_pair(root, HPATCHES_SMALL_SIZE)]
    if name == 'hpatches_viewpoint':
        return hpatches_viewpoint_pairs(root)
    raise KeyError(f'unknown flow set {name!r}; known: {", ".join(FLOW_SETS)}')


def load_pose_set(name: str, root: str | os.PathLike | None = None) -> list[PosePair]:
    """Pose pairs of a named shared set ('tum', 'middlebury')."""
    if name == 'tum':
        return tum_pairs(root)
    if name == 'middlebury':
        return middlebury_pairs(root)
    raise KeyError(f'unknown pose set {name!r}; known: {", ".join(POSE_SETS)}')
