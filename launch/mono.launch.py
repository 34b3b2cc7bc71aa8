"""One camera -> dense_match_node in mono mode (each frame against the previous/key frame).

    ros2 launch dense_match_ros mono.launch.py image:=/camera/image_raw \
        camera_info:=/camera/camera_info method:=dis device:=auto

Arguments left empty (method, method_options, device, weights) take their value from
``params_file`` (default: this package's config/mono.yaml), so a params file is never
silently overridden.
"""
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_PARAMS = os.path.normpath(os.path.join(_HERE, '..', 'config', 'mono.yaml'))

ARGUMENTS = [
    ('image', '/camera/image_raw', 'input image topic (sensor_msgs/Image)'),
    ('camera_info', '/camera/camera_info', 'input camera_info topic'),
    ('method', '', 'matching method (empty: from params_file)'),
    ('device', '', 'auto, cpu, cuda or cuda:N (empty: from params_file)'),
    ('weights', '', 'checkpoint of a learned method (empty: from params_file)'),
    ('method_options', '', 'options of the method, a YAML mapping such as "{refine: dis}" '
                           '(empty: from params_file)'),
    ('params_file', _DEFAULT_PARAMS, 'ROS 2 parameters file for dense_match_node'),
    ('namespace', '', 'namespace of the node and its output topics'),
    ('compressed', 'false', 'subscribe to <image>/compressed instead'),
    ('use_sim_time', 'false', 'use /clock (bag replay)'),
    ('log_level', 'info', 'node log level'),
    ('large_data', 'false',
     'true: start the node with FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA, '
     'the large-data transport of Fast DDS (shared memory and TCP), for best-effort '
     'raw images larger than its 512 KiB shared-memory segment, which otherwise travel '
     'as UDP fragments and get lost. Both ends must use it: start the camera driver '
     'process (or whatever publishes the images) with the same variable. '
     'false: the environment is left as it is'),
]


def _node(context):
    get = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    overrides = {k: get(k) for k in ('method', 'device', 'weights') if get(k)}
    if get('method_options'):  # declared a string, whatever YAML it looks like
        overrides['method_options'] = ParameterValue(get('method_options'), value_type=str)
    overrides['compressed'] = get('compressed').lower() in ('1', 'true', 'yes')
    overrides['use_sim_time'] = get('use_sim_time').lower() in ('1', 'true', 'yes')
    image = get('image')
    remappings = [('image', image), ('camera_info', get('camera_info'))]
    if overrides['compressed']:
        remappings.append(('image/compressed', image.rstrip('/') + '/compressed'))
    return [Node(package='dense_match_ros', executable='dense_match_node',
                 name='dense_match_node', namespace=get('namespace'),
                 parameters=[get('params_file'), overrides], remappings=remappings,
                 arguments=['--ros-args', '--log-level', get('log_level')],
                 output='screen', emulate_tty=True)]


def generate_launch_description():
    large_data = SetEnvironmentVariable(  # before the node: it copies the environment
        'FASTDDS_BUILTIN_TRANSPORTS', 'LARGE_DATA',
        condition=IfCondition(LaunchConfiguration('large_data')))
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text)
         for name, default, text in ARGUMENTS] + [large_data, OpaqueFunction(function=_node)])
