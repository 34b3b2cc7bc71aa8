"""Pre-training DMP's matching network (DMP-dagger): the ``dmp`` task of the shared loop.

The paper pre-trains with the flow loss of GLU-Net's synthetic-warp training before any
per-pair optimisation; here: the L1 (end-point error, pixels) of every pyramid level's flow
against the ground truth averaged onto that level's cells, plus the final flow's, on the
project's synthetic pairs (warps and independently moving objects). Only the adaptation and
residual modules (and the per-level softmax temperatures) train: the trunk is the project's
backbone, frozen (``model.backbone_init`` names the checkpoint it comes from, which the
JSON record keeps). ``model.trunk_init`` swaps the trunk of an ``init_weights`` stage for
another checkpoint's (a trunk trained further elsewhere, e.g. ``cnngeo``'s with its matching
loss), keeping the modules already trained on top to adapt to it.

    dense-match-train dmp --config config/train_dmp_cpu.yaml --out runs/dmp_cpu
"""
from __future__ import annotations

import dataclasses

import torch

from dense_match_ros.core.networks.dmp import DmpConfig, DmpNet, config_from_dict
from dense_match_ros.core.networks.dmp_supervision import flow_loss
from dense_match_ros.core.checkpoint import load_trunk
from dense_match_ros.training.tasks import TrainTask, fill, split_model

TRAINING_KEYS = ('backbone_init', 'init_weights', 'trunk_init')


@dataclasses.dataclass
class DmpLossConfig:
    level_weight: float = 1.0
    """Weight of each pyramid level's L1 (all levels alike: the flows are all in pixels)."""
    final_weight: float = 1.0
    """Weight of the final (upsampled) flow's L1."""
    max_flow: float = 400.0
    """Pixels with a longer ground-truth flow are left out."""


def build_network(model_config: dict) -> DmpNet:
    """The network of a model config: the trunk from ``backbone_init`` (required: a frozen
    random trunk matches nothing), the rest from ``init_weights`` (a dmp checkpoint: a later
    stage) or the identity; ``trunk_init`` replaces an ``init_weights`` stage's trunk."""
    arch, train_keys = split_model(model_config, DmpConfig, TRAINING_KEYS, 'dmp model')
    net = DmpNet(config_from_dict(arch))
    if train_keys.get('trunk_init') and not train_keys.get('init_weights'):
        raise ValueError('model.trunk_init swaps the trunk of a model.init_weights stage; '
                         'a first stage names its trunk with model.backbone_init')
    if train_keys.get('init_weights'):
        from dense_match_ros.training import checkpoint as ckpt
        _, state, _ = ckpt.load_weights(train_keys['init_weights'], 'dmp')
        net.load_state_dict(state)
        if train_keys.get('trunk_init'):
            load_trunk(net.trunk, train_keys['trunk_init'], 'the dmp trunk')
    elif train_keys.get('backbone_init'):
        load_trunk(net.trunk, train_keys['backbone_init'], 'the dmp trunk')
    else:
        raise ValueError('dmp needs model.backbone_init (a checkpoint holding a trained trunk of '
                         'the same width, e.g. dense_match_ros/weights/hilm_cpu.pt) or '
                         'model.init_weights (a dmp checkpoint)')
    return net


def dmp_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
             cfg: DmpLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    net = model.module if hasattr(model, 'module') else model
    src = batch['source'].float() / 255.0
    tgt = batch['target'].float() / 255.0
    out = model(src, tgt)
    gt = batch['flow'].permute(0, 3, 1, 2).float()
    ok = torch.isfinite(gt).all(1) & (torch.nan_to_num(gt).norm(dim=1) < cfg.max_flow)
    loss = flow_loss(out, net.levels, torch.nan_to_num(gt), ok, cfg.level_weight, cfg.final_weight)
    metrics = {f'epe_{level}': float(term) for level, term in loss.levels.items()}
    metrics['epe'] = float(loss.final)
    metrics['temperature_finest'] = float((-net.log_scale[-1].detach()).exp())
    return loss.total, metrics


class DmpTask(TrainTask):
    """The ``dmp`` task of the shared loop."""

    name = 'dmp'

    def model_config(self, values: dict) -> dict:
        arch, train_keys = split_model(values, DmpConfig, TRAINING_KEYS, 'dmp model')
        full = dataclasses.asdict(config_from_dict(arch))
        full['input_size'] = list(full['input_size'])
        return {**full, 'backbone_init': None, 'init_weights': None, 'trunk_init': None, **train_keys}

    def loss_config(self, values: dict) -> dict:
        return dataclasses.asdict(fill(DmpLossConfig, values, 'dmp loss'))

    def build_model(self, model_config: dict) -> DmpNet:
        return build_network(model_config)

    def loss(self, model, batch, loss_config):
        return dmp_loss(model, batch, fill(DmpLossConfig, loss_config, 'dmp loss'))
