"""The registry of trainable methods.

A task bundles what differs between methods: its network (built from a config dict), the
extra per-batch inputs it needs drawn from the batch's own RNG (so resumes stay exact),
and its loss. The loop in :mod:`.loop` knows nothing else about any method.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from dense_match_ros.core.registry import resolve_lazy


class TrainTask(abc.ABC):
    """How to train one method."""

    name: str = ''

    @abc.abstractmethod
    def build_model(self, model_config: dict) -> nn.Module:
        """The network, from the ``model`` section of the config (defaults filled in)."""

    def model_config(self, values: dict) -> dict:
        """The full model config (defaults filled in, unknown keys rejected)."""
        return dict(values)

    def loss_config(self, values: dict) -> dict:
        """The full loss config (defaults filled in, unknown keys rejected)."""
        return dict(values)

    def extra_batch(self, pairs: list, rng: np.random.Generator, loss_config: dict) -> dict:
        """Task-specific batch entries (numpy), drawn from the batch's own generator."""
        return {}

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             loss_config: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss to minimise, floats to log) for one batch on the model's device."""


def fill(cls: type, values: dict, what: str) -> Any:
    """``cls(**values)`` for a config dataclass; a key that is not a field is an error (a typo
    must not train something else). Lists become tuples where the field default is one."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f'unknown {what} keys: {sorted(unknown)}')
    return cls(**{k: tuple(v) if isinstance(v, list) and isinstance(fields[k].default, tuple) else v
                  for k, v in values.items()})


def split_model(values: dict, cls: type, training_keys: Sequence[str], what: str) -> tuple[dict, dict]:
    """(architecture keys of ``cls``, training-only keys) of a model section; others are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names - set(training_keys)
    if unknown:
        raise ValueError(f'unknown {what} keys: {sorted(unknown)}')
    return ({k: v for k, v in values.items() if k in names},
            {k: v for k, v in values.items() if k in training_keys})


_TASKS: dict[str, Any] = {
    'hilm': 'dense_match_ros.training.hilm_task:HilmTask',
    'dgc': 'dense_match_ros.training.dgc_task:DgcTask',
    'neuflow': 'dense_match_ros.training.neuflow_task:NeuFlowTask',
    'cnngeo-affine': 'dense_match_ros.training.cnngeo_task:CnnGeoAffineTask',
    'cnngeo-tps': 'dense_match_ros.training.cnngeo_task:CnnGeoTpsTask',
    'deepmatching': 'dense_match_ros.training.deepmatching_task:DeepMatchingTask',
    'dmp': 'dense_match_ros.training.dmp_task:DmpTask',
}


def register_task(name: str, task: type[TrainTask] | str) -> None:
    """Make ``dense-match-train NAME`` train ``task`` (a class or 'module:Class')."""
    _TASKS[name] = task


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> TrainTask:
    if name not in _TASKS:
        raise KeyError(f'no training task {name!r}; available: {", ".join(available_tasks())}')
    return resolve_lazy(_TASKS[name])()
