"""Training the light flow network (:mod:`core.networks.neuflow`): the ``neuflow`` task.

Loss (RAFT's sequence loss, as NeuFlow v2 uses it): L1 of the full-resolution flow of every
refinement step against the ground truth, weighted ``gamma^(n-1-k)`` so the last step
counts most, plus ``global_weight`` x the same for the 1/16 global match; every pixel with
finite ground truth counts (the flow of an occluded or out-of-frame point is still where
it went), and ``matchability_weight`` x BCE trains the matchability head against the
pair's visibility mask.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dense_match_ros.core.networks.neuflow import NeuFlowConfig, NeuFlowNet, config_from_dict
from dense_match_ros.training.tasks import TrainTask, fill, split_model

TRAINING_KEYS = ('init_weights', 'encoder_init', 'freeze_encoder')


@dataclasses.dataclass
class NeuFlowLossConfig:
    gamma: float = 0.8
    """Weight decay of earlier refinement steps (the last step has weight 1)."""
    global_weight: float = 0.5
    """Weight of the global (1/16) match's L1."""
    matchability_weight: float = 0.5
    """Weight of the BCE of the matchability logit against visibility (pixel L1s are in px)."""
    max_flow: float = 400.0
    """Pixels with a longer ground-truth flow are left out (none at training sizes)."""


def build_network(model_config: dict) -> NeuFlowNet:
    """The network of a model config; ``init_weights`` starts it from a neuflow checkpoint
    (a shipped file or a run's last.pt): how a later stage continues an earlier one.

    ``encoder_init`` takes only the encoder from a neuflow checkpoint of another design (same
    ``width``): a lighter refinement then starts on features that already match, which from
    random init took the CPU most of its training (the global match at 1/16 depends on the
    encoder alone). ``freeze_encoder`` keeps it as it is."""
    from dense_match_ros.training import checkpoint as ckpt
    arch, train_keys = split_model(model_config, NeuFlowConfig, TRAINING_KEYS, 'neuflow model')
    net = NeuFlowNet(config_from_dict(arch))
    if train_keys.get('encoder_init'):
        _, state, _ = ckpt.load_weights(train_keys['encoder_init'], 'neuflow')
        encoder = {k[len('encoder.'):]: v for k, v in state.items() if k.startswith('encoder.')}
        try:
            net.encoder.load_state_dict(encoder)
        except RuntimeError as err:
            raise ValueError(f"encoder_init {train_keys['encoder_init']!r} holds an encoder of "
                             f'another width than model.width={net.config.width}: {err}') from err
    if train_keys.get('init_weights'):
        _, state, _ = ckpt.load_weights(train_keys['init_weights'], 'neuflow')
        net.load_state_dict(state)
    if train_keys.get('freeze_encoder'):
        net.freeze_encoder(True)
    return net


def sequence_loss(out, flow: torch.Tensor, visible: torch.Tensor,
                  cfg: NeuFlowLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one :class:`NeuFlowOutput` against pixel flow (B, H, W, 2) and visibility."""
    gt = flow.permute(0, 3, 1, 2).float()
    ok = (torch.isfinite(gt).all(1) & (gt.norm(dim=1) < cfg.max_flow)).float()
    gt = torch.nan_to_num(gt)
    denom = ok.sum().clamp_min(1.0)

    def l1(pred: torch.Tensor) -> torch.Tensor:
        return ((pred.float() - gt).abs().sum(1) * ok).sum() / denom

    steps = out.flows[1:]
    n = len(steps)
    total = cfg.global_weight * l1(out.flows[0])
    for k, pred in enumerate(steps):
        total = total + cfg.gamma ** (n - 1 - k) * l1(pred)
    bce = F.binary_cross_entropy_with_logits(out.matchability[:, 0].float(), visible.float())
    total = total + cfg.matchability_weight * bce
    with torch.no_grad():
        epe = ((out.flows[-1].float() - gt).norm(dim=1) * ok).sum() / denom
        epe0 = ((out.flows[0].float() - gt).norm(dim=1) * ok).sum() / denom
    return total, {'epe': float(epe), 'epe_global': float(epe0), 'bce': float(bce.detach())}


class NeuFlowTask(TrainTask):
    """The ``neuflow`` task of the shared loop."""

    name = 'neuflow'

    def model_config(self, values: dict) -> dict:
        arch, train_keys = split_model(values, NeuFlowConfig, TRAINING_KEYS, 'neuflow model')
        return {**dataclasses.asdict(config_from_dict(arch)), 'init_weights': None,
                'encoder_init': None, 'freeze_encoder': False, **train_keys}

    def loss_config(self, values: dict) -> dict:
        return dataclasses.asdict(fill(NeuFlowLossConfig, values, 'neuflow loss'))

    def build_model(self, model_config: dict) -> NeuFlowNet:
        return build_network(model_config)

    def loss(self, model, batch, loss_config):
        src = (batch['source'].float() / 255.0).contiguous(memory_format=torch.channels_last)
        tgt = (batch['target'].float() / 255.0).contiguous(memory_format=torch.channels_last)
        out = model(src, tgt)
        return sequence_loss(out, batch['flow'], batch['valid'], NeuFlowLossConfig(**loss_config))
