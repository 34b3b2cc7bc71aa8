"""HiLM's two-level descriptor network: one VGG-16 trunk, a shallow and a deep embedding.

HiLM (Fathy et al., ECCV 2018) supervises a metric at a shallow layer (precise, local) and
at a deep layer (invariant, large receptive field) of the same CNN, then matches coarse to
fine through them. Here the shallow level is VGG's conv2_2 (stride 2) and the deep level
conv4_3 (stride 8); each gets a learned 1x1 embedding head and L2 normalisation, so that
squared distances lie in [0, 4] and the contrastive margin has a fixed meaning.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from dense_match_ros.core.networks.backbone import STRIDES, VGGBackbone, VGGConfig, level_channels


@dataclasses.dataclass
class HilmNetConfig:
    """Architecture of :class:`HilmNet` (stored in checkpoints; plain types only)."""

    width: float = 0.25
    batch_norm: bool = True
    shallow_level: str = 'conv2'
    deep_level: str = 'conv4'
    shallow_dim: int = 32
    deep_dim: int = 64


class HilmNet(nn.Module):
    """Backbone + per-level embedding heads; returns L2-normalised descriptor maps."""

    def __init__(self, config: HilmNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or HilmNetConfig()
        c = self.config
        self.backbone = VGGBackbone(VGGConfig(width=c.width, batch_norm=c.batch_norm))
        chans = level_channels(c.width)
        self.shallow_head = nn.Conv2d(chans[c.shallow_level], c.shallow_dim, 1)
        self.deep_head = nn.Conv2d(chans[c.deep_level], c.deep_dim, 1)

    @property
    def shallow_stride(self) -> int:
        return STRIDES[self.config.shallow_level]

    @property
    def deep_stride(self) -> int:
        return STRIDES[self.config.deep_level]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shallow, deep) descriptor maps of an RGB [0, 1] batch (B, 3, H, W)."""
        feats = self.backbone(image, levels=(self.config.shallow_level, self.config.deep_level))
        shallow = F.normalize(self.shallow_head(feats[self.config.shallow_level]), dim=1)
        deep = F.normalize(self.deep_head(feats[self.config.deep_level]), dim=1)
        return shallow, deep


def config_from_dict(values: dict) -> HilmNetConfig:
    """Rebuild a config from a checkpoint's dict, ignoring keys a newer version dropped."""
    names = {f.name for f in dataclasses.fields(HilmNetConfig)}
    return HilmNetConfig(**{k: v for k, v in values.items() if k in names})
