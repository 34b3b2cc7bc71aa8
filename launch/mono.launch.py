"""One camera -> dense_match_node in mono mode (each frame against the previous/key frame).

    ros2 launch dense_match_ros mono.launch.py image:=/camera/image_raw \
        camera_info:=/camera/camera_info method:=neuflow-fast device:=auto

Arguments left empty (method, method_options, device, weights) take their value from
``params_file`` (default: this package's config/mono.yaml), so a params file is never
silently overridden.
"""
import os

from launch import LaunchDescription
from launch.actions import OpaqueFunction

from dense_match_ros.ros import launch_args as common

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_PARAMS = os.path.normpath(os.path.join(_HERE, '..', 'config', 'mono.yaml'))

ARGUMENTS = [
    ('image', '/camera/image_raw', 'input image topic (sensor_msgs/Image)'),
    ('camera_info', '/camera/camera_info', 'input camera_info topic'),
    *common.MATCHER_ARGUMENTS,
    ('params_file', _DEFAULT_PARAMS, 'ROS 2 parameters file for dense_match_node'),
    ('compressed', 'false', 'subscribe to <image>/compressed instead'),
    *common.NODE_ARGUMENTS,
    common.large_data_argument('the node'),
]


def _node(context):
    get = common.reader(context)
    overrides = common.matcher_overrides(get)
    overrides['compressed'] = common.truthy(get('compressed'))
    overrides['use_sim_time'] = common.truthy(get('use_sim_time'))
    remappings = common.image_remappings(get('image'), get('camera_info'), overrides['compressed'])
    return [common.matcher_node(get, [get('params_file'), overrides], remappings)]


def generate_launch_description():
    return LaunchDescription(common.declare(ARGUMENTS) + [OpaqueFunction(function=_node)])
