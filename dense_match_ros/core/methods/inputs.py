"""The strict input rules of the network methods that name each rule in a ValueError.

The registry's own check (:meth:`core.registry.Matcher.match`) accepts grey images and any
size from 2 px; methods whose networks need colour and a minimum size (a correlation cell,
a top-level patch) refuse the rest here, before anything runs, with the rule in the message.
"""
from __future__ import annotations

import numpy as np


def check_rgb(image: np.ndarray, what: str, min_side: int) -> None:
    """Raise ValueError unless ``image`` is uint8 HxWx3 with both sides >= ``min_side``."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f'{what} image must be uint8 RGB (0-255), got dtype {image.dtype}')
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'{what} image must be HxWx3 RGB, got shape {image.shape}')
    if min(image.shape[:2]) < min_side:
        raise ValueError(f'{what} image must be at least {min_side} px a side, got '
                         f'{image.shape[1]}x{image.shape[0]}')
