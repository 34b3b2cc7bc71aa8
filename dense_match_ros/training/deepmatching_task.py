"""Training DeepMatching end to end (:mod:`core.networks.deepmatching`): ``deepmatching``.

The loss reads the atomic score maps after the top-down pass, so the gradient reaches the
descriptor through every level of the pyramid (and the rectification exponent learns too).
Each atomic patch whose centre has a valid ground-truth match inside the target gives a
term; patches without one (occluded by a moving object, warped out of the frame) give none.

* ``loss.kind: margin`` (default, the paper's structured-output loss in hinge form): the
  best score within ``true_radius`` cells of the true position must beat the best score
  farther than ``radius`` px by ``margin`` (scores divided by the number of levels summed,
  so in [0, 1]); the ring between is neither rewarded nor punished, as a match a few
  pixels off is neither right nor wrong for the densification.
* ``loss.kind: softmax``: cross-entropy of a softmax over all target cells (scores over
  ``temperature``) against the cell nearest the true position: the measured alternative.

The descriptor starts from random initialisation or, with ``model.backbone_init``, from the
trunk of another checkpoint of the same width (the shipped ``hilm``, trained here from
random init); the exported record's config says which.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

import numpy as np
import torch

from dense_match_ros.core.networks.deepmatching import (ATOMIC, TRAINING_ONLY, DeepMatchingConfig,
                                                        DeepMatchingNet, config_from_dict)
from dense_match_ros.core.checkpoint import load_trunk, read_record, write_record
from dense_match_ros.evaluation.calibrate import CALIBRATION_SEED, calibration_pairs
from dense_match_ros.training.tasks import TrainTask, fill, split_model

TRAINING_KEYS = TRAINING_ONLY
LOSSES = ('margin', 'softmax')


@dataclasses.dataclass
class DeepMatchingLossConfig:
    kind: str = 'margin'
    margin: float = 0.1
    """Hinge margin on level-normalised scores (in [0, 1])."""
    radius: float = 8.0
    """Positions farther than this (px) from the truth must score lower."""
    true_radius: int = 1
    """Cells around the true position whose best score counts as the true score."""
    temperature: float = 0.02
    """Softmax temperature on level-normalised scores (``kind: softmax``)."""


def build_network(model_config: dict) -> DeepMatchingNet:
    arch, train_keys = split_model(model_config, DeepMatchingConfig, TRAINING_KEYS,
                                   'deepmatching model')
    net = DeepMatchingNet(config_from_dict(arch))
    init = train_keys.get('backbone_init')
    if init:
        if net.backbone is None:
            raise ValueError('model.backbone_init needs descriptor: backbone')
        load_trunk(net.backbone, init, f'width {net.config.width} '
                                               f'(batch_norm {net.config.batch_norm})')
    whole = train_keys.get('init_weights')
    if whole:
        from dense_match_ros.training import checkpoint as ckpt
        other, state, _ = ckpt.load_weights(whole, 'deepmatching')
        if config_from_dict(other).width != net.config.width:
            raise ValueError(f'{whole}: expected width {net.config.width}, found {other.get("width")}')
        net.load_state_dict(state)
    return net


def patch_targets(flow: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int], stride: int,
                  target: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(true top-left target cell (B, P, 2) x, y float, usable (B, P) bool) of each atomic
    patch, from the flow (B, H, W, 2) at the patch centre."""
    gy, gx = grid
    ys = (torch.arange(gy, device=flow.device) * ATOMIC + ATOMIC // 2) * stride
    xs = (torch.arange(gx, device=flow.device) * ATOMIC + ATOMIC // 2) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing='ij')
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    f = flow[:, yy, xx].float()                                       # (B, P, 2) px
    ok = valid[:, yy, xx].bool() & torch.isfinite(f).all(-1)
    top_left = torch.stack([xx, yy], -1).float() / stride - ATOMIC / 2.0
    cell = top_left[None] + torch.nan_to_num(f) / stride
    ht, wt = target
    ok &= (cell[..., 0] >= 0) & (cell[..., 0] <= wt - 1) & (cell[..., 1] >= 0) & (cell[..., 1] <= ht - 1)
    return cell, ok


def deepmatching_loss(scores: torch.Tensor, levels: int, cell: torch.Tensor, usable: torch.Tensor,
                      stride: int, config: dict) -> tuple[torch.Tensor, dict]:
    """The loss of one batch of atomic volumes (B, Gy, Gx, Ht, Wt) and its diagnostics."""
    b, gy, gx, ht, wt = scores.shape
    s = scores.float().reshape(b, gy * gx, ht, wt) / float(levels + 1)
    yy = torch.arange(ht, device=s.device).view(1, 1, -1, 1).float()
    xx = torch.arange(wt, device=s.device).view(1, 1, 1, -1).float()
    dy, dx = yy - cell[..., 1, None, None], xx - cell[..., 0, None, None]
    with torch.no_grad():
        flat = s.reshape(b, gy * gx, -1)
        best = flat.argmax(-1)
        err_px = torch.stack([best % wt - cell[..., 0], best // wt - cell[..., 1]], -1).norm(dim=-1) * stride
        n = usable.sum().clamp(min=1)
        metrics = {'match_px': float(err_px[usable].mean()) if usable.any() else 0.0,
                   'acc@10': float(((err_px < 10) & usable).sum() / n)}
    if not usable.any():
        return s.sum() * 0.0, metrics
    if config['kind'] == 'softmax':
        target = (cell[..., 1].round().clamp(0, ht - 1) * wt + cell[..., 0].round().clamp(0, wt - 1)).long()
        logits = s.reshape(b, gy * gx, -1) / float(config['temperature'])
        ce = torch.nn.functional.cross_entropy(logits[usable], target[usable])
        return ce, metrics
    r_true = float(config['true_radius'])
    near = (dy.abs() <= r_true) & (dx.abs() <= r_true)
    far = (dy.square() + dx.square()) > (float(config['radius']) / stride) ** 2
    low = torch.finfo(s.dtype).min
    true_score = s.masked_fill(~near, low).amax((-2, -1))
    far_score = s.masked_fill(~far, low).amax((-2, -1))
    hinge = torch.relu(float(config['margin']) + far_score - true_score)
    return hinge[usable].mean(), metrics


class DeepMatchingTask(TrainTask):
    """``deepmatching``: the descriptor (and the rectification exponent) through the pyramid."""

    name = 'deepmatching'

    def model_config(self, values: dict) -> dict:
        arch, train_keys = split_model(values, DeepMatchingConfig, TRAINING_KEYS, 'deepmatching model')
        full = dataclasses.asdict(config_from_dict(arch))
        if full['descriptor'] != 'backbone':
            raise ValueError('deepmatching trains the backbone descriptor (the HOG one has no '
                             'weights): remove model.descriptor')
        full.update({'backbone_init': None, 'init_weights': None, **train_keys})
        return full

    def loss_config(self, values: dict) -> dict:
        cfg = fill(DeepMatchingLossConfig, values, 'deepmatching loss')
        if cfg.kind not in LOSSES:
            raise ValueError(f'loss.kind must be one of {LOSSES}, got {cfg.kind!r}')
        if not cfg.radius > 0 or not cfg.temperature > 0 or cfg.true_radius < 0:
            raise ValueError('loss.radius and loss.temperature must be > 0, loss.true_radius >= 0')
        return dataclasses.asdict(cfg)

    def build_model(self, model_config: dict) -> DeepMatchingNet:
        return build_network(model_config)

    def loss(self, model, batch, loss_config):
        net = model.module if hasattr(model, 'module') else model
        src = batch['source'].float() / 255.0
        tgt = batch['target'].float() / 255.0
        out = model(src, tgt)
        b, gy, gx, ht, wt = out.scores.shape
        cell, usable = patch_targets(batch['flow'], batch['valid'], (gy, gx), net.stride, (ht, wt))
        loss, metrics = deepmatching_loss(out.scores, out.levels, cell, usable, net.stride, loss_config)
        metrics['exponent'] = float(net.rectifier().detach())
        metrics['usable'] = float(usable.float().mean())
        return loss, metrics


# ======================================================================================
# the kept matches' score floor (``min_score``)
# ======================================================================================

MIN_SCORES = tuple(round(0.02 * i, 2) for i in range(41))   # 0.0, 0.02 ... 0.8


CONSISTENCY_PX = (0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0)
"""The neighbour-consistency limits tried (working pixels; 0: off)."""


def fit_min_score(matcher, pairs: Sequence, floors: Sequence[float] = MIN_SCORES,
                  progress: bool = False) -> dict:
    """The ``min_score`` whose kept matches give the lowest mean dense AEPE after
    densification over ``pairs`` (averaged with the neighbouring floors' to steady it).

    Why the dense error and not the matches' own accuracy: a wrong match misleads the
    interpolation around it more than a missing one costs, and the dense flow is what the
    matcher returns. Each pair's candidates are matched once; only the floor moves.
    """
    return _fit_setting(matcher, pairs, floors, 'min_score', progress,
                        lambda ps, pt, score, eligible, floor: eligible & (score >= floor))


def fit_consistency(matcher, pairs: Sequence, limits: Sequence[float] = CONSISTENCY_PX,
                    progress: bool = False) -> dict:
    """The ``consistency_px`` (at the matcher's ``min_score``) chosen the same way as the
    floor: lowest smoothed mean dense AEPE after densification over ``pairs``."""
    return _fit_setting(matcher, pairs, limits, 'consistency_px', progress,
                        lambda ps, pt, score, eligible, limit: matcher.kept(
                            ps, pt, eligible & (score >= matcher.min_score), limit))


def _fit_setting(matcher, pairs: Sequence, values: Sequence[float], name: str, progress: bool,
                 keep_for) -> dict:
    """Mean dense AEPE over ``pairs`` for each value of a keep rule ``keep_for(ps, pt, score,
    eligible, value)``; the value whose mean with its neighbours' is lowest wins."""
    from tqdm import tqdm
    from dense_match_ros.core.geometry import grid
    from dense_match_ros.evaluation import metrics
    aepe = np.zeros(len(values))
    kept = np.zeros(len(values))
    for pair in tqdm(pairs, desc=name, disable=not progress):
        h, w = pair.source.shape[:2]
        th, tw = pair.target.shape[:2]
        src, tgt = matcher.working_images(pair.source, pair.target)
        ps, pt, score, _, eligible = matcher.candidates(src, tgt)
        valid = np.asarray(pair.valid, bool) & np.isfinite(pair.flow).all(-1)
        for i, value in enumerate(values):
            keep = keep_for(ps, pt, score, eligible, value)
            flow = matcher.densify(src, tgt, ps[keep], pt[keep])
            flow, _ = grid.to_source_grid(flow, None, (w, h), tgt.shape[1::-1], (tw, th))
            aepe[i] += metrics.aepe(flow, pair.flow, valid)
            kept[i] += np.count_nonzero(keep)
    aepe /= max(1, len(pairs))
    kept /= max(1, len(pairs))
    # The curve is jagged (one pair's interpolation can fail or recover between two close
    # values): the chosen value is the best of its mean with both neighbours.
    smooth = np.convolve(np.pad(aepe, 1, mode='edge'), np.ones(3) / 3.0, mode='valid')
    best = int(np.argmin(smooth))
    return {name: float(values[best]), 'aepe': float(aepe[best]),
            'aepe_smoothed': float(smooth[best]),
            'curve': {name: [float(v) for v in values], 'aepe': aepe.tolist(),
                      'kept_per_pair': kept.tolist()}}


def _run_fit(command: str, name: str, fit_for, argv: Sequence[str] | None,
             methods: tuple[str, ...] = ('deepmatching',)):
    """Parse a fit command's arguments, fit ``name`` with ``fit_for(matcher, pairs,
    progress=...)`` on the calibration pairs and print it: (arguments, matcher, fit)."""
    p = argparse.ArgumentParser(prog=f'python -m dense_match_ros.training.deepmatching_task {command}',
                                description=f"fit deepmatching's {name} on held-out synthetic "
                                'pairs (held-out photos, seed 7)')
    p.add_argument('--method', default=methods[0], choices=methods)
    p.add_argument('--weights', default=None)
    p.add_argument('--pairs', type=int, default=40)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--write', action='store_true',
                   help=f"store it as calibration.{name} in the checkpoint's JSON record")
    args = p.parse_args(argv)
    from dense_match_ros.core.device import set_threads
    from dense_match_ros.core.registry import load_matcher
    set_threads(args.threads)
    matcher = load_matcher(args.method, device='cpu', weights=args.weights)
    # The pairs dense-match-calibrate fits on (every warp kind, half with moving objects):
    # the setting is chosen on the mix of motions the matcher meets, not on one kind of it.
    fit = fit_for(matcher, calibration_pairs(args.pairs), progress=not args.no_progress)
    print(json.dumps({name: fit[name], 'aepe': round(fit['aepe'], 4),
                      'aepe_smoothed': round(fit['aepe_smoothed'], 4)}))
    print('curve: ' + '  '.join(f'{f:g}->{a:.3f}' for f, a in
                                zip(fit['curve'][name], fit['curve']['aepe'])))
    return args, matcher, fit


def _write_fit(command: str, name: str, args, matcher, argv: Sequence[str] | None,
               criterion: str, update) -> int:
    """``update(record, described)`` on the checkpoint's JSON record, then write it back;
    ``described`` holds the fit's pairs, criterion and command. 2 without a checkpoint file."""
    if not matcher.weights:
        print('--write: this matcher has no checkpoint file', file=sys.stderr)
        return 2
    record = read_record(matcher.weights)
    update(record, {'set': f'held-out pairs of every kind, half with moving objects (held-out '
                           f'photos, {args.pairs} pairs, seed {CALIBRATION_SEED}, 240x240)',
                    'criterion': criterion,
                    'command': f'python -m dense_match_ros.training.deepmatching_task {command} '
                               + ' '.join(argv if argv is not None else sys.argv[2:])})
    print(f'wrote calibration.{name} into {write_record(matcher.weights, record)}')
    return 0


def min_score_main(argv: Sequence[str] | None = None) -> int:
    args, matcher, fit = _run_fit('min-score', 'min_score', fit_min_score, argv,
                                  methods=('deepmatching', 'deepmatching-hog'))

    def update(record: dict, described: dict) -> None:
        previous = record.get('calibration') or {}
        # A new floor replaces the whole calibration: a consistency limit was fitted at the
        # old floor, so it goes too (fit it again with the consistency command).
        record['calibration'] = {
            'min_score': fit['min_score'],
            **({'replaced': {'min_score': previous['min_score'],
                             'set': (previous.get('fit') or {}).get('set')}}
               if previous.get('min_score') is not None else {}),
            'fit': {'set': described['set'], 'criterion': described['criterion'], **fit,
                    'command': described['command']}}

    if not args.write:
        return 0
    return _write_fit('min-score', 'min_score', args, matcher, argv,
                      'lowest mean dense AEPE after densification', update)


def consistency_main(argv: Sequence[str] | None = None) -> int:
    args, matcher, fit = _run_fit('consistency', 'consistency_px', fit_consistency, argv)

    def update(record: dict, described: dict) -> None:
        calibration = record.setdefault('calibration', {})
        calibration['consistency_px'] = fit['consistency_px']
        calibration['consistency_fit'] = {'set': described['set'],
                                          'criterion': described['criterion'], **fit,
                                          'command': described['command']}

    if not args.write:
        return 0
    return _write_fit('consistency', 'consistency_px', args, matcher, argv,
                      f'lowest mean dense AEPE after densification, at min_score '
                      f'{matcher.min_score:g}', update)


COMMANDS = {'min-score': min_score_main, 'consistency': consistency_main}

if __name__ == '__main__':
    if sys.argv[1:2] and sys.argv[1] in COMMANDS:
        sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
    raise SystemExit('usage: python -m dense_match_ros.training.deepmatching_task '
                     'min-score|consistency [options]')
