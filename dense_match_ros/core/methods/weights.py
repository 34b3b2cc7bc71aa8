"""Finding and loading the checkpoints of learned methods, shared by all of them.

Shipped checkpoints live in ``dense_match_ros/weights/<method>_<variant>.pt`` with a JSON
record beside them; :mod:`dense_match_ros.core.checkpoint` reads them (checksum,
``torch.load(weights_only=True)``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from dense_match_ros.core.checkpoint import load_weights

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / 'weights'
VARIANTS = ('gpu', 'cpu')  # searched in this order when no variant is named


def find_shipped(method: str, variant: str | None, directory: Path, train_hint: str,
                 variants: Sequence[str] = VARIANTS) -> Path:
    """The shipped checkpoint of ``method`` (the named variant, else the best one present).

    The error names the command that trains one: without pretrained weights anywhere, the
    only way to get a checkpoint is this project's own training code.
    """
    names = [variant] if variant else list(variants)
    for name in names:
        path = Path(directory) / f'{method}_{name}.pt'
        if path.is_file():
            return path
    raise FileNotFoundError(
        f'no shipped {method} checkpoint ({", ".join(f"{method}_{n}.pt" for n in names)}) in '
        f'{directory}; train and export one with:  {train_hint}  -- or pass weights=PATH')


def load_network(weights: str | Path, method: str, build: Callable[[dict], torch.nn.Module],
                 device: str = 'cpu') -> tuple[torch.nn.Module, dict]:
    """The network of a checkpoint (shipped, or a run's last.pt) in eval mode, and its record."""
    model_config, state, record = load_weights(weights, method)
    net = build(model_config)
    net.load_state_dict(state)
    return net.to(device).eval(), record


def network_for(net: torch.nn.Module | None, weights: str | Path | None, variant: str | None,
                device: str, shipped: Callable[[str | None], Path],
                load: Callable[[Path, str], tuple[torch.nn.Module, dict]]
                ) -> tuple[torch.nn.Module, dict, str | None]:
    """(network in eval mode on ``device``, checkpoint record, checkpoint path) for a matcher.

    ``net`` is an in-memory network (tests, analysis scripts); otherwise ``weights`` or the
    shipped checkpoint (``shipped(variant)``) is loaded with ``load(path, device)``.
    """
    if net is not None:
        return net.to(device).eval(), {}, None
    path = Path(weights) if weights else shipped(variant)
    net, record = load(path, device)
    return net, record, str(path)
