"""Cross-entropies on a trunk's correlation: the dense matching signal CNNGeo's trunk
training adds to the paper's grid loss (``loss.match_weight``, ``loss.level_match``).

Each source cell's label is the target cell that holds the true match of its centre pixel
(synthetic pairs know it), and the loss is a softmax over cosine scores against every target
cell. Kept apart from the CNNGeo task because nothing here is CNNGeo's: any task with a
trunk and ground-truth flow can add it.
"""
from __future__ import annotations

import torch

from dense_match_ros.core.networks.backbone import STRIDES
from dense_match_ros.core.networks.correlation import global_correlation

LEVEL_STRIDES = {k: v for k, v in STRIDES.items() if k != 'pool4'}
"""The trunk levels above pool4 a matching loss may reach, with their strides."""


def cell_labels(flow: torch.Tensor, valid: torch.Tensor, cell: int = 16) -> torch.Tensor:
    """(B, Hs, Ws) int64: the target cell (``ty * Wt + tx``) holding the true match of each
    source cell's centre pixel, -1 where that pixel has none or it leaves the target.

    ``flow`` (B, H, W, 2) and ``valid`` (B, H, W) at the network's input size; the target
    grid is the source's (both images share the input size)."""
    b, h, w, _ = flow.shape
    hs, ws = h // cell, w // cell
    ys = torch.arange(hs, device=flow.device) * cell + cell // 2
    xs = torch.arange(ws, device=flow.device) * cell + cell // 2
    f = flow[:, ys][:, :, xs].float()                              # (B, Hs, Ws, 2)
    ok = valid[:, ys][:, :, xs].bool()
    tx = torch.floor((xs.view(1, 1, -1) + f[..., 0]) / cell)
    ty = torch.floor((ys.view(1, -1, 1) + f[..., 1]) / cell)
    ok &= (tx >= 0) & (tx < ws) & (ty >= 0) & (ty < hs) & torch.isfinite(f).all(-1)
    labels = (ty.clamp(0, hs - 1) * ws + tx.clamp(0, ws - 1)).long()
    return torch.where(ok, labels, torch.full_like(labels, -1))


def match_loss(source_feat: torch.Tensor, target_feat: torch.Tensor, labels: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, float]:
    """(cross-entropy of the raw correlation against ``labels``, share of cells whose best
    score is their label); float32 throughout, as the matcher correlates."""
    with torch.autocast(source_feat.device.type, enabled=False):
        corr = global_correlation(source_feat.float(), target_feat.float())
        known = labels >= 0
        if not known.any():  # cross_entropy would be NaN with every label ignored
            return corr.sum() * 0.0, 0.0
        loss = torch.nn.functional.cross_entropy(corr / float(temperature), labels,
                                                 ignore_index=-1)
        acc = float((corr.argmax(1) == labels)[known].float().mean())
    return loss, acc


def sampled_match_loss(source_feat: torch.Tensor, target_feat: torch.Tensor,
                       labels: torch.Tensor, keys: torch.Tensor, points: int,
                       temperature: float) -> tuple[torch.Tensor, float]:
    """:func:`match_loss` on ``points`` source cells per pair: those with a label and the
    highest ``keys`` (B, Hs*Ws) (random numbers drawn with the batch, so a resumed run
    draws the same cells), each scored against every target cell. Raw features in; cosine
    scores in float32."""
    with torch.autocast(source_feat.device.type, enabled=False):
        src = torch.nn.functional.normalize(source_feat.float(), dim=1).flatten(2)
        tgt = torch.nn.functional.normalize(target_feat.float(), dim=1).flatten(2)
        flat = labels.flatten(1)
        if not (flat >= 0).any():
            return (src.sum() + tgt.sum()) * 0.0, 0.0
        keys = keys.to(src.device, torch.float32)
        rank = torch.where(flat >= 0, keys, torch.full_like(keys, -1.0))
        idx = rank.topk(min(int(points), flat.shape[1]), dim=1).indices           # (B, P)
        chosen = flat.gather(1, idx)
        desc = src.gather(2, idx[:, None].expand(-1, src.shape[1], -1))          # (B, C, P)
        corr = torch.einsum('bcp,bcm->bpm', desc, tgt).flatten(0, 1)             # (B*P, M)
        chosen = chosen.flatten()
        loss = torch.nn.functional.cross_entropy(corr / float(temperature), chosen, ignore_index=-1)
        known = chosen >= 0
        acc = float((corr.argmax(1) == chosen)[known].float().mean())
    return loss, acc
