"""The node's parameters: one table for declaration, the pipeline config and run-time changes.

Each :class:`Param` says once what the node declares (default, description, range or
allowed values, read-only), whether the value belongs to the
:class:`~dense_match_ros.ros.pipeline.PipelineConfig`, and from that how a change at run
time takes effect: a model field rebuilds the matcher, another config field goes through
:meth:`MatchPipeline.update`, and the node's own parameters are read where they are used
(``warn_throttle_s`` is pushed into the throttle). The offline replay builds its pipeline
from a params file with the same table, so it processes with the node's settings.

``pose.<field>`` parameters mirror :class:`core.geometry.pose.PoseConfig`; they are
generated from its fields, so a new pose option is a node parameter without an edit here.
No rclpy at import (the descriptor classes are imported when a node declares): the replay
reads params files with this module where no ROS graph runs.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

from dense_match_ros.core.device import DEFAULT_THREADS, resolve_device
from dense_match_ros.core.geometry import pose as _pose
from dense_match_ros.core.registry import DEFAULT_METHOD, available_methods
from dense_match_ros.ros.pipeline import MODEL_FIELDS, PipelineConfig

# Output topics, relative to the node's namespace; each has a publish_<name> switch.
OUTPUTS = ('flow', 'matchability', 'flow_color', 'relative_pose', 'pose', 'match_result')
INPUT_QOS = ('auto', 'sensor_data', 'reliable', 'system_default')
SYNCHRONIZERS = ('auto', 'message_filters', 'builtin')
STAMP_SOURCES = ('header', 'receipt')
POSE_PREFIX = 'pose.'


@dataclasses.dataclass(frozen=True)
class Param:
    """One node parameter; its type is the type of ``default``."""

    name: str
    default: Any
    description: str
    range: tuple[float, float] | None = None
    """Inclusive (low, high): an integer range for an int default, else a float range."""
    constraints: str = ''
    """The allowed values in words (ParameterDescriptor.additional_constraints)."""
    read_only: bool = False
    """Fixed at start-up; otherwise changeable at run time."""
    config: bool = False
    """A PipelineConfig field of the same name (``pose.*``: a key of its pose_options)."""

    def descriptor(self):
        """rcl_interfaces/ParameterDescriptor with the range, when there is one."""
        from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
        kwargs: dict[str, Any] = {'name': self.name, 'description': self.description,
                                  'read_only': self.read_only,
                                  'additional_constraints': self.constraints}
        if self.range is not None:
            low, high = self.range
            if isinstance(self.default, int):
                kwargs['integer_range'] = [IntegerRange(from_value=low, to_value=high, step=1)]
            else:
                kwargs['floating_point_range'] = [FloatingPointRange(
                    from_value=float(low), to_value=float(high), step=0.0)]
        return ParameterDescriptor(**kwargs)


def parameter_table() -> list[Param]:
    """Every node parameter in declaration order (methods as registered right now)."""
    table = [
        Param('method', DEFAULT_METHOD, 'Matching method; changing it swaps the model at run time.',
              constraints=f'one of: {", ".join(available_methods())}', config=True),
        Param('weights', '', 'Checkpoint of a learned method (empty: the shipped one).',
              config=True),
        Param('device', 'auto', 'Where the model runs.', constraints='auto, cpu, cuda or cuda:N',
              config=True),
        Param('method_options', '', 'Options of the method for load_matcher, a YAML mapping in '
                                    'a string, e.g. "{refine: dis}" for dgc; changing it '
                                    'rebuilds the model. Give them with the method they '
                                    'belong to.',
              constraints='a YAML mapping or empty', config=True),
        Param('mode', 'mono', 'mono: each frame against the previous/key frame; pair: left vs '
                              'right camera.', constraints='mono or pair', read_only=True,
              config=True),
        Param('compressed', False, 'Subscribe to <image>/compressed (sensor_msgs/CompressedImage, '
                                   'jpeg/png) instead of raw images.', read_only=True),
        Param('use_rectified', False, 'Take intrinsics from CameraInfo.P (rectified streams) '
                                      'instead of K and D.'),
        Param('process_width', 0, 'Matching width in pixels (0: input width, or keep aspect).',
              (0, 8192), config=True),
        Param('process_height', 0, 'Matching height in pixels (0: input height, or keep '
                                   'aspect).', (0, 8192), config=True),
        Param('full_resolution_output', False, 'Resample outputs to the input grid.',
              config=True),
        Param('keyframe_stride', 1, 'Mono: replace the keyframe every N frames (1 = previous '
                                    'frame).', (1, 1000), config=True),
        Param('keyframe_min_matchable', 0.0, 'Mono: also replace the keyframe when the '
                                             'matchable pixel fraction falls below this.',
              (0.0, 1.0), config=True),
        Param('matchability_threshold', 0.5, 'Pixels at or above it count as matchable (the '
                                             'matchable fraction in diagnostics and for '
                                             'keyframe_min_matchable; the pose input has its '
                                             'own pose.matchability_threshold).', (0.0, 1.0),
              config=True),
        Param('estimate_pose', True, 'Estimate the relative pose (needs camera_info).',
              config=True),
        Param('min_image_side', 16, 'Refuse images with a smaller side.', (2, 100000),
              config=True),
        Param('max_image_pixels', 4096 * 4096, 'Refuse larger images (0: no limit).',
              (0, 2 ** 40), config=True),
        Param('mono16_max', 65535.0, 'mono16 value shown as white.', (1.0, 65535.0)),
        Param('max_rate', 0.0, 'Process at most this many frames (pairs) per second; 0: no '
                               'limit.', (0.0, 1000.0)),
        Param('threads', DEFAULT_THREADS, 'CPU threads for torch and OpenCV (0: the libraries '
                                          'own defaults, usually every core).', (0, 256),
              read_only=True),
        Param('retain_memory', True, 'Keep the memory a frame frees for the next one (glibc): '
                                     'no fresh pages per frame, 3-8 % less time per pair; the '
                                     'process keeps its peak memory.', read_only=True),
        Param('stamp_source', 'header', 'Frame time: the image header stamp, or (receipt) the '
                                        "node clock when the frame arrived, for drivers that "
                                        'leave header.stamp unset (mono mode).',
              constraints=', '.join(STAMP_SOURCES), read_only=True),
        Param('input_qos', 'auto', 'QoS of the image and camera_info subscriptions; auto: '
                                   'reliable when every publisher on the image topic(s) is '
                                   'reliable, else best effort, re-checked every second as '
                                   'publishers come and go.',
              constraints=', '.join(INPUT_QOS), read_only=True),
        Param('input_queue_depth', 1, 'History depth of the input subscriptions: the node '
                                       'only ever matches the newest frame, so deeper queues '
                                       'only hold stale frames (and their memory).', (1, 1000),
              read_only=True),
        Param('output_queue_depth', 1, 'History depth of the (reliable) output publishers: '
                                        'newest-value streams; raise it for subscribers on '
                                        'lossy links that need every message repaired.',
              (1, 1000), read_only=True),
        Param('synchronizer', 'auto', 'Pair mode: message_filters when importable (auto), or '
                                      'the built-in one with the same semantics.',
              constraints=', '.join(SYNCHRONIZERS), read_only=True),
        Param('sync_queue_size', 10, 'Pair mode: messages kept per camera while pairing.',
              (1, 1000), read_only=True),
        Param('sync_slop', 0.02, 'Pair mode: largest stamp difference of a pair, seconds.',
              (0.0, 10.0), read_only=True),
        Param('max_flow_color', 0.0, 'Flow magnitude (px) drawn fully saturated in flow_color; '
                                     '0: per image.', (0.0, 10000.0), config=True),
        Param('warn_throttle_s', 5.0, 'At most one warning per cause per this many seconds.',
              (0.0, 3600.0)),
        Param('diagnostics_period', 1.0, 'Seconds between /diagnostics messages.',
              (0.05, 3600.0), read_only=True),
    ]
    table += [Param(f'publish_{name}', True, f'Publish the {name} topic.') for name in OUTPUTS]
    for name, default in _pose.config_fields().items():
        if isinstance(default, tuple):
            default = [int(v) for v in default]
        if isinstance(default, (bool, int, float, str, list)):
            table.append(Param(f'{POSE_PREFIX}{name}', default,
                               f'core.geometry.pose.PoseConfig.{name}.', config=True))
    return table


def parse_method_options(value: str | dict) -> dict[str, Any]:
    """The ``method_options`` parameter: a YAML (or JSON) mapping given as a string, since a
    ROS parameter cannot hold a mapping; '' is no options. Keys go to ``load_matcher``."""
    if isinstance(value, dict):
        options = value
    else:
        import yaml
        try:
            options = yaml.safe_load(value) if str(value).strip() else {}
        except yaml.YAMLError as exc:
            raise ValueError(f'method_options is not YAML: {exc}') from None
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ValueError(f'method_options must be a mapping such as "{{refine: dis}}", '
                         f'got {value!r}')
    return dict(options)


def _pose_options(params: dict[str, Any]) -> dict[str, Any]:
    """PoseConfig fields from ``pose.*`` entries (lists back to tuples); others are ignored."""
    fields = _pose.config_fields()
    options = {}
    for key, value in params.items():
        name = key[len(POSE_PREFIX):] if key.startswith(POSE_PREFIX) else None
        if name in fields:
            options[name] = tuple(value) if isinstance(fields[name], tuple) else value
    return options


def pipeline_config_from_params(params: dict[str, Any]) -> PipelineConfig:
    """PipelineConfig from node parameter names and values (flat, ``pose.*`` included).

    The node builds its pipeline with this, and the offline replay calls it with the same
    params file, so both process with identical settings. Node-only names are ignored.
    """
    kwargs = {p.name: params[p.name] for p in parameter_table()
              if p.config and not p.name.startswith(POSE_PREFIX) and p.name in params}
    if 'method_options' in kwargs:
        kwargs['method_options'] = parse_method_options(kwargs['method_options'])
    kwargs['pose_options'] = _pose_options(params)
    return PipelineConfig(**kwargs)


@dataclasses.dataclass
class RuntimeChange:
    """What one set-parameters request does, validated before anything is applied."""

    model: dict[str, Any] | None
    """Keyword arguments of MatchPipeline.set_matcher; None: the model stays."""
    pipeline: dict[str, Any]
    """Keyword arguments of MatchPipeline.update (may be empty)."""
    node: dict[str, Any]
    """The node's own parameters among the changes."""


