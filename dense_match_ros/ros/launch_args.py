"""What the package's Python launch files (``launch/*.launch.py``) have in common.

A launch file is installed as a loose script, so what the three share (the matcher's
arguments, the large-data switch, how an argument becomes a node parameter) lives here,
in the installed package they can all import. Only launch files import this module: it
needs ``launch`` and ``launch_ros``, which a ROS install has and a plain venv may not.
"""
from __future__ import annotations

from typing import Callable, Iterable

from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

Argument = tuple[str, 'str | None', str]
"""(name, default, description); a default of None makes the argument required."""

MATCHER_ARGUMENTS: tuple[Argument, ...] = (
    ('method', '', 'matching method (empty: from params_file)'),
    ('device', '', 'auto, cpu, cuda or cuda:N (empty: from params_file)'),
    ('weights', '', 'checkpoint of a learned method (empty: from params_file)'),
    ('method_options', '', 'options of the method, a YAML mapping such as "{refine: dis}" '
                           '(empty: from params_file)'),
)
"""Left empty, each takes its value from the params file, which is never silently overridden."""

NODE_ARGUMENTS: tuple[Argument, ...] = (
    ('namespace', '', 'namespace of the node and its output topics'),
    ('use_sim_time', 'false', 'use /clock (bag replay)'),
    ('log_level', 'info', 'node log level'),
)


def large_data_argument(started: str) -> Argument:
    """The ``large_data`` switch; ``started`` names what this launch file starts with it."""
    return ('large_data', 'false',
            f'true: start {started} with FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA, the large-data '
            'transport of Fast DDS (shared memory and TCP), for best-effort raw images larger '
            'than its 512 KiB shared-memory segment, which otherwise travel as UDP fragments '
            'and get lost. Both ends must use it: any other process that exchanges images '
            'with these (a camera driver, a viewer) needs the same variable. '
            'false: the environment is left as it is')


def truthy(value: str) -> bool:
    return value.strip().lower() in ('1', 'true', 'yes', 'on')


def declare(arguments: Iterable[Argument]) -> list:
    """The arguments as launch actions, plus the large-data switch when one is declared.

    The switch sets the variable in the launch's environment, which every process started
    after it copies; it must therefore come before them."""
    arguments = list(arguments)
    actions = [DeclareLaunchArgument(name, description=text) if default is None else
               DeclareLaunchArgument(name, default_value=default, description=text)
               for name, default, text in arguments]
    if any(name == 'large_data' for name, _, _ in arguments):
        actions.append(SetEnvironmentVariable(
            'FASTDDS_BUILTIN_TRANSPORTS', 'LARGE_DATA',
            condition=IfCondition(LaunchConfiguration('large_data'))))
    return actions


def reader(context) -> Callable[[str], str]:
    """A function giving an argument's value in ``context``."""
    return lambda name: LaunchConfiguration(name).perform(context)


def matcher_overrides(get: Callable[[str], str]) -> dict:
    """Node parameters from the :data:`MATCHER_ARGUMENTS` that were given."""
    overrides = {k: get(k) for k in ('method', 'device', 'weights') if get(k)}
    if get('method_options'):  # declared a string, whatever YAML it looks like
        overrides['method_options'] = ParameterValue(get('method_options'), value_type=str)
    return overrides


def image_remappings(image: str, camera_info: str, compressed: bool) -> list[tuple[str, str]]:
    """The mono inputs onto a camera's topics (``<image>/compressed`` when ``compressed``)."""
    remappings = [('image', image), ('camera_info', camera_info)]
    if compressed:
        remappings.append(('image/compressed', image.rstrip('/') + '/compressed'))
    return remappings


def matcher_node(get: Callable[[str], str], parameters: list, remappings: list) -> Node:
    """``dense_match_node`` with the :data:`NODE_ARGUMENTS`' namespace and log level."""
    return Node(package='dense_match_ros', executable='dense_match_node',
                name='dense_match_node', namespace=get('namespace'),
                parameters=parameters, remappings=remappings,
                arguments=['--ros-args', '--log-level', get('log_level')],
                output='screen', emulate_tty=True)
