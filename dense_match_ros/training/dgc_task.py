"""Training DGC-Net / DGC+M-Net: the ``dgc`` task of the shared loop, and a GPU trainer.

Two ways to train, one checkpoint format (:mod:`.checkpoint`), so either run exports with
``dense-match-train export`` and loads in the ``dgc`` matcher:

* ``dense-match-train dgc --config config/train_dgc_cpu.yaml`` -- the shared loop
  (:mod:`.loop`) with CPU-made pairs from :mod:`data.synthetic`; register the task with
  ``'dgc': 'dense_match_ros.training.dgc_task:DgcTask'`` in :mod:`.tasks`;
* ``python3 -m dense_match_ros.training.dgc_task --config config/train_dgc_gpu.yaml
  --photos DIR --out runs/dgc_gpu`` -- a self-contained loop for the lent GPU machine,
  whose pairs are made on the GPU (:mod:`.gpu_pairs`, ~20x faster there) and which needs
  only torch, numpy and OpenCV: it reads its config with PyYAML when present and as JSON
  otherwise (the GPU configs are written in JSON-compatible YAML for that reason), and
  imports neither ROS nor kornia nor the shared loop's YAML-based config module.

Loss (DGC-Net): the hierarchical masked L1 over all five levels, plus, for DGC+M-Net,
``matchability_weight`` x BCE of the matchability against the valid mask.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from dense_match_ros.training import losses
from dense_match_ros.core.networks.dgc import PYRAMID, DgcNet, DgcNetConfig, config_from_dict
from dense_match_ros.training.tasks import TrainTask

TRAINING_KEYS = ('backbone_init', 'freeze_backbone', 'init_weights')
"""Model-section keys that shape training, not the architecture (kept in the config record)."""


@dataclasses.dataclass
class DgcLossConfig:
    level_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    """Weight of each level's masked L1, coarse (15 px) to fine (240 px); the paper sums them."""
    matchability_weight: float = 0.1
    """Weight of the BCE term (the L1 terms are in normalised units: 1 px = 2/240)."""


def _model_values(values: dict) -> tuple[dict, dict]:
    """Split a model section into (architecture, training-only) keys; reject unknown keys."""
    names = {f.name for f in dataclasses.fields(DgcNetConfig)}
    unknown = set(values) - names - set(TRAINING_KEYS)
    if unknown:
        raise ValueError(f'unknown model keys for dgc: {sorted(unknown)}')
    return ({k: v for k, v in values.items() if k in names},
            {k: v for k, v in values.items() if k in TRAINING_KEYS})


def build_network(model_config: dict) -> DgcNet:
    """The network of a model config; initialises/freezes the backbone as the config asks.

    ``backbone_init`` names a checkpoint (any method whose weights hold ``backbone.*``, e.g.
    a trained ``hilm`` of the same width) to start the VGG trunk from; without ImageNet
    weights this is the only meaningful way to train with a *frozen* backbone.
    ``init_weights`` names a whole dgc checkpoint to start every layer from (applied after
    ``backbone_init``).
    """
    arch, train_keys = _model_values(model_config)
    net = DgcNet(config_from_dict(arch))
    init = train_keys.get('backbone_init')
    if init:
        obj = torch.load(init, map_location='cpu', weights_only=True)
        state = obj.get('state_dict') or obj.get('model') or obj
        trunk = {k[len('backbone.'):]: v.float() if v.is_floating_point() else v
                 for k, v in state.items() if k.startswith('backbone.')}
        if not trunk:
            raise ValueError(f'{init} holds no backbone.* weights')
        net.backbone.load_state_dict(trunk)
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
    if hasattr(net, 'channels_last') and net.channels_last:
        src, tgt = src.contiguous(memory_format=torch.channels_last), tgt.contiguous(memory_format=torch.channels_last)
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
        arch, train_keys = _model_values(values)
        full = dataclasses.asdict(config_from_dict(arch))
        full['input_size'] = list(full['input_size'])
        full.update({'backbone_init': None, 'freeze_backbone': False, 'init_weights': None,
                     **train_keys})
        return full

    def loss_config(self, values: dict) -> dict:
        names = {f.name for f in dataclasses.fields(DgcLossConfig)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f'unknown loss keys for dgc: {sorted(unknown)}')
        cfg = DgcLossConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        if len(cfg.level_weights) != len(PYRAMID):
            raise ValueError(f'loss.level_weights needs {len(PYRAMID)} values (15 px .. 240 px)')
        d = dataclasses.asdict(cfg)
        d['level_weights'] = list(d['level_weights'])
        return d

    def build_model(self, model_config: dict) -> DgcNet:
        return build_network(model_config)

    def loss(self, model, batch, loss_config):
        cfg = DgcLossConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in loss_config.items()})
        return dgc_loss(model, batch, cfg)


