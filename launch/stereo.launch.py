"""Two cameras -> dense_match_node in pair mode (left matched into the right image).

    ros2 launch dense_match_ros stereo.launch.py \
        left_image:=/stereo/left/image_raw left_camera_info:=/stereo/left/camera_info \
        right_image:=/stereo/right/image_raw right_camera_info:=/stereo/right/camera_info

Pairs are formed by approximate time (``sync_slop`` seconds, message_filters when
installed). Empty method/method_options/device/weights/slop come from ``params_file``
(config/stereo.yaml).
"""
import os

from launch import LaunchDescription
from launch.actions import OpaqueFunction

from dense_match_ros.ros import launch_args as common

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_PARAMS = os.path.normpath(os.path.join(_HERE, '..', 'config', 'stereo.yaml'))

ARGUMENTS = [
    ('left_image', '/left/image_raw', 'left (source) image topic'),
    ('left_camera_info', '/left/camera_info', 'left camera_info topic'),
    ('right_image', '/right/image_raw', 'right (target) image topic'),
    ('right_camera_info', '/right/camera_info', 'right camera_info topic'),
    *common.MATCHER_ARGUMENTS,
    ('sync_slop', '', 'largest stamp difference of a pair in seconds (empty: params_file)'),
    ('params_file', _DEFAULT_PARAMS, 'ROS 2 parameters file for dense_match_node'),
    *common.NODE_ARGUMENTS,
    common.large_data_argument('the node'),
]


def _node(context):
    get = common.reader(context)
    overrides = common.matcher_overrides(get)
    if get('sync_slop'):
        overrides['sync_slop'] = float(get('sync_slop'))
    overrides['mode'] = 'pair'
    overrides['use_sim_time'] = common.truthy(get('use_sim_time'))
    remappings = [('left/image', get('left_image')),
                  ('left/camera_info', get('left_camera_info')),
                  ('right/image', get('right_image')),
                  ('right/camera_info', get('right_camera_info'))]
    return [common.matcher_node(get, [get('params_file'), overrides], remappings)]


def generate_launch_description():
    return LaunchDescription(common.declare(ARGUMENTS) + [OpaqueFunction(function=_node)])
