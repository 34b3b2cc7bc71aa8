"""ROS 2 side of dense_match_ros: message conversion, the processing pipeline, the node.

``convert`` and ``pipeline`` do not import rclpy, so the offline replay tool (which reads
bags with ``rosbags``) runs exactly the node's processing path without a ROS graph. Only
``node`` (and the message construction helpers, lazily) touch rclpy and the generated
message classes.
"""
