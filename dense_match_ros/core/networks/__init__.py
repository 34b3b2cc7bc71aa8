"""Neural network building blocks shared by the learned methods (torch only, no ROS)."""
from dense_match_ros.core.networks.backbone import LEVELS, VGGBackbone, VGGConfig

__all__ = ['LEVELS', 'VGGBackbone', 'VGGConfig']
