"""Training losses of the dense-correspondence networks (torch only).

DGC-Net's hierarchical masked L1: every pyramid level's grid is compared with the
ground-truth grid brought down to that level, over the pixels whose correspondence is known,
and the levels are summed. Supervising every level (not just the last) is what makes the
coarse levels good enough to warp the features of the next one. The matchability decoder
of DGC+M-Net is trained by binary cross-entropy against the same validity mask.

Ground truth arrives as the package's pixel flow (B, H, W, 2) and a boolean valid mask; the
conversion to the normalised grid the network predicts is exact under align_corners=False.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F



def _pixel_coords_torch(b: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=like.dtype, device=like.device),
                            torch.arange(w, dtype=like.dtype, device=like.device), indexing='ij')
    return torch.stack([xs, ys], dim=-1).expand(b, h, w, 2)


def flow_to_grid_torch(flow: torch.Tensor, target_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Pixel flow (B, H, W, 2) on the source grid -> normalised target grid (B, 2, H, W).

    ``target_size`` = (H, W) of the target (default: the source's); the torch twin of
    :func:`core.geometry.grid.flow_to_grid`: x_n = (2 (x + u) + 1) / Wt - 1.
    """
    b, h, w, _ = flow.shape
    th, tw = target_size or (h, w)
    size = torch.tensor([tw, th], dtype=flow.dtype, device=flow.device)
    target_px = _pixel_coords_torch(b, h, w, flow) + flow
    return ((2.0 * target_px + 1.0) / size - 1.0).permute(0, 3, 1, 2)


def grid_to_flow_torch(grid: torch.Tensor, target_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Normalised target grid (B, 2, H, W) -> pixel flow (B, H, W, 2); inverse of the above."""
    b, _, h, w = grid.shape
    th, tw = target_size or (h, w)
    g = grid.permute(0, 2, 3, 1)
    size = torch.tensor([tw, th], dtype=g.dtype, device=g.device)
    target_px = ((g + 1.0) * size - 1.0) / 2.0
    return target_px - _pixel_coords_torch(b, h, w, g)


def downsample_target(grid: torch.Tensor, valid: torch.Tensor,
                      size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth for a coarser level: (grid (B, 2, h, w), valid (B, h, w) bool).

    The grid is area-averaged: for a locally smooth field the mean over a cell is the value
    at its centre, which is the coarse pixel's own position under align_corners=False.
    A coarse pixel is valid only if every fine pixel it covers is, so averaged grids
    never mix in the meaningless values of invalid pixels.
    """
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid, valid.bool()
    v = valid.to(grid.dtype)[:, None]
    g = F.interpolate(torch.where(v > 0, grid, torch.zeros_like(grid)), size=size, mode='area')
    frac = F.interpolate(v, size=size, mode='area')
    coarse_valid = frac[:, 0] > 1.0 - 1e-4
    return g / frac.clamp_min(1e-6), coarse_valid


def masked_l1(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid pixels of |dx| + |dy| (normalised units); 0 when none is valid.

    ``pred``/``gt`` (B, 2, h, w), ``valid`` (B, h, w). Invalid pixels contribute exactly
    nothing, not even through NaNs in the ground truth there.
    """
    mask = valid.bool()[:, None].expand_as(pred)
    # Replace the ground truth where invalid (not the loss): a NaN there would otherwise
    # reach the gradient through the unselected branch of torch.where.
    gt = torch.where(mask, gt, pred.detach())
    return (pred - gt).abs().sum() / valid.sum().clamp_min(1).to(pred.dtype)


def hierarchical_l1(grids: Sequence[torch.Tensor], gt_grid: torch.Tensor, valid: torch.Tensor,
                    weights: Sequence[float] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Weighted sum over levels of :func:`masked_l1`; also returns each level's term.

    ``grids`` coarse to fine, each (B, 2, h, w); ``gt_grid`` (B, 2, H, W) at full resolution.
    """
    weights = [1.0] * len(grids) if weights is None else list(weights)
    if len(weights) != len(grids):
        raise ValueError(f'{len(weights)} level weights for {len(grids)} levels')
    terms = []
    for pred in grids:
        gt, ok = downsample_target(gt_grid, valid, tuple(pred.shape[-2:]))
        terms.append(masked_l1(pred.float(), gt.float(), ok))
    total = sum(w * t for w, t in zip(weights, terms))
    return total, terms


def matchability_bce(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of matchability logits (B, 1, H, W) against the valid mask."""
    target = valid.to(logits.dtype)
    if target.dim() == 3:
        target = target[:, None]
    if tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
        target = (F.interpolate(target.float(), size=logits.shape[-2:], mode='area') > 0.5).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def level_epe(grids: Sequence[torch.Tensor], flow: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """Average end-point error in FULL-resolution pixels of each level's grid.

    Each level's grid is upsampled to the full source grid (no change of values, see
    ``upsample_grid``) and compared with the pixel ground truth on valid pixels, so the
    numbers of all levels are in the same unit and directly comparable.
    """
    b, h, w, _ = flow.shape
    out = []
    for g in grids:
        up = F.interpolate(g.float(), size=(h, w), mode='bilinear', align_corners=False)
        err = (grid_to_flow_torch(up) - flow.float()).norm(dim=-1)
        m = valid.bool()
        out.append(float(err[m].mean()) if m.any() else float('nan'))
    return out
