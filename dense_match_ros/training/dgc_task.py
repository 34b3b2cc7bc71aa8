"""Training DGC-Net / DGC+M-Net: the ``dgc`` task of the shared loop (:mod:`.loop`).

* on a CPU: ``dense-match-train dgc --config config/train_dgc_cpu.yaml --out runs/dgc_cpu``
  (pairs from :mod:`data.synthetic`);
* on a GPU: ``python3 -m dense_match_ros.training.cli dgc --config config/train_dgc_gpu.yaml
  --out runs/dgc_gpu --set data.photos=DIR`` (pairs made on the GPU, ``data.sampler:
  device``; a wall-clock budget, ``minutes``), which needs only torch, numpy, OpenCV and
  tqdm: see docs/GPU_TRAINING.md and scripts/gpu_train_dgc.sh.

Both write the shared training-state format, so either run exports with
``dense-match-train export`` and loads in the ``dgc`` matcher.

Loss (DGC-Net): the hierarchical masked L1 over all five levels, plus, for DGC+M-Net,
``matchability_weight`` x BCE of the matchability against the valid mask.
"""
from __future__ import annotations

import dataclasses

import torch

from dense_match_ros.training import losses
from dense_match_ros.core.networks.dgc import PYRAMID, DgcNet, DgcNetConfig, config_from_dict
from dense_match_ros.core.checkpoint import load_trunk
from dense_match_ros.training.tasks import TrainTask, fill, split_model

TRAINING_KEYS = ('backbone_init', 'freeze_backbone', 'init_weights')
"""Model-section keys that shape training, not the architecture (kept in the config record)."""


@dataclasses.dataclass
class DgcLossConfig:
    level_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    """Weight of each level's masked L1, coarse (15 px) to fine (240 px); the paper sums them."""
    matchability_weight: float = 0.1
    """Weight of the BCE term (the L1 terms are in normalised units: 1 px = 2/240)."""


def build_network(model_config: dict) -> DgcNet:
    """The network of a model config; initialises/freezes the backbone as the config asks.

    ``backbone_init`` names a checkpoint (any method whose weights hold ``backbone.*``, e.g.
    a trained ``hilm`` of the same width) to start the VGG trunk from; without ImageNet
    weights this is the only meaningful way to train with a *frozen* backbone.
    ``init_weights`` names a whole dgc checkpoint to start every layer from (applied after
    ``backbone_init``).
    """
    arch, train_keys = split_model(model_config, DgcNetConfig, TRAINING_KEYS, 'dgc model')
    net = DgcNet(config_from_dict(arch))
    init = train_keys.get('backbone_init')
    if init:
        load_trunk(net.backbone, init)
    whole = train_keys.get('init_weights')
    if whole:
        # A second stage (e.g. unfreezing the trunk after the decoders learned on it) starts
        # from a whole dgc network, a run's last.pt or a shipped file, of this architecture.
        from dense_match_ros.training import checkpoint as ckpt
        _, state, _ = ckpt.load_weights(whole, 'dgc')
        net.load_state_dict(state)
    if train_keys.get('freeze_backbone'):
        net.freeze_backbone(True)
    return net


def dgc_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
             cfg: DgcLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and logged figures for one batch (``source``/``target`` uint8, ``flow``, ``valid``)."""
    net = model.module if hasattr(model, 'module') else model
    src = batch['source'].float() / 255.0
    tgt = batch['target'].float() / 255.0
    size = tuple(src.shape[-2:])
    if size != tuple(net.config.input_size):
        raise ValueError(f'batch images are {size} but model.input_size is {tuple(net.config.input_size)}; '
                         'set model.input_size to data.image_size')
    out = model(src, tgt)
    flow = batch['flow'].float()
    valid = batch['valid'].bool()
    gt_grid = losses.flow_to_grid_torch(flow)
    l1, terms = losses.hierarchical_l1(out.grids, gt_grid, valid, cfg.level_weights)
    loss = l1
    metrics: dict[str, float] = {'loss_l1': float(l1.detach())}
    if out.matchability is not None and cfg.matchability_weight > 0:
        bce = losses.matchability_bce(out.matchability, valid)
        loss = loss + cfg.matchability_weight * bce
        metrics['loss_bce'] = float(bce.detach())
    with torch.no_grad():
        for level, term, epe in zip(PYRAMID, terms, losses.level_epe(out.grids, flow, valid)):
            metrics[f'l1_{level}'] = float(term)
            metrics[f'epe_{level}'] = epe
    return loss, metrics


class DgcTask(TrainTask):
    """The ``dgc`` task for the shared training loop (:mod:`.loop`)."""

    name = 'dgc'

    def model_config(self, values: dict) -> dict:
        arch, train_keys = split_model(values, DgcNetConfig, TRAINING_KEYS, 'dgc model')
        full = dataclasses.asdict(config_from_dict(arch))
        full['input_size'] = list(full['input_size'])
        full.update({'backbone_init': None, 'freeze_backbone': False, 'init_weights': None,
                     **train_keys})
        return full

    def loss_config(self, values: dict) -> dict:
        cfg = fill(DgcLossConfig, values, 'dgc loss')
        if len(cfg.level_weights) != len(PYRAMID):
            raise ValueError(f'loss.level_weights needs {len(PYRAMID)} values (15 px .. 240 px)')
        d = dataclasses.asdict(cfg)
        d['level_weights'] = list(d['level_weights'])
        return d

    def build_model(self, model_config: dict) -> DgcNet:
        return build_network(model_config)

    def loss(self, model, batch, loss_config):
        return dgc_loss(model, batch, fill(DgcLossConfig, loss_config, 'dgc loss'))