# ======================================================================================
# The GPU trainer: pairs made on the device, no shared loop, no PyYAML needed
# ======================================================================================

def read_config(path: str | Path) -> dict:
    """A YAML config (PyYAML) or, without PyYAML, the same file as JSON minus '#' lines."""
    text = Path(path).read_text(encoding='utf-8')
    try:
        import yaml
    except ImportError:
        body = '\n'.join(line for line in text.splitlines() if not line.lstrip().startswith('#'))
        return json.loads(body)
    return yaml.safe_load(text) or {}


GPU_DEFAULTS = {
    'method': 'dgc', 'seed': 0, 'minutes': 20.0, 'steps': 100000, 'batch_size': 32,
    'optim': {'lr': 1e-3, 'weight_decay': 1e-4, 'betas': [0.9, 0.999], 'warmup_steps': 300,
              'min_lr_ratio': 0.02, 'grad_clip': 5.0},
    'data': {'image_size': [240, 240], 'photo_size': [256, 256], 'photos': None, 'kinds':
             ['affine', 'tps', 'homography'], 'crop_scale': [0.5, 0.9], 'photometric': True},
    'model': {}, 'loss': {}, 'amp': True, 'channels_last': True, 'compile': False,
    'log_every': 50, 'checkpoint_minutes': 2.0,
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _time_lr(elapsed_min: float, total_min: float, step: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up in steps, then cosine over the wall-clock budget (not a step count)."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, elapsed_min / max(1e-6, total_min))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def gpu_train(config: dict, out_dir: str | Path, device: str = 'auto', resume: bool = True,
              command: str | None = None, init: str | None = None) -> dict:
    """Train for ``config['minutes']`` of wall time (or ``steps``), saving ``last.pt`` + log.

    Writes the shared loop's training-state format, so ``dense-match-train export`` and
    ``load_matcher('dgc', weights=.../last.pt)`` both accept the result. Resumes from
    ``out_dir/last.pt``; the time budget counts the time already spent. ``init`` (a shipped
    or snapshot checkpoint) starts a fresh run from its weights -- how a run continues on a
    new machine, where only the small fp16 snapshot survived (the optimiser restarts).
    """
    from dense_match_ros.training import checkpoint as ckpt
    from dense_match_ros.training.gpu_pairs import GpuPairConfig, GpuPairSampler, load_photo_tensor
    cfg = _merge(GPU_DEFAULTS, config)
    task = DgcTask()
    cfg['model'] = task.model_config(cfg['model'])
    cfg['loss'] = task.loss_config(cfg['loss'])
    data = cfg['data']
    if list(cfg['model']['input_size']) != list(data['image_size']):
        raise ValueError('model.input_size must equal data.image_size')
    if not data.get('photos'):
        raise ValueError('data.photos: give the photo folder (e.g. train_pack/) with --photos')
    dev = torch.device('cuda' if device == 'auto' and torch.cuda.is_available() else
                       ('cpu' if device == 'auto' else device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(cfg['seed']))
    if dev.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t0 = time.monotonic()
    photos = load_photo_tensor(data['photos'], tuple(data['photo_size']), 'train', dev)
    pair_fields = {f.name for f in dataclasses.fields(GpuPairConfig)}
    unknown = set(data) - pair_fields - {'image_size', 'photo_size', 'photos'}
    if unknown:
        raise ValueError(f'unknown data keys: {sorted(unknown)}')
    sampler = GpuPairSampler(photos, GpuPairConfig(
        size=tuple(data['image_size']),
        **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in pair_fields}))
    load_s = time.monotonic() - t0

    model = build_network(cfg['model']).to(dev)
    model.channels_last = bool(cfg['channels_last']) and dev.type == 'cuda'
    if model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg['optim']
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': o['weight_decay']},
                                   {'params': no_decay, 'weight_decay': 0.0}],
                                  lr=o['lr'], betas=tuple(o['betas']))
    # The rate follows wall time (set below each step); the scheduler object only keeps the
    # training-state format of the shared loop.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _s: 1.0)
    step, wall_before = 0, 0.0
    last, log_path = out_dir / 'last.pt', out_dir / 'log.jsonl'
    if resume and last.is_file():
        state = ckpt.load_training_state(last, map_location=dev)
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        step, wall_before = int(state['step']), float(state['wall_time_s'])
    else:
        if log_path.is_file():
            log_path.unlink()
        if init:
            _, init_state, _ = ckpt.load_weights(init, 'dgc')
            model.load_state_dict(init_state)
            cfg['init'] = str(init)
    (out_dir / 'config.json').write_text(json.dumps(cfg, indent=2) + '\n')
    forward = torch.compile(model) if cfg['compile'] else model
    use_amp = bool(cfg['amp']) and dev.type == 'cuda'
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler('cuda', enabled=use_amp and amp_dtype == torch.float16)
    loss_cfg = DgcLossConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg['loss'].items()})
    budget_min = float(cfg['minutes'])

    t_start = time.monotonic()
    last_save = t_start
    pairs_window, t_window = 0, t_start
    elapsed = lambda: wall_before + time.monotonic() - t_start  # noqa: E731

    def save() -> None:
        ckpt.save_training_state(last, method='dgc', step=step, config=cfg, model=model,
                                 optimizer=optimizer, scheduler=scheduler, wall_time_s=elapsed(),
                                 extra={'command': command, 'device': str(dev), 'world_size': 1,
                                        'trainer': 'dgc_task.gpu_train'})

    with open(log_path, 'a') as log:
        while step < int(cfg['steps']) and elapsed() < 60.0 * budget_min:
            batch = sampler.sample(int(cfg['batch_size']), int(cfg['seed']), step)
            factor = _time_lr(elapsed() / 60.0, budget_min, step, int(o['warmup_steps']),
                              float(o['min_lr_ratio']))
            for group in optimizer.param_groups:
                group['lr'] = float(o['lr']) * factor
            model.train()
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                loss, metrics = dgc_loss(forward, batch, loss_cfg)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), o['grad_clip']))
            scaler.step(optimizer)
            scaler.update()
            step += 1
            pairs_window += int(cfg['batch_size'])
            if step % int(cfg['log_every']) == 0:
                now = time.monotonic()
                log.write(json.dumps({'step': step, 'loss': float(loss.detach()),
                                      'lr': optimizer.param_groups[0]['lr'], 'grad_norm': grad_norm,
                                      **metrics, 'pairs_per_s': pairs_window / (now - t_window),
                                      'wall_time_s': elapsed()}) + '\n')
                log.flush()
                pairs_window, t_window = 0, now
            if time.monotonic() - last_save > 60.0 * float(cfg['checkpoint_minutes']):
                save()
                last_save = time.monotonic()
    save()
    return {'method': 'dgc', 'step': step, 'wall_time_s': elapsed(), 'photo_load_s': load_s,
            'photos': int(photos.shape[0]), 'device': str(dev), 'torch': torch.__version__,
            'out_dir': str(out_dir)}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description='Train dgc with pairs made on the GPU (see module doc).')
    p.add_argument('--config', required=True, help='YAML (or JSON-compatible YAML) config')
    p.add_argument('--out', required=True, help='run folder (last.pt, log.jsonl, config.json)')
    p.add_argument('--photos', default=None, help='photo folder (overrides data.photos)')
    p.add_argument('--minutes', type=float, default=None, help='wall-time budget (overrides)')
    p.add_argument('--device', default='auto')
    p.add_argument('--fresh', action='store_true', help='ignore OUT/last.pt')
    p.add_argument('--init', default=None, help='start from these weights (e.g. a snapshot)')
    args = p.parse_args(argv)
    cfg = read_config(args.config)
    if args.photos:
        cfg.setdefault('data', {})['photos'] = args.photos
    if args.minutes is not None:
        cfg['minutes'] = args.minutes
    command = 'python3 -m dense_match_ros.training.dgc_task ' + ' '.join(argv)
    summary = gpu_train(cfg, args.out, device=args.device, resume=not args.fresh, command=command,
                        init=args.init)
    print(json.dumps(summary))
    return 0


if __name__ == '__main__':
    sys.exit(main())
