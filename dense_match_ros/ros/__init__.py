"""ROS 2 side of dense_match_ros: message conversion, the processing pipeline, the node.

``convert``, ``pipeline``, ``parameters``, ``sync`` and ``runtime`` do not import rclpy, so
the offline tools in ``tools`` (replay reads bags with ``rosbags``) run exactly the node's
processing path and settings without a ROS graph. Only ``node`` and ``messages`` (the output
message builders) need rclpy and the generated message classes. Nothing here imports
``dense_match_ros.evaluation`` or ``training``, except the offline ``tools``.
"""
