"""An untrained HOG-like pixel descriptor: DeepMatching's own (the paper's DM-HOG baseline).

Why it exists: the trained descriptor has to beat something that needs no training at all,
and DeepMatching's pyramid was designed around exactly this descriptor. Per pixel it holds
the image gradient projected on eight orientations (rectified, so each bin is one-sided),
smoothed so a pixel sees its neighbourhood, squashed so one strong edge does not swamp the
rest, plus a small constant channel so flat regions still compare as alike rather than as
undefined; then it is L2-normalised, which makes the dot product of two descriptors a cosine
in [0, 1] (every channel is non-negative), the scale the pyramid's rectification expects.

Written as fixed torch operations (no parameters), so it runs in the same batched graph as
the trained descriptor, at the same stride.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ORIENTATIONS = 8


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class HogDescriptor(nn.Module):
    """Per-pixel oriented-gradient descriptor, (B, 3, H, W) in [0, 1] -> (B, 9, H/s, W/s)."""

    def __init__(self, stride: int = 2, presmooth: float = 1.0, bin_smooth: float = 1.5,
                 squash: float = 0.2, flat: float = 0.1) -> None:
        super().__init__()
        self.stride = int(stride)
        self.squash = float(squash)
        self.flat = float(flat)
        self.register_buffer('pre', _gaussian_kernel(presmooth), persistent=False)
        self.register_buffer('post', _gaussian_kernel(bin_smooth), persistent=False)
        angles = torch.arange(ORIENTATIONS, dtype=torch.float32) * (2 * math.pi / ORIENTATIONS)
        self.register_buffer('directions', torch.stack([angles.cos(), angles.sin()], -1),
                             persistent=False)
        self.register_buffer('grey', torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def channels(self) -> int:
        return ORIENTATIONS + 1

    @staticmethod
    def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian, replicate-padded (no dark frame at the borders)."""
        c, r = x.shape[1], kernel.numel() // 2
        kx = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1).to(x.dtype)
        ky = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1).to(x.dtype)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode='replicate'), kx, groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode='replicate'), ky, groups=c)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.float() * self.grey).sum(1, keepdim=True) * 255.0
        x = self._blur(x, self.pre)
        padded = F.pad(x, (1, 1, 1, 1), mode='replicate')
        gx = 0.5 * (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2])
        gy = 0.5 * (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1])
        d = self.directions.to(x.dtype)
        bins = F.relu(gx * d[:, 0].view(1, -1, 1, 1) + gy * d[:, 1].view(1, -1, 1, 1))
        bins = self._blur(bins, self.post)
        if self.stride > 1:
            bins = F.avg_pool2d(bins, self.stride, self.stride)
        # A saturating squash: strong and weak edges both count, neither dominates.
        bins = 2.0 / (1.0 + torch.exp(-self.squash * bins)) - 1.0
        flat = torch.full_like(bins[:, :1], self.flat)
        return F.normalize(torch.cat([bins, flat], 1), dim=1)
