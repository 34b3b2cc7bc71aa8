"""TUM-format camera trajectories: reading, writing, timestamp association, relative poses.

A TUM trajectory file has one pose per line, ``timestamp tx ty tz qx qy qz qw``, each the
camera-to-world transform T_w_c at that time (seconds). Ground truth from a motion-capture
system runs at a different rate from the camera, so images are associated with the
ground-truth sample nearest in time, and pairs whose nearest sample is too far away are left
out rather than scored against a pose of another moment.

Relative poses follow the package's direction (see msg/RelativePose.msg):
``T_target_source = inv(T_w_target) @ T_w_source`` maps points from the source camera into
the target camera, ``X_target = R X_source + t``.

No rclpy here: the replay report and offline tools use this without a ROS graph.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

DEFAULT_MAX_DT = 0.02
"""Seconds: the association tolerance of the TUM benchmark tools (associate.py default)."""


@dataclasses.dataclass
class Trajectory:
    """Camera-to-world poses at increasing timestamps."""

    stamps: np.ndarray
    """float64 (N,), seconds, sorted ascending."""
    poses: np.ndarray
    """float64 (N, 4, 4), T_w_c."""

    def __post_init__(self) -> None:
        self.stamps = np.asarray(self.stamps, dtype=np.float64).reshape(-1)
        self.poses = np.asarray(self.poses, dtype=np.float64).reshape(-1, 4, 4)
        if len(self.stamps) != len(self.poses):
            raise ValueError(f'{len(self.stamps)} stamps for {len(self.poses)} poses')
        order = np.argsort(self.stamps, kind='stable')
        self.stamps, self.poses = self.stamps[order], self.poses[order]

    def __len__(self) -> int:
        return len(self.stamps)

    def nearest(self, stamps: np.ndarray | float,
                max_dt: float = DEFAULT_MAX_DT) -> np.ndarray:
        """Index of the sample nearest to each stamp, -1 where none lies within ``max_dt``."""
        return associate(np.atleast_1d(np.asarray(stamps, dtype=np.float64)), self.stamps, max_dt)

    def pose_at(self, stamp: float, max_dt: float = DEFAULT_MAX_DT) -> np.ndarray | None:
        """T_w_c of the nearest sample, or None when no sample is within ``max_dt``."""
        idx = int(self.nearest(stamp, max_dt)[0])
        return None if idx < 0 else self.poses[idx]

    def relative(self, source_stamp: float, target_stamp: float,
                 max_dt: float = DEFAULT_MAX_DT) -> np.ndarray | None:
        """T_target_source from the nearest samples, or None when either is unmatched."""
        src = self.pose_at(source_stamp, max_dt)
        tgt = self.pose_at(target_stamp, max_dt)
        if src is None or tgt is None:
            return None
        return relative_pose(src, tgt)


def pose_matrix(translation: np.ndarray, quaternion_xyzw: np.ndarray) -> np.ndarray:
    """4x4 transform from a translation and a unit quaternion in TUM's (x, y, z, w) order."""
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat(np.asarray(quaternion_xyzw, dtype=np.float64)).as_matrix()
    T[:3, 3] = np.asarray(translation, dtype=np.float64)
    return T


def relative_pose(T_w_source: np.ndarray, T_w_target: np.ndarray) -> np.ndarray:
    """T_target_source = inv(T_w_target) @ T_w_source (source camera -> target camera)."""
    return invert(np.asarray(T_w_target, dtype=np.float64)) @ np.asarray(T_w_source, dtype=np.float64)


def invert(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform, exact (no general matrix inversion)."""
    R, t = T[:3, :3], T[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


def associate(query: np.ndarray, reference: np.ndarray,
              max_dt: float = DEFAULT_MAX_DT) -> np.ndarray:
    """For each query stamp, the index of the nearest sorted ``reference`` stamp, or -1.

    -1 where the nearest one is more than ``max_dt`` away (also for an empty reference).
    """
    query = np.asarray(query, dtype=np.float64).reshape(-1)
    reference = np.asarray(reference, dtype=np.float64).reshape(-1)
    if len(reference) == 0:
        return np.full(len(query), -1, dtype=np.int64)
    right = np.clip(np.searchsorted(reference, query), 0, len(reference) - 1)
    left = np.clip(right - 1, 0, len(reference) - 1)
    pick = np.where(np.abs(reference[left] - query) <= np.abs(reference[right] - query), left, right)
    pick[np.abs(reference[pick] - query) > max_dt] = -1
    return pick.astype(np.int64)


def read_tum(path: str | Path) -> Trajectory:
    """Read a TUM trajectory; '#' lines and blank lines are skipped.

    Raises ValueError naming the line for anything that is not 8 numbers, so a wrong file
    (an rgb.txt, say) fails loudly instead of yielding a nonsense trajectory.
    """
    stamps, poses = [], []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        fields = line.replace(',', ' ').split()
        if len(fields) != 8:
            raise ValueError(f'{path}:{lineno}: expected "t tx ty tz qx qy qz qw", got {line!r}')
        try:
            values = [float(f) for f in fields]
        except ValueError as err:
            raise ValueError(f'{path}:{lineno}: {err}') from None
        stamps.append(values[0])
        poses.append(pose_matrix(values[1:4], values[4:8]))
    if not stamps:
        raise ValueError(f'{path}: no poses')
    return Trajectory(np.array(stamps), np.array(poses))


def write_tum(path: str | Path, stamps: np.ndarray, poses: np.ndarray,
              comment: str = 'timestamp tx ty tz qx qy qz qw (camera-to-world)') -> Path:
    """Write T_w_c poses in TUM format (quaternion x y z w, stamps in seconds)."""
    path = Path(path)
    lines = [f'# {comment}'] if comment else []
    for stamp, T in zip(np.asarray(stamps, dtype=np.float64), np.asarray(poses, dtype=np.float64)):
        q = Rotation.from_matrix(T[:3, :3]).as_quat()
        t = T[:3, 3]
        lines.append(f'{stamp:.6f} {t[0]:.6f} {t[1]:.6f} {t[2]:.6f} '
                     f'{q[0]:.7f} {q[1]:.7f} {q[2]:.7f} {q[3]:.7f}')
    path.write_text('\n'.join(lines) + '\n')
    return path
