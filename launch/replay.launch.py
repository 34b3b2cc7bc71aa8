"""Replay a rosbag2 into the matcher node on a ROS 2 install: ``ros2 bag play`` + dense_match_node.

    ros2 launch dense_match_ros replay.launch.py bag:=/path/to/bag rate:=0.5 \
        image_topic:=/camera/image camera_info_topic:=/camera/camera_info

The node starts first; the player is delayed by ``start_delay`` seconds so that the first
frames are not published before the node's subscriptions exist. The node's inputs are
remapped to the bag's topics, its outputs live under ``namespace`` (e.g.
``/dense_match/flow``). ``record:=true`` also runs ``ros2 bag record`` on the outputs, and
``shutdown_after_play:=true`` ends the launch a few seconds after the player finishes,
which makes the whole thing usable as a batch job. For offline scoring without a ROS graph
use ``dense-match-replay`` instead.
"""
import os

from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, EmitEvent, ExecuteProcess, LogInfo,
                            OpaqueFunction, RegisterEventHandler, SetEnvironmentVariable,
                            TimerAction)
from launch.conditions import IfCondition
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_PARAMS = os.path.normpath(os.path.join(_HERE, '..', 'config', 'mono.yaml'))
OUTPUTS = ('flow', 'matchability', 'flow_color', 'relative_pose', 'pose', 'match_result')

ARGUMENTS = (
    ('bag', None, 'rosbag2 directory (or .db3/.mcap file) to play'),
    ('rate', '1.0', 'playback rate factor of ros2 bag play'),
    ('loop', 'false', 'loop the bag (the node resets its reference frame when stamps jump back)'),
    ('start_delay', '3.0', 'seconds between starting the node and starting the player'),
    ('image_topic', '/camera/image', 'image topic in the bag'),
    ('camera_info_topic', '/camera/camera_info', 'camera_info topic in the bag'),
    ('compressed', 'false', 'the bag holds sensor_msgs/CompressedImage on image_topic/compressed'),
    ('method', '', 'matching method (empty: from params_file)'),
    ('device', '', 'auto, cpu, cuda or cuda:N (empty: from params_file)'),
    ('params_file', _DEFAULT_PARAMS, 'node parameters YAML'),
    ('input_qos', 'reliable',
     'QoS of the node inputs. reliable by default: best-effort raw images larger than the '
     'DDS shared-memory segment (Fast DDS: 512 KiB, i.e. above ~480x360 rgb8) are sent as '
     'UDP fragments and lost whole under load; the node still takes only the newest frame'),
    ('namespace', 'dense_match', 'namespace of the node and its outputs'),
    ('record', 'false', 'also record the outputs with ros2 bag record'),
    ('record_path', 'dense_match_outputs', 'output bag of record:=true'),
    ('shutdown_after_play', 'false', 'end the launch 3 s after the player exits'),
    ('large_data', 'false',
     'true: start the node, ros2 bag play and ros2 bag record with '
     'FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA, the large-data transport of Fast DDS (shared '
     'memory and TCP), for best-effort raw images larger than its 512 KiB shared-memory '
     'segment, which otherwise travel as UDP fragments and get lost. Both ends must use '
     'it: any other process that exchanges images with these (a camera driver, a viewer) '
     'needs the same variable. false: the environment is left as it is'),
)


def _truthy(value: str) -> bool:
    return value.strip().lower() in ('1', 'true', 'yes', 'on')


def _actions(context):
    arg = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    overrides = {k: arg[k] for k in ('method', 'device', 'input_qos') if arg[k]}
    overrides['compressed'] = _truthy(arg['compressed'])
    parameters = ([arg['params_file']] if arg['params_file'] else []) + [overrides]
    image = arg['image_topic']
    remappings = [('image', image), ('camera_info', arg['camera_info_topic'])]
    if overrides['compressed']:
        remappings.append(('image/compressed', image.rstrip('/') + '/compressed'))
    node = Node(package='dense_match_ros', executable='dense_match_node',
                name='dense_match_node', namespace=arg['namespace'], output='screen',
                parameters=parameters, remappings=remappings)
    play_cmd = ['ros2', 'bag', 'play', arg['bag'], '--rate', arg['rate']]
    if _truthy(arg['loop']):
        play_cmd.append('--loop')
    player = ExecuteProcess(cmd=play_cmd, name='bag_play', output='screen')
    actions = [node, TimerAction(period=float(arg['start_delay']), actions=[player])]
    if _truthy(arg['record']):
        ns = '/' + arg['namespace'].strip('/') if arg['namespace'].strip('/') else ''
        topics = [f'{ns}/{name}' for name in OUTPUTS] + ['/diagnostics']
        actions.append(ExecuteProcess(cmd=['ros2', 'bag', 'record', '-o', arg['record_path'],
                                           *topics], name='bag_record', output='screen'))
    if _truthy(arg['shutdown_after_play']):
        actions.append(RegisterEventHandler(OnProcessExit(
            target_action=player,
            on_exit=[LogInfo(msg='bag play finished; shutting down in 3 s'),
                     TimerAction(period=3.0, actions=[
                         EmitEvent(event=Shutdown(reason='bag play finished'))])])))
    return actions


def generate_launch_description() -> LaunchDescription:
    declared = [DeclareLaunchArgument(name, description=desc) if default is None else
                DeclareLaunchArgument(name, default_value=default, description=desc)
                for name, default, desc in ARGUMENTS]
    large_data = SetEnvironmentVariable(  # before the processes: they copy the environment
        'FASTDDS_BUILTIN_TRANSPORTS', 'LARGE_DATA',
        condition=IfCondition(LaunchConfiguration('large_data')))
    return LaunchDescription(declared + [large_data, OpaqueFunction(function=_actions)])
