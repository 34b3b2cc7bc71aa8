"""Training configuration: dataclasses that round-trip through YAML and ``--set`` overrides.

The whole resolved config is written into every checkpoint and log, so that a shipped
checkpoint says exactly what produced it. The method-specific parts (``model``, ``loss``)
stay plain dicts here and are turned into the task's own dataclasses by the task.

PyYAML is imported only when a file or an override is read, and is optional: without it
(the bare GPU machine) a config file is read as JSON after dropping its ``#`` comment lines
(``config/train_dgc_gpu.yaml`` is written that way) and ``--set`` values as JSON, else as
plain strings.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02
    grad_clip: float = 5.0
    """Max global gradient norm (0 disables clipping)."""


@dataclasses.dataclass
class DataConfig:
    """Synthetic pairs from real photos (never the evaluation sets)."""

    image_size: tuple[int, int] = (128, 128)
    """(H, W) of each training image."""
    kinds: tuple[str, ...] = ('affine', 'tps', 'homography')
    photos: list[str] | None = None
    """Photo folders; None: the default search (../shared/train_images, OpenCV, skimage)."""
    photo_short_side: int = 256
    """Photos are decoded once at this short side and cached (keeps the CPU on training)."""
    photometric: bool = True
    crop_scale: tuple[float, float] = (0.5, 0.9)
    workers: int = 0
    """DataLoader worker processes (0: make batches in the training process)."""
    kind_weights: list[float] | None = None
    """Relative frequency of each of ``kinds`` (None: uniform)."""
    objects: float = 0.0
    """Probability that a pair carries independently moving objects (data.moving_objects)."""
    ranges: str = 'default'
    """Affine and TPS ranges, a name of :data:`data.synthetic.RANGES` ('default' or 'paper',
    CNNGeo's wider text ranges); the 'cpu' sampler only."""
    sampler: str = 'cpu'
    """Where pairs are made: 'cpu' (data.synthetic, ``workers`` loader processes) or
    'device' (training/gpu_pairs.py on the training device, ~20x faster on a GPU; photos
    decoded once at ``photo_short_side`` squared; no ``kind_weights``/``objects``)."""
    gpu_pairs: dict = dataclasses.field(default_factory=dict)
    """Further GpuPairConfig ranges for the 'device' sampler (rotation_deg, scale, ...)."""


@dataclasses.dataclass
class TrainConfig:
    method: str = 'hilm'
    seed: int = 0
    steps: int = 1000
    """Steps of the schedule (the run's end unless ``minutes`` comes first)."""
    minutes: float = 0.0
    """Wall-clock budget; > 0: the run ends when it is spent (time of earlier sessions of the
    run included) and the rate follows a cosine over it instead of over ``steps``."""
    batch_size: int = 8
    """Pairs per step per process (DDP multiplies it by the world size)."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: dict = dataclasses.field(default_factory=dict)
    loss: dict = dataclasses.field(default_factory=dict)
    amp: bool = True
    """Mixed precision where the hardware has it: bf16 (fp16 on older GPUs) on CUDA, bf16
    on CPUs with AVX-512 BF16 or AMX (core.device.autocast_dtype); fp32 elsewhere."""
    channels_last: bool = True
    """Train in the channels-last memory layout (faster convolutions on CPU and GPU)."""
    compile: bool = False
    """torch.compile the model (about a minute of compilation; pays on long GPU runs)."""
    threads: int = 0
    """torch intra-op threads on CPU (0: leave torch's default)."""
    log_every: int = 10
    checkpoint_every: int = 200
    """Save the resumable checkpoint every N steps ..."""
    checkpoint_minutes: float = 5.0
    """... and at least every M minutes of wall time."""

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f'unknown config keys in {where}: {sorted(unknown)}')
    kwargs = {}
    for name, value in values.items():
        sub = {'optim': OptimConfig, 'data': DataConfig}.get(name) if cls is TrainConfig else None
        if sub is not None:
            value = _build(sub, value or {}, f'{where}.{name}')
        elif isinstance(value, list) and isinstance(fields[name].default, tuple):
            value = tuple(value)
        elif isinstance(fields[name].default, float) and isinstance(value, (str, int)) \
                and not isinstance(value, bool):
            # YAML 1.1 reads '5e-4' (no dot) as a string; a float field means a float.
            value = float(value)
        kwargs[name] = value
    return cls(**kwargs)


def from_dict(values: dict) -> TrainConfig:
    """TrainConfig from a nested dict (unknown keys are an error: typos must not pass)."""
    values = dict(values or {})
    for key in ('image_size', 'kinds', 'crop_scale'):
        if key in values.get('data', {}) and isinstance(values['data'][key], list):
            values['data'] = dict(values['data'], **{key: tuple(values['data'][key])})
    if 'optim' in values and isinstance(values['optim'].get('betas'), list):
        values['optim'] = dict(values['optim'], betas=tuple(values['optim']['betas']))
    return _build(TrainConfig, values, 'config')


def _parse(text: str, strict: bool = True) -> Any:
    """YAML with PyYAML; without it JSON minus '#' comment lines (or, not ``strict``, the
    text itself where it is not JSON: a path, a name)."""
    try:
        import yaml
    except ImportError:
        body = '\n'.join(line for line in text.splitlines() if not line.lstrip().startswith('#'))
        try:
            return json.loads(body) if body.strip() else None
        except json.JSONDecodeError:
            if strict:
                raise
            return text
    return yaml.safe_load(text)


def load_yaml(path: str | Path) -> dict:
    """A training config file: YAML, or JSON with '#' comment lines where PyYAML is missing."""
    values = _parse(Path(path).read_text(encoding='utf-8')) or {}
    if not isinstance(values, dict):
        raise ValueError(f'{path}: a training config must be a mapping')
    return values


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings (value parsed as YAML, see :func:`_parse`) in order."""
    values = _plain(values)
    for item in overrides or []:
        key, sep, raw = item.partition('=')
        if not sep or not key:
            raise ValueError(f'override must look like key.sub=value, got {item!r}')
        node = values
        parts = key.split('.')
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f'override {item!r}: {part} is not a section')
        node[parts[-1]] = _parse(raw, strict=False)
    return values