def runtime_change(changes: dict[str, Any], config: PipelineConfig) -> RuntimeChange:
    """Sort parameter ``changes`` by how they take effect, for a pipeline now at ``config``.

    Raises ValueError for a device that does not exist here, a missing weights file or
    method options that are not a mapping; the method name itself is checked where the
    model is built (MatchPipeline.set_matcher). Read-only and undeclared names never get
    here: ROS refuses them first.
    """
    table = {p.name: p for p in parameter_table()}
    if 'device' in changes:
        resolve_device(changes['device'])
    model = None
    if set(MODEL_FIELDS) & set(changes):
        weights = changes.get('weights', config.weights)
        if weights and not os.path.isfile(weights):
            raise ValueError(f'weights file {weights!r} does not exist')
        model = {'method': changes.get('method', config.method), 'weights': weights,
                 'device': changes.get('device'),
                 'options': (parse_method_options(changes['method_options'])
                             if 'method_options' in changes else None)}
    update = {k: v for k, v in changes.items() if k not in MODEL_FIELDS
              and k in table and table[k].config and not k.startswith(POSE_PREFIX)}
    pose = {k[len(POSE_PREFIX):]: v for k, v in changes.items() if k.startswith(POSE_PREFIX)}
    if pose:
        update['pose_options'] = {**config.pose_options, **_pose_options(
            {POSE_PREFIX + k: v for k, v in pose.items()})}
    node = {k: v for k, v in changes.items() if k in table and not table[k].config}
    return RuntimeChange(model, update, node)


def load_params(path: Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """ROS 2 params YAML (``node_name: ros__parameters: ...``) + ``key=value`` overrides.

    The first node section is used, nested keys are joined with '.' (``pose: {x: 1}`` is
    ``pose.x``); values of overrides are parsed as YAML scalars.
    """
    import yaml
    params: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        for section in data.values():
            if isinstance(section, dict) and 'ros__parameters' in section:
                params.update(_flatten(section['ros__parameters']))
                break
        else:
            raise ValueError(f'{path}: no "<node>: ros__parameters:" section')
    for item in overrides:
        key, sep, value = item.partition('=')
        if not sep:
            raise ValueError(f'expected key=value, got {item!r}')
        params[key.strip()] = yaml.safe_load(value)
    return params


def _flatten(d: dict, prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out
