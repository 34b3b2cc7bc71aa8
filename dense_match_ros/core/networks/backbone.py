"""The VGG-16 layout up to pool4, the feature extractor all the founding papers share.

No ImageNet weights can be had here, so the network is always built from random
initialisation and trained in this package; a ``width`` multiplier makes the same layout
affordable on a CPU (width 0.25 has 1/16 of the multiply-adds of the full network).

Levels (stride relative to the input), named after the VGG layer that produces them:

=======  ======  ===============================================
name     stride  layer
=======  ======  ===============================================
conv1    1       conv1_2 (full resolution)
conv2    2       conv2_2 (after pool1) -- HiLM's shallow level
conv3    4       conv3_3 (after pool2)
conv4    8       conv4_3 (after pool3) -- HiLM's deep level
pool4    16      pool4
=======  ======  ===============================================

Inputs are RGB float tensors in [0, 1]; a fixed per-channel normalisation is applied
inside so callers never have to agree on one.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

LEVELS = ('conv1', 'conv2', 'conv3', 'conv4', 'pool4')
STRIDES = {'conv1': 1, 'conv2': 2, 'conv3': 4, 'conv4': 8, 'pool4': 16}
_VGG_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3))  # (channels, convs) per block
# ImageNet statistics: a neutral choice for natural photos, kept fixed (not learned).
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class VGGConfig:
    """Shape of the backbone; stored in every checkpoint so it can be rebuilt exactly."""

    width: float = 1.0
    """Channel multiplier of every layer (1.0 is VGG-16's 64-128-256-512)."""
    batch_norm: bool = False
    """BatchNorm after each conv (VGG-16-BN); helps training from scratch."""


def level_channels(width: float) -> dict[str, int]:
    """Channels of each level for a width multiplier."""
    chans = [max(1, round(c * width)) for c, _ in _VGG_BLOCKS]
    return {'conv1': chans[0], 'conv2': chans[1], 'conv3': chans[2],
            'conv4': chans[3], 'pool4': chans[3]}


class VGGBackbone(nn.Module):
    """VGG-16 conv1_1 .. pool4 returning the five feature levels as a dict."""

    def __init__(self, config: VGGConfig | None = None) -> None:
        super().__init__()
        self.config = config or VGGConfig()
        if self.config.width <= 0:
            raise ValueError(f'width must be positive, got {self.config.width}')
        self.channels = level_channels(self.config.width)
        self.register_buffer('mean', torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        blocks = []
        in_ch = 3
        for (base, n_convs) in _VGG_BLOCKS:
            out_ch = max(1, round(base * self.config.width))
            layers: list[nn.Module] = []
            for _ in range(n_convs):
                layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not self.config.batch_norm))
                if self.config.batch_norm:
                    layers.append(nn.BatchNorm2d(out_ch))
                layers.append(nn.ReLU(inplace=True))
                in_ch = out_ch
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2, 2)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation for ReLU nets: training from scratch needs it to start well.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, image: torch.Tensor, levels: tuple[str, ...] = LEVELS) -> dict[str, torch.Tensor]:
        """Features of ``image`` (B, 3, H, W) in [0, 1] at the requested levels.

        Stops after the deepest level asked for, so a caller that needs only conv2 pays
        only for two blocks. Odd sizes are floored by each pooling (as in VGG).
        """
        unknown = set(levels) - set(LEVELS)
        if unknown:
            raise ValueError(f'unknown levels {sorted(unknown)}; choose from {LEVELS}')
        deepest = max(LEVELS.index(lv) for lv in levels)
        x = (image - self.mean) / self.std
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            out[LEVELS[i]] = x
            if i >= deepest:
                break
        if deepest == 4:
            out['pool4'] = self.pool(x)
        return {lv: out[lv] for lv in levels}
