"""The flow loss of DMP's network against a known flow, shared by pre-training (DMP-dagger,
``dense-match-train dmp``) and A-DMP's augmented pair in the per-pair optimisation
(:mod:`core.methods.dmp_optim`), so both supervise the pyramid the same way.

Every level's flow is compared with the ground truth averaged onto that level's cells, and the
final flow with the ground truth itself, by the end-point error in working pixels (the GLU-Net
synthetic-warp loss the DMP paper reuses for its pre-training).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from dense_match_ros.core.networks.dmp import DmpOutput


class FlowLoss(NamedTuple):
    total: torch.Tensor
    """final_weight * final EPE + level_weight * sum of the levels' EPEs."""
    levels: dict[str, torch.Tensor]
    """Each level's EPE (detached), by level name."""
    final: torch.Tensor
    """The final flow's EPE (detached), pixels."""


def pooled_flow(flow: torch.Tensor, ok: torch.Tensor, size: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth flow (B, 2, H, W) averaged over the usable pixels (``ok`` (B, H, W), float)
    of each cell of a ``size`` grid, and where a cell has enough of them (a quarter)."""
    weight = F.adaptive_avg_pool2d(ok[:, None], size)
    mean = F.adaptive_avg_pool2d(flow * ok[:, None], size) / weight.clamp_min(1e-6)
    return mean, weight[:, 0] > 0.25


def masked_epe(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean end-point error of (B, 2, h, w) flows over the pixels of ``mask`` (B, h, w)."""
    m = mask.float()
    return ((pred.float() - target).norm(dim=1) * m).sum() / m.sum().clamp_min(1.0)


def flow_loss(out: DmpOutput, levels: Sequence[str], flow: torch.Tensor, ok: torch.Tensor,
              level_weight: float = 1.0, final_weight: float = 1.0) -> FlowLoss:
    """The pyramid's loss against the known ``flow`` (B, 2, H, W) on the working grid, over the
    pixels of ``ok`` (B, H, W) bool."""
    total = final_weight * masked_epe(out.flow, flow, ok)
    terms = {}
    for level, level_flow in zip(levels, out.flows):
        target, mask = pooled_flow(flow, ok.float(), tuple(level_flow.shape[-2:]))
        term = masked_epe(level_flow, target, mask)
        total = total + level_weight * term
        terms[level] = term.detach()
    with torch.no_grad():
        final = masked_epe(out.flow, flow, ok)
    return FlowLoss(total, terms, final)
