"""Data sets: synthetic training pairs (photos + random warps), shared real evaluation data.

The names re-exported here need only numpy and OpenCV (no torch, no rclpy), so importing
any submodule stays cheap; training code wraps :class:`SyntheticPairDataset` itself.
"""
from dense_match_ros.data.photos import PhotoSource
from dense_match_ros.data.synthetic import (SyntheticPair, SyntheticPairDataset,
                                            SyntheticPairGenerator, heldout_pairs)

__all__ = ['PhotoSource', 'SyntheticPair', 'SyntheticPairDataset', 'SyntheticPairGenerator',
           'heldout_pairs']
