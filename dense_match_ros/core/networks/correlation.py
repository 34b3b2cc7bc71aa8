"""Global correlation between two feature maps, as DGC-Net (and CNNGeo before it) uses it.

Every source position is compared with every target position, so the coarsest level can
recover displacements of any size -- which is why DGC-Net handles large viewpoint changes
where local-cost-volume flow networks fail. The volume lives on the SOURCE grid (our flow
convention) and its channel ``k = ty * Wt + tx`` indexes the target position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def global_correlation(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, Ht*Wt, Hs, Ws) dot products of every source feature with every target feature.

    ``source`` (B, C, Hs, Ws) and ``target`` (B, C, Ht, Wt); channel ``ty * Wt + tx``.
    Features should already be L2-normalised (then each entry is a cosine in [-1, 1]).
    """
    b, c, hs, ws = source.shape
    _, ct, ht, wt = target.shape
    if ct != c:
        raise ValueError(f'feature channels differ: source {c}, target {ct}')
    tgt = target.flatten(2).transpose(1, 2)                    # (B, Ht*Wt, C)
    corr = torch.bmm(tgt, source.flatten(2))                   # (B, Ht*Wt, Hs*Ws)
    return corr.view(b, ht * wt, hs, ws)


def normalize_correlation(corr: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """ReLU then L2 normalisation over the target axis (channels), per source position.

    The ReLU drops dissimilar (negative) matches and the normalisation turns each source
    position's scores into a direction, so a position whose best score is ambiguous (many
    similar candidates) gets a flat, low-peaked profile; DGC-Net's ablation shows both
    steps improve accuracy. A source position with no positive score stays all-zero.
    """
    corr = F.relu(corr)
    return corr / (corr.square().sum(dim=1, keepdim=True) + eps).sqrt()
