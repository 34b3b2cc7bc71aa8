"""Pinhole camera intrinsics as the pose code needs them, independent of any message type
(the ROS layer fills them from ``sensor_msgs/CameraInfo``)."""
from __future__ import annotations

import dataclasses

import numpy as np

from dense_match_ros.core.geometry import grid


@dataclasses.dataclass
class CameraIntrinsics:
    """Pinhole intrinsics of one image stream, in pixels of ``size``."""

    K: np.ndarray
    """3x3 float64 camera matrix."""
    D: np.ndarray
    """Distortion coefficients (float64, possibly empty); all-zero means undistorted."""
    size: tuple[int, int] | None
    """(width, height) the calibration refers to; None when the message left it at 0."""
    distortion_model: str = ''

    @property
    def has_distortion(self) -> bool:
        return self.D.size > 0 and bool(np.any(self.D != 0.0))

    def scaled(self, from_size: tuple[int, int], to_size: tuple[int, int]) -> 'CameraIntrinsics':
        """The same camera seen through an image resized from ``from_size`` to ``to_size``.

        Focal lengths scale with the image; the principal point moves like a pixel centre
        (:func:`grid.rescale_points`), which a plain ``K * s`` would get wrong by half a pixel.
        """
        if tuple(from_size) == tuple(to_size):
            return self
        sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
        K = self.K.copy()
        K[0, 0] *= sx
        K[0, 1] *= sx
        K[1, 1] *= sy
        K[:2, 2] = grid.rescale_points(self.K[:2, 2], from_size, to_size)
        return CameraIntrinsics(K, self.D.copy(), (int(to_size[0]), int(to_size[1])),
                                self.distortion_model)
