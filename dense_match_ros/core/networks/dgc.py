"""DGC-Net and DGC+M-Net (Melekhov et al., WACV 2019): coarse-to-fine dense correspondence.

Structure (for a 240x240 input; every size scales with the input):

1. one VGG-16 trunk (:mod:`.backbone`) gives a five-level pyramid for each image:
   15 (pool4), 30 (conv4), 60 (conv3), 120 (conv2) and 240 px (conv1);
2. at 15 px, a *global* correlation between the L2-normalised source and target features,
   followed by ReLU and L2 normalisation over the target axis (:mod:`.correlation`);
3. a correspondence-map decoder per level (five conv-BN-ReLU blocks and a 3x3 head; the
   blocks are dilated from the 60 px level down, as in the authors' released decoders, so
   the receptive field keeps up with the growing resolution) predicts an absolute sampling
   grid; from 30 px on, the previous grid is upsampled, warps the target features onto the
   source grid, and the decoder sees [source features, warped target features, grid];
4. DGC+M-Net adds a matchability decoder (four conv layers, sigmoid) on the finest level.

Direction. Our flow lives on the SOURCE grid and points into the TARGET, so every grid here
is defined on the source grid and gives, per source pixel, where to sample the TARGET
(``grid_sample(target, grid)`` ~= source). The paper states the same network with the roles
named the other way round (its grid lives on its "target" and samples its "source"); only
the names differ. Grids are normalised with ``align_corners=False`` (:mod:`core.geometry.grid`),
channel 0 = x, which is what makes upsampling a grid a plain bilinear resize.

Deviations from the paper, each for a stated reason:

* the decoders from 30 px on predict the grid as the upsampled previous grid plus a
  correction (``residual=True``). The output is still the absolute grid the loss sees, but
  a network trained from scratch (no ImageNet weights here) learns a correction much
  faster than a re-derivation of the full coordinates; ``residual=False`` is the paper;
* inputs of another size than the trained one: the coarsest level always runs on both
  images resized to the trained size, and only the finer levels run at the input's own
  size. The coarsest decoder turns a correlation volume whose channels are the target
  positions into absolute coordinates; its convolutions also learn where they are from
  the zero padding, so on a larger grid (or on target features pooled to the trained
  grid) even identical images come out tens of pixels off. Normalised grids do not
  depend on resolution, so the trained-size coarse grid upsamples straight into the
  larger pyramid, whose decoders only correct it locally;
* the matchability decoder warps the finest target features with the *final* grid
  (detached: matchability should judge the flow, not bend it).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dense_match_ros.core.networks.backbone import VGGBackbone, VGGConfig, level_channels
from dense_match_ros.core.networks.correlation import global_correlation, normalize_correlation

# Coarse to fine: the backbone levels the decoders run on.
PYRAMID = ('pool4', 'conv4', 'conv3', 'conv2', 'conv1')
# Five conv-BN-ReLU blocks per decoder; channels before the width multiplier.
DECODER_CHANNELS = (128, 128, 96, 64, 32)
# Dilation of each block per level: none at 15 and 30 px, growing from 60 px down (the
# rates of the authors' 60/120/240 decoders, led by an undilated block).
DILATIONS = {
    'pool4': (1, 1, 1, 1, 1),
    'conv4': (1, 1, 1, 1, 1),
    'conv3': (1, 1, 2, 3, 4),
    'conv2': (1, 1, 4, 6, 8),
    'conv1': (1, 1, 4, 12, 16),
}
MATCHABILITY_CHANNELS = (64, 32, 16)


@dataclasses.dataclass
class DgcNetConfig:
    """Architecture of :class:`DgcNet` (stored in checkpoints; plain types only)."""

    width: float = 1.0
    """Backbone channel multiplier (1.0: VGG-16's 64-128-256-512)."""
    decoder_width: float | None = None
    """Decoder channel multiplier; None: the same as ``width``."""
    batch_norm: bool = True
    """BatchNorm in the backbone (from-scratch training needs it)."""
    input_size: tuple[int, int] = (240, 240)
    """(H, W) the network is trained at; sets the correlation size (input / 16)."""
    matchability: bool = True
    """Build the matchability decoder (DGC+M-Net)."""
    residual: bool = True
    """Decoders from 30 px on predict a correction to the upsampled grid (see module doc)."""


class DgcOutput(NamedTuple):
    grids: list[torch.Tensor]
    """(B, 2, h, w) per pyramid level, coarse to fine: normalised target coordinates on the
    source grid (channel 0 = x)."""
    matchability: torch.Tensor | None
    """(B, 1, H, W) matchability *logits* at the finest level (sigmoid -> probability)."""


def conv_block(in_ch: int, out_ch: int, dilation: int = 1) -> nn.Sequential:
    """3x3 conv-BN-ReLU, 'same' padding whatever the dilation."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True))


class CorrespondenceDecoder(nn.Module):
    """Five conv-BN-ReLU blocks and a 3x3 head with two outputs (grid x, y)."""

    def __init__(self, in_ch: int, channels: Sequence[int], dilations: Sequence[int]) -> None:
        super().__init__()
        blocks = []
        for out_ch, d in zip(channels, dilations):
            blocks.append(conv_block(in_ch, out_ch, d))
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(in_ch, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class MatchabilityDecoder(nn.Module):
    """Three conv-BN-ReLU layers and a 1x1 conv: one logit per source pixel."""

    def __init__(self, in_ch: int, channels: Sequence[int]) -> None:
        super().__init__()
        layers = []
        for out_ch in channels:
            layers.append(conv_block(in_ch, out_ch))
            in_ch = out_ch
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Conv2d(in_ch, 1, 1)

    def forward(self, source_feat: torch.Tensor, warped_target_feat: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.cat([source_feat, warped_target_feat], dim=1)))


def upsample_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (B, 2, h, w) normalised grid to ``size`` (H, W).

    Normalised coordinates do not depend on the resolution, so under align_corners=False
    a bilinear resize of the grid *is* the grid of the finer level (no rescaling of values).
    """
    return F.interpolate(grid, size=size, mode='bilinear', align_corners=False)


def warp_features(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample target ``features`` (B, C, Ht, Wt) at a (B, 2, h, w) grid: (B, C, h, w).

    Sampled in float32 whatever the features' dtype: a bf16 grid resolves only ~1/256 of
    the image (half a pixel at 240 px), which would cap the precision of every level.
    """
    out = F.grid_sample(features.float(), grid.float().permute(0, 2, 3, 1), mode='bilinear',
                        padding_mode='zeros', align_corners=False)
    return out.to(features.dtype)


def _scaled(channels: Sequence[int], width: float) -> list[int]:
    return [max(8, round(c * width)) for c in channels]


class DgcNet(nn.Module):
    """DGC-Net (``matchability=False``) or DGC+M-Net: source, target -> grids, matchability."""

    def __init__(self, config: DgcNetConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or DgcNetConfig()
        h, w = c.input_size
        if h < 32 or w < 32 or h % 16 or w % 16:
            raise ValueError(f'input_size must be multiples of 16, at least 32, got {c.input_size}')
        self.corr_size = (h // 16, w // 16)
        self.backbone = VGGBackbone(VGGConfig(width=c.width, batch_norm=c.batch_norm))
        feat = level_channels(c.width)
        dec_channels = _scaled(DECODER_CHANNELS, c.width if c.decoder_width is None else c.decoder_width)
        decoders = {'pool4': CorrespondenceDecoder(self.corr_size[0] * self.corr_size[1],
                                                   dec_channels, DILATIONS['pool4'])}
        for level in PYRAMID[1:]:
            decoders[level] = CorrespondenceDecoder(2 * feat[level] + 2, dec_channels, DILATIONS[level])
        self.decoders = nn.ModuleDict(decoders)
        self.matchability = (MatchabilityDecoder(2 * feat['conv1'],
                                                 _scaled(MATCHABILITY_CHANNELS, dec_channels[0] / 128))
                             if c.matchability else None)
        self.frozen_backbone = False
        self._init_decoders()

    def _init_decoders(self) -> None:
        for name, m in self.named_modules():
            if name.startswith('backbone'):
                continue  # the backbone initialises itself
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Heads start at zero: the coarsest grid at the image centre (not at random
        # coordinates tens of pixels off), and an untrained refinement passes its input on.
        for decoder in self.decoders.values():
            nn.init.zeros_(decoder.head.weight)

    # ------------------------------------------------------------------ backbone freezing

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Stop training the backbone (weights and BatchNorm statistics)."""
        self.frozen_backbone = bool(frozen)
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> 'DgcNet':
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()  # frozen means frozen BatchNorm statistics too
        return self

    # ------------------------------------------------------------------ forward

    def coarse_correlation(self, source_feat: torch.Tensor, target_feat: torch.Tensor) -> torch.Tensor:
        """ReLU + L2-normalised global correlation of the coarsest features."""
        source_feat = F.normalize(source_feat, dim=1)
        target_feat = F.normalize(target_feat, dim=1)
        return normalize_correlation(global_correlation(source_feat, target_feat))

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> DgcOutput:
        """``source``, ``target``: RGB (B, 3, H, W) in [0, 1] (sizes may differ, each >= 32)."""
        b = source.shape[0]
        if source.shape[-2:] == target.shape[-2:]:
            # One pass, so BatchNorm sees both images with the same statistics.
            both = self.backbone(torch.cat([source, target], dim=0), levels=PYRAMID)
            src = {lv: f[:b] for lv, f in both.items()}
            tgt = {lv: f[b:] for lv, f in both.items()}
        else:
            src = self.backbone(source, levels=PYRAMID)
            tgt = self.backbone(target, levels=PYRAMID)

        trained = tuple(self.config.input_size)
        if tuple(source.shape[-2:]) == trained and tuple(target.shape[-2:]) == trained:
            coarse_src, coarse_tgt = src['pool4'], tgt['pool4']
        else:  # see the module doc: the coarsest level only works at the trained size
            small = torch.cat([F.interpolate(x, size=trained, mode='bilinear', align_corners=False,
                                             antialias=True) for x in (source, target)], dim=0)
            coarse = self.backbone(small, levels=('pool4',))['pool4']
            coarse_src, coarse_tgt = coarse[:b], coarse[b:]
        corr = self.coarse_correlation(coarse_src, coarse_tgt)
        # Grids stay float32 under autocast / half weights (see warp_features).
        grid = self.decoders['pool4'](corr).float()
        grids = [grid]
        for level in PYRAMID[1:]:
            up = upsample_grid(grid, tuple(src[level].shape[-2:]))
            warped = warp_features(tgt[level], up)
            out = self.decoders[level](torch.cat([src[level], warped, up.to(warped.dtype)], dim=1)).float()
            grid = up + out if self.config.residual else out
            grids.append(grid)

        matchability = None
        if self.matchability is not None:
            warped = warp_features(tgt['conv1'], grid.detach())
            matchability = self.matchability(src['conv1'], warped)
        return DgcOutput(grids, matchability)


def config_from_dict(values: dict) -> DgcNetConfig:
    """Rebuild a config from a checkpoint's dict, ignoring keys it does not know
    (training-only keys such as the backbone initialisation live beside it)."""
    names = {f.name for f in dataclasses.fields(DgcNetConfig)}
    kwargs = {k: v for k, v in values.items() if k in names}
    if 'input_size' in kwargs:
        kwargs['input_size'] = tuple(int(v) for v in kwargs['input_size'])
    return DgcNetConfig(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
