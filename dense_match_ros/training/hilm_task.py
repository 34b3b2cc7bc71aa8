"""HiLM's hierarchical metric learning: a correspondence contrastive loss at two levels.

For source points with a known target (synthetic warps), each level gets the contrastive
loss of UCN / HiLM: ``d(p, q)^2`` on the positive and ``max(0, m - d(p, n))^2`` on the
hardest negative n, mined on the fly. Where the negatives come from follows what each level
is used for at matching time (see ``core/methods/hilm.py``):

* deep (conv4, stride 8): the whole target image outside ``deep_exclusion`` px of the
  true match, because the deep level does the global nearest-neighbour search;
* shallow (conv2, stride 2): only inside the refinement window (``search_radius`` px
  around the true match) and outside ``shallow_exclusion`` px, because the shallow level
  only ever has to tell neighbouring positions apart.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dense_match_ros.core.methods.hilm_hierarchical import cell_centres, sample_descriptors
from dense_match_ros.core.networks.hilm_net import HilmNet, HilmNetConfig
from dense_match_ros.training.tasks import TrainTask, fill


@dataclasses.dataclass
class HilmLossConfig:
    points: int = 256
    """Positive correspondences sampled per pair (uniformly over valid source pixels)."""
    border: int = 4
    """Points whose target falls within this many px of the target's edge are not drawn."""
    deep_margin: float = 1.0
    shallow_margin: float = 1.0
    deep_exclusion: float = 12.0
    """Radius (px at training resolution) around the true match that holds no deep negative."""
    shallow_exclusion: float = 3.0
    search_radius: float = 16.0
    """Refinement window radius (px); shallow negatives are mined inside it."""
    deep_weight: float = 1.0
    shallow_weight: float = 1.0


def level_loss(src_desc: torch.Tensor, tgt_map: torch.Tensor, tgt_points: torch.Tensor,
               stride: int, margin: float, exclusion: float, window: float | None,
               weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive loss with hardest-negative mining on one level, and mining accuracy.

    ``src_desc`` (B, N, C) descriptors of source points, ``tgt_map`` (B, C, h, w) target
    descriptors, ``tgt_points`` (B, N, 2) true target pixels, ``weight`` (B, N) 0/1.
    Accuracy is the fraction of points whose positive is closer than their hardest negative.
    """
    b, c, h, w = tgt_map.shape
    pos_desc = sample_descriptors(tgt_map, tgt_points, stride)
    d_pos = (src_desc - pos_desc).norm(dim=-1)
    cand = tgt_map.flatten(2)                                        # (B, C, h*w)
    sim = torch.bmm(src_desc, cand)                                  # (B, N, h*w)
    d_all = (2.0 - 2.0 * sim).clamp_min(1e-8).sqrt()
    centres = cell_centres(h, w, stride, device=tgt_map.device)      # (h*w, 2)
    gap = torch.cdist(tgt_points.float(), centres[None].expand(b, -1, -1))
    allowed = gap > exclusion
    if window is not None:
        allowed &= gap <= window
    d_neg = torch.where(allowed, d_all, torch.full_like(d_all, 4.0)).amin(dim=-1)
    has_neg = allowed.any(dim=-1).float() * weight
    denom = weight.sum().clamp_min(1.0)
    loss = ((d_pos.square() * weight).sum()
            + (torch.relu(margin - d_neg).square() * has_neg).sum()) / denom
    acc = ((d_pos < d_neg).float() * weight).sum() / denom
    return loss, acc


class HilmTask(TrainTask):
    name = 'hilm'

    def model_config(self, values: dict) -> dict:
        return dataclasses.asdict(fill(HilmNetConfig, values, 'hilm model'))

    def loss_config(self, values: dict) -> dict:
        return dataclasses.asdict(fill(HilmLossConfig, values, 'hilm loss'))

    def build_model(self, model_config: dict) -> HilmNet:
        return HilmNet(fill(HilmNetConfig, model_config, 'hilm model'))

    def extra_batch(self, pairs: list, rng: np.random.Generator, loss_config: dict) -> dict:
        cfg = HilmLossConfig(**loss_config)
        n = cfg.points
        points = np.zeros((len(pairs), n, 2), dtype=np.float32)
        weight = np.zeros((len(pairs), n), dtype=np.float32)
        for i, pair in enumerate(pairs):
            h, w = pair.valid.shape
            tx = np.arange(w)[None, :] + pair.flow[..., 0]
            ty = np.arange(h)[:, None] + pair.flow[..., 1]
            ok = pair.valid & (tx >= cfg.border) & (tx <= w - 1 - cfg.border) \
                & (ty >= cfg.border) & (ty <= h - 1 - cfg.border)
            idx = np.flatnonzero(ok)
            if idx.size == 0:
                continue
            pick = rng.choice(idx, size=n, replace=idx.size < n)
            points[i, :, 0] = pick % w
            points[i, :, 1] = pick // w
            weight[i] = 1.0
        return {'points': points, 'point_weight': weight}

    def loss(self, model, batch, loss_config):
        cfg = HilmLossConfig(**loss_config)
        src = batch['source'].float() / 255.0
        tgt = batch['target'].float() / 255.0
        b = src.shape[0]
        # One forward for both images, so BatchNorm normalises them with the same statistics.
        shallow, deep = model(torch.cat([src, tgt], dim=0))
        net = model.module if hasattr(model, 'module') else model
        s_stride, d_stride = net.shallow_stride, net.deep_stride
        points = batch['points'].float()
        weight = batch['point_weight'].float()
        flow = batch['flow']
        xi, yi = points[..., 0].long(), points[..., 1].long()
        bi = torch.arange(b, device=points.device)[:, None].expand_as(xi)
        tgt_points = points + flow[bi, yi, xi].float()
        shallow, deep = shallow.float(), deep.float()
        src_deep = sample_descriptors(deep[:b], points, d_stride)
        src_shallow = sample_descriptors(shallow[:b], points, s_stride)
        loss_d, acc_d = level_loss(src_deep, deep[b:], tgt_points, d_stride, cfg.deep_margin,
                                   cfg.deep_exclusion, None, weight)
        loss_s, acc_s = level_loss(src_shallow, shallow[b:], tgt_points, s_stride,
                                   cfg.shallow_margin, cfg.shallow_exclusion,
                                   cfg.search_radius, weight)
        loss = cfg.deep_weight * loss_d + cfg.shallow_weight * loss_s
        return loss, {'loss_deep': float(loss_d.detach()), 'loss_shallow': float(loss_s.detach()),
                      'acc_deep': float(acc_d.detach()), 'acc_shallow': float(acc_s.detach())}
