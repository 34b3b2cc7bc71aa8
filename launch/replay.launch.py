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
from launch.actions import (EmitEvent, ExecuteProcess, LogInfo, OpaqueFunction,
                            RegisterEventHandler, TimerAction)
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown

from dense_match_ros.ros import launch_args as common

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
    *common.MATCHER_ARGUMENTS,
    ('params_file', _DEFAULT_PARAMS, 'node parameters YAML'),
    ('input_qos', 'reliable',
     'QoS of the node inputs. reliable by default: best-effort raw images larger than the '
     'DDS shared-memory segment (Fast DDS: 512 KiB, i.e. above ~480x360 rgb8) are sent as '
     'UDP fragments and lost whole under load; the node still takes only the newest frame'),
    ('namespace', 'dense_match', 'namespace of the node and its outputs'),
    ('log_level', 'info', 'node log level'),
    ('record', 'false', 'also record the outputs with ros2 bag record'),
    ('record_path', 'dense_match_outputs', 'output bag of record:=true'),
    ('shutdown_after_play', 'false', 'end the launch 3 s after the player exits'),
    common.large_data_argument('the node, ros2 bag play and ros2 bag record'),
)


def _actions(context):
    get = common.reader(context)
    overrides = common.matcher_overrides(get)
    if get('input_qos'):
        overrides['input_qos'] = get('input_qos')
    overrides['compressed'] = common.truthy(get('compressed'))
    parameters = ([get('params_file')] if get('params_file') else []) + [overrides]
    remappings = common.image_remappings(get('image_topic'), get('camera_info_topic'),
                                         overrides['compressed'])
    node = common.matcher_node(get, parameters, remappings)
    play_cmd = ['ros2', 'bag', 'play', get('bag'), '--rate', get('rate')]
    if common.truthy(get('loop')):
        play_cmd.append('--loop')
    player = ExecuteProcess(cmd=play_cmd, name='bag_play', output='screen')
    actions = [node, TimerAction(period=float(get('start_delay')), actions=[player])]
    if common.truthy(get('record')):
        ns = '/' + get('namespace').strip('/') if get('namespace').strip('/') else ''
        topics = [f'{ns}/{name}' for name in OUTPUTS] + ['/diagnostics']
        actions.append(ExecuteProcess(cmd=['ros2', 'bag', 'record', '-o', get('record_path'),
                                           *topics], name='bag_record', output='screen'))
    if common.truthy(get('shutdown_after_play')):
        actions.append(RegisterEventHandler(OnProcessExit(
            target_action=player,
            on_exit=[LogInfo(msg='bag play finished; shutting down in 3 s'),
                     TimerAction(period=3.0, actions=[
                         EmitEvent(event=Shutdown(reason='bag play finished'))])])))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(common.declare(ARGUMENTS) + [OpaqueFunction(function=_actions)])
