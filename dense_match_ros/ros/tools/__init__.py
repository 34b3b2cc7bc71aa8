"""Offline tools around the node: bags, trajectories, replay and the end-to-end demo.

None of these runs inside the node. ``replay`` and ``demo`` score poses with
:mod:`dense_match_ros.evaluation` (which the node itself never imports); ``bag_io``,
``make_bag`` and ``trajectory`` read and write rosbag2 and TUM files without a ROS graph.
The replay goes through the node's own pipeline and message builders, so what it measures
is what the node would have published.
"""
