"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` is one convolution
with scaled weights and a shifted bias, exact up to rounding. On a CPU the separate
normalisation pass is a memory-bound sweep over every activation (about a fifth of a VGG
trunk's time, and of ``neuflow``'s encoder), which folding removes. A folded module has no
statistics left, so it can no longer be trained.
"""
from __future__ import annotations

import torch
from torch import nn


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One convolution computing ``bn(conv(x))`` of an eval-mode BatchNorm."""
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True)
    bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros_like(scale)
    with torch.no_grad():
        fused.weight.copy_(conv.weight.detach().float() * scale[:, None, None, None])
        fused.bias.copy_((bias - bn.running_mean.float()) * scale + bn.bias.detach().float())
    return fused.to(conv.weight.device)


def fold_sequential(module: nn.Sequential) -> int:
    """Fold, in place, every Conv2d directly followed by a BatchNorm2d in ``module``'s own
    children; returns how many pairs were folded."""
    layers = list(module)
    kept: list[nn.Module] = []
    folded = i = 0
    while i < len(layers):
        layer = layers[i]
        if (isinstance(layer, nn.Conv2d) and i + 1 < len(layers)
                and isinstance(layers[i + 1], nn.BatchNorm2d)):
            kept.append(fold_conv_bn(layer, layers[i + 1]))
            folded += 1
            i += 2
        else:
            kept.append(layer)
            i += 1
    for name in list(module._modules):
        del module._modules[name]
    for j, layer in enumerate(kept):
        module.add_module(str(j), layer)
    return folded
