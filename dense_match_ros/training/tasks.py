"""The registry of trainable methods.

A task bundles what differs between methods: its network (built from a config dict), the
extra per-batch inputs it needs drawn from the batch's own RNG (so resumes stay exact),
and its loss. The loop in :mod:`.loop` knows nothing else about any method.
"""
from __future__ import annotations

import abc
from typing import Any

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


_TASKS: dict[str, Any] = {
    'hilm': 'dense_match_ros.training.hilm_task:HilmTask',
    'dgc': 'dense_match_ros.training.dgc_task:DgcTask',
    'neuflow': 'dense_match_ros.training.neuflow_task:NeuFlowTask',
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
