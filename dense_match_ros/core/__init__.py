"""Everything that is not ROS: geometry, matching methods, pose, metrics.

Nothing under ``dense_match_ros.core`` imports rclpy, so the same code serves the node, the
CLIs, the benchmarks and the tests.
"""
from dense_match_ros.core.registry import (MatchResult, Matcher, available_methods,
                                           load_matcher, register)

__all__ = ['MatchResult', 'Matcher', 'available_methods', 'load_matcher', 'register']
