"""One place that maps an image to a network's grid and a flow back from it.

Networks with strided stages need sides that are multiples of their total stride. Padding
(replicated border, bottom and right only) keeps every pixel where it was, so a flow on the
padded grid is the flow of the original pixels after cropping: no coordinate change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class InputPadder:
    """Pads (B, C, H, W) tensors to multiples of ``multiple`` and crops results back."""

    def __init__(self, height: int, width: int, multiple: int = 16) -> None:
        self.height, self.width = int(height), int(width)
        self.pad_h = (-self.height) % multiple
        self.pad_w = (-self.width) % multiple

    def pad(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if not (self.pad_h or self.pad_w):
            return list(tensors)
        return [F.pad(t, (0, self.pad_w, 0, self.pad_h), mode='replicate') for t in tensors]

    def unpad(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[..., :self.height, :self.width]
