"""Finding and loading the checkpoints of learned methods: one helper, parameterised by method.

Shipped checkpoints live in ``dense_match_ros/weights/<method>_<variant>.pt`` with a JSON
record beside them; :mod:`dense_match_ros.core.checkpoint` reads them (checksum,
``torch.load(weights_only=True)``). Without pretrained weights anywhere, the only way to get
a checkpoint is this project's own training code, so a missing one is reported with the
command that trains it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import torch

from dense_match_ros.core.checkpoint import load_weights

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / 'weights'
VARIANTS = ('gpu', 'cpu')  # searched in this order when no variant is named


@dataclasses.dataclass
class LearnedWeights:
    """Where a learned method's checkpoints are and how to turn one into its network."""

    method: str
    build: Callable[[dict], torch.nn.Module]
    """Network from the checkpoint's model config."""
    train_hint: str
    """The command that trains and exports a checkpoint (named when none is found)."""
    directory: Path = WEIGHTS_DIR
    """Shipped checkpoints' folder (an attribute, so tests can point it elsewhere)."""
    variants: Sequence[str] = VARIANTS

    def shipped(self, variant: str | None = None) -> Path:
        """The shipped checkpoint of the named variant, else the best one present."""
        names = [variant] if variant else list(self.variants)
        for name in names:
            path = Path(self.directory) / f'{self.method}_{name}.pt'
            if path.is_file():
                return path
        raise FileNotFoundError(
            f'no shipped {self.method} checkpoint '
            f'({", ".join(f"{self.method}_{n}.pt" for n in names)}) in {self.directory}; train '
            f'and export one with:  {self.train_hint}  -- or pass weights=PATH')

    def load(self, weights: str | Path, device: str = 'cpu') -> tuple[torch.nn.Module, dict]:
        """The network of a checkpoint (shipped, or a run's last.pt) in eval mode, and its record."""
        model_config, state, record = load_weights(weights, self.method)
        net = self.build(model_config)
        net.load_state_dict(state)
        return net.to(device).eval(), record

    def network_for(self, net: torch.nn.Module | None, weights: str | Path | None,
                    variant: str | None, device: str
                    ) -> tuple[torch.nn.Module, dict, str | None]:
        """(network in eval mode on ``device``, checkpoint record, checkpoint path).

        ``net`` is an in-memory network (tests, analysis scripts); otherwise ``weights`` or
        the shipped checkpoint of ``variant`` is loaded.
        """
        if net is not None:
            return net.to(device).eval(), {}, None
        path = Path(weights) if weights else self.shipped(variant)
        net, record = self.load(path, device)
        return net, record, str(path)
