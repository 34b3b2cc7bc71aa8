"""Training CNNGeo (:mod:`core.networks.cnngeo`): the ``cnngeo-affine`` and ``cnngeo-tps`` tasks.

Two stages, as in the paper, each a task of the shared loop (:mod:`.loop`):

1. ``dense-match-train cnngeo-affine --config config/train_cnngeo_affine_cpu.yaml``: the
   trunk and the affine regressor (``model.tps`` is false);
2. ``dense-match-train cnngeo-tps --config config/train_cnngeo_tps_cpu.yaml --set
   model.affine_weights=runs/cnngeo_affine_cpu/last.pt``: the whole network with the
   affine stage (and the trunk) of stage 1 frozen; only the TPS regressor learns, on the
   pair the affine stage aligned, which is the pair it meets at run time.

Loss (the paper's grid loss): the mean squared distance between a ``grid_points`` x
``grid_points`` grid on [-1, 1] mapped by the predicted and by the true transform. The
true points come from the synthetic pair's own parameters (any kind: affine, TPS,
homography, similarity), so the affine stage learns the best affine of a TPS or
homography in this sense; stage 2's loss is on the *composed* transform, what ``cnngeo``
returns. Points are normalised coordinates (1 px = 2 / size).

``loss.match_weight`` > 0 adds a dense signal for the trunk (not in the paper): a softmax
cross-entropy over the raw pool4 correlation, whose label for each source cell is the target
cell its true correspondence falls in. Six regressed parameters say little about which of
225 cells matched; measured on the held-out pairs, only about half of the shipped trunk's
best correlations land within one cell of the truth (``scripts/cnngeo_corr_probe.py``).
It acts only where the trunk learns (``model.freeze_backbone=false``). ``loss.level_match``
(e.g. ``[conv4, conv3]``, weight ``loss.level_match_weight``) adds the same cross-entropy at
shallower levels, on source cells drawn per pair: the levels DMP's finer pyramid matches on.

The trunk starts from random initialisation or, with ``model.backbone_init``, from another
method's checkpoint of the same width (the shipped ``hilm`` trunk, trained here from
random init), frozen with ``model.freeze_backbone`` or fine-tuned.

``python -m dense_match_ros.training.cnngeo_task ensemble --member A --member B [--tps T]
--out W`` joins affine stages trained apart (on different ``data.ranges``) into the paper's
ensemble, whose parameters are averaged (one trunk: the members must share it, as runs on
the same frozen trunk do), with T's TPS stage on top when given.

``python -m dense_match_ros.training.cnngeo_task sigma --weights W --write`` fits the
matchability's round-trip sigma on held-out synthetic pairs (held-out photos, a seed other
than the evaluation set's) and stores it in W's record (``--method cnngeo-affine``: the
affine stage's own sigma).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

import numpy as np
import torch

from dense_match_ros.core.geometry import grid, parametric, transforms as tf
from dense_match_ros.core.networks.cnngeo import CnnGeoConfig, CnnGeoNet, config_from_dict
from dense_match_ros.core.checkpoint import load_trunk, read_record, write_record
from dense_match_ros.training.match_losses import (LEVEL_STRIDES, cell_labels, match_loss,
                                                   sampled_match_loss)
from dense_match_ros.training.tasks import TrainTask, fill, split_model

TRAINING_KEYS = ('backbone_init', 'freeze_backbone', 'init_weights', 'affine_weights', 'tps_init')
"""Model-section keys that shape training, not the architecture (kept in the config record)."""
STAGE_METHODS = ('cnngeo-affine', 'cnngeo-tps')
ARCH_KEYS = ('width', 'batch_norm', 'input_size', 'normalize_matches', 'channels', 'kernel_sizes')
"""What two stages built on one another, or the members of an ensemble, must agree on."""


@dataclasses.dataclass
class CnnGeoLossConfig:
    grid_points: int = 21
    """Loss points per side of the regular grid on [-1, 1] (the paper's 21)."""
    match_weight: float = 0.0
    """Weight of the correlation cross-entropy (0: the paper's grid loss alone)."""
    match_temperature: float = 0.07
    """Cosine scale of that cross-entropy's softmax (logits = cosine / temperature)."""
    level_match: tuple[str, ...] = ()
    """Shallower trunk levels (``conv3``, ``conv4``) that get the same cross-entropy: the
    levels DMP's finer pyramid levels correlate, which the grid loss and the pool4 term
    reach only through pool4. HiLM's idea (a metric loss at a shallow level and a deep one)
    on this trunk."""
    level_match_weight: float = 0.0
    """Weight of each ``level_match`` level's cross-entropy."""
    level_points: int = 256
    """Source cells drawn per pair and level: a shallow level's whole correlation (3,600
    cells squared for conv3 at 240x240) would not fit a CPU batch."""


def _shallow_levels(loss_config: dict) -> tuple[str, ...]:
    """The ``level_match`` levels, or none when their weight is 0."""
    if float(loss_config.get('level_match_weight', 0.0)) <= 0:
        return ()
    return tuple(loss_config.get('level_match') or ())


def _load_state(path: str, what: str) -> tuple[dict, dict]:
    """(model config, float32 state) of a cnngeo checkpoint of either stage."""
    from dense_match_ros.training import checkpoint as ckpt
    from dense_match_ros.core.checkpoint import checkpoint_method
    found = checkpoint_method(path)
    model_config, state, _ = ckpt.load_weights(path, found if found in STAGE_METHODS
                                               else ' or '.join(STAGE_METHODS))
    return model_config, state


def _check_same(model_config: dict, other: dict, path: str, keys: Sequence[str]) -> None:
    """Refuse a checkpoint whose architecture differs, naming what was expected and found."""
    mine, theirs = config_from_dict(model_config), config_from_dict(other)
    for key in keys:
        a, b = getattr(mine, key), getattr(theirs, key)
        if a != b:
            raise ValueError(f'{path}: expected {key} {a}, found {b} in the checkpoint')


def build_network(model_config: dict, stage: str) -> CnnGeoNet:
    """The network of a model config, initialised and frozen as the config and stage ask."""
    arch, train_keys = split_model(model_config, CnnGeoConfig, TRAINING_KEYS, 'cnngeo model')
    net = CnnGeoNet(config_from_dict(arch))
    init = train_keys.get('backbone_init')
    if init:
        load_trunk(net.backbone, init, f'width {net.config.width} '
                                               f'(batch_norm {net.config.batch_norm})')
    affine = train_keys.get('affine_weights')
    if affine:
        # Stage 2 starts from stage 1: trunk and affine regressor (the TPS regressor, absent
        # from an affine run, keeps its identity initialisation).
        other, state = _load_state(affine, 'affine_weights')
        # An ensemble's affine stage is taken whole: model.affine_members must say so.
        _check_same(arch, other, affine, ARCH_KEYS + ('affine_members',))
        state = {k: v for k, v in state.items() if not k.startswith('tps.')}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith('tps.') for k in missing):
            raise ValueError(f'{affine}: does not fit this network (missing {missing[:3]}, '
                             f'unexpected {unexpected[:3]})')
    whole = train_keys.get('init_weights')
    if whole:
        other, state = _load_state(whole, 'init_weights')
        _check_same(arch, other, whole, ('width', 'input_size', 'tps'))
        net.load_state_dict(state)
    tps_init = train_keys.get('tps_init')
    if tps_init:
        # Only the TPS regressor, over whatever trunk and affine stage the keys above gave:
        # a TPS stage trained on another trunk is a better start than the identity, though
        # the ensemble join refuses it (it reads a correlation of other features).
        if net.tps is None:
            raise ValueError('model.tps_init starts the TPS regressor: train cnngeo-tps')
        other, state = _load_state(tps_init, 'tps_init')
        _check_same(arch, other, tps_init, ('input_size', 'channels', 'kernel_sizes'))
        part = _part(state, 'tps.')
        if not part:
            raise ValueError(f'{tps_init}: holds no TPS stage (model.tps_init)')
        net.tps.load_state_dict(part)
    frozen = ['backbone'] if train_keys.get('freeze_backbone') else []
    if stage == 'tps':
        frozen = ['backbone', 'affine']
    if frozen:
        net.freeze(frozen)
    return net


def true_points(pairs: list, n: int) -> np.ndarray:
    """(B, n*n, 2) float32: the loss grid mapped by each pair's true transform."""
    points = parametric.grid_points(n, dtype=torch.float64).numpy()
    out = []
    for pair in pairs:
        kind, theta = pair.params['kind'], np.asarray(pair.params['theta'])
        out.append(tf.apply_transform(kind, theta, points))
    return np.nan_to_num(np.stack(out), nan=0.0).astype(np.float32)


def predicted_points(out, stage: str, points: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) the loss grid mapped by the stage's prediction (the composition for 'tps')."""
    if stage == 'affine':
        return parametric.transform_points_torch('affine', out.affine.float(), points)
    return parametric.transform_points_torch('tps', out.composed.float(), points)


def grid_loss(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean over points (and batch) of the squared distance: the paper's grid loss."""
    return (predicted.float() - truth.float()).square().sum(-1).mean()


class _CnnGeoTask(TrainTask):
    stage = 'affine'

    def model_config(self, values: dict) -> dict:
        arch, train_keys = split_model(values, CnnGeoConfig, TRAINING_KEYS, 'cnngeo model')
        wants_tps = self.stage == 'tps'
        if 'tps' in arch and bool(arch['tps']) != wants_tps:
            raise ValueError(f'{self.name} trains model.tps={wants_tps}; remove model.tps')
        full = dataclasses.asdict(config_from_dict({**arch, 'tps': wants_tps}))
        for key in ('input_size', 'channels', 'kernel_sizes'):
            full[key] = list(full[key])
        full.update({'backbone_init': None, 'freeze_backbone': False, 'init_weights': None,
                     'affine_weights': None, 'tps_init': None, **train_keys})
        if wants_tps and not (full['affine_weights'] or full['init_weights']):
            raise ValueError(f'{self.name} starts from a trained affine stage: set '
                             f'model.affine_weights=RUN/last.pt (a cnngeo-affine run)')
        return full

    def loss_config(self, values: dict) -> dict:
        cfg = fill(CnnGeoLossConfig, values, 'cnngeo loss')
        if cfg.grid_points < 2:
            raise ValueError(f'loss.grid_points must be >= 2, got {cfg.grid_points}')
        if cfg.match_weight < 0 or cfg.match_temperature <= 0:
            raise ValueError(f'loss.match_weight must be >= 0 and loss.match_temperature > 0, '
                             f'got {cfg.match_weight} and {cfg.match_temperature}')
        shallow = set(cfg.level_match) - set(LEVEL_STRIDES)
        if shallow:
            raise ValueError(f'loss.level_match: {sorted(shallow)} are not trunk levels above '
                             f'pool4; choose from {sorted(LEVEL_STRIDES)}')
        if cfg.level_match_weight < 0 or cfg.level_points < 1:
            raise ValueError(f'loss.level_match_weight must be >= 0 and loss.level_points >= 1, '
                             f'got {cfg.level_match_weight} and {cfg.level_points}')
        out = dataclasses.asdict(cfg)
        out['level_match'] = list(cfg.level_match)
        return out

    def build_model(self, model_config: dict) -> CnnGeoNet:
        return build_network(model_config, self.stage)

    def extra_batch(self, pairs: list, rng: np.random.Generator, loss_config: dict) -> dict:
        extra = {'points': true_points(pairs, int(loss_config.get('grid_points', 21)))}
        h, w = pairs[0].source.shape[:2]
        for level in _shallow_levels(loss_config):
            stride = LEVEL_STRIDES[level]
            extra[f'keys_{level}'] = rng.random((len(pairs), (h // stride) * (w // stride)),
                                                dtype=np.float32)
        return extra

    def loss(self, model, batch, loss_config):
        net = model.module if hasattr(model, 'module') else model
        src = batch['source'].float() / 255.0
        tgt = batch['target'].float() / 255.0
        weight = float(loss_config.get('match_weight', 0.0))
        temperature = float(loss_config.get('match_temperature', 0.07))
        learns = 'backbone' not in net.frozen
        pool4 = weight > 0 and learns
        shallow = _shallow_levels(loss_config) if learns else ()
        extra, dense = {}, []
        if pool4 or shallow:
            # Through the (possibly wrapped) model's forward, so the features serve every loss
            # in one trunk pass and a multi-process wrapper synchronises their gradients.
            out = model(src, tgt, stages=self.stage, with_features=True, feature_levels=shallow)
            if pool4:
                ce, acc = match_loss(*out.features, cell_labels(batch['flow'], batch['valid']),
                                     temperature)
                dense.append(weight * ce)
                extra.update({'match_ce': float(ce.detach()), 'match_acc': acc})
            level_weight = float(loss_config['level_match_weight'])
            for level in shallow:
                labels = cell_labels(batch['flow'], batch['valid'], LEVEL_STRIDES[level])
                ce, acc = sampled_match_loss(*out.levels[level], labels, batch[f'keys_{level}'],
                                             int(loss_config['level_points']), temperature)
                dense.append(level_weight * ce)
                extra.update({f'match_ce_{level}': float(ce.detach()), f'match_acc_{level}': acc})
        else:
            out = model(src, tgt, stages=self.stage)
        points = parametric.grid_points(int(loss_config['grid_points']), device=src.device)
        truth = batch['points'].float()
        pred = predicted_points(out, self.stage, points)
        loss = grid_loss(pred, truth)
        for term in dense:
            loss = loss + term
        with torch.no_grad():
            half = torch.tensor([s / 2.0 for s in reversed(net.config.input_size)], device=src.device)
            dist_px = ((pred.float() - truth) * half).norm(dim=-1).mean()
            metrics = {'grid_px': float(dist_px), **extra}
            if self.stage == 'tps':
                affine = parametric.transform_points_torch('affine', out.affine.float(), points)
                metrics['grid_px_affine'] = float(((affine - truth) * half).norm(dim=-1).mean())
        return loss, metrics


class CnnGeoAffineTask(_CnnGeoTask):
    """``cnngeo-affine``: trunk (unless frozen) and affine regressor."""

    name = 'cnngeo-affine'
    stage = 'affine'


class CnnGeoTpsTask(_CnnGeoTask):
    """``cnngeo-tps``: the TPS regressor on the pair aligned by a frozen affine stage."""

    name = 'cnngeo-tps'
    stage = 'tps'


# ======================================================================================
# the affine ensemble
# ======================================================================================

def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def join_ensemble(members: Sequence[str], tps: str | None = None) -> tuple[dict, dict]:
    """(model config, state) of one network whose affine stage averages the affine stages
    of ``members`` (checkpoints of either stage), with the TPS stage of ``tps`` if given.
    One member with ``tps`` puts that affine stage under T's TPS stage (the start of a TPS
    stage trained on from T over a new affine stage: ``model.init_weights``).

    The trunk is shared, so every member (and ``tps``) must hold the same one, bit for bit:
    runs on one frozen trunk do; runs that fine-tuned theirs cannot be joined this way.
    """
    if len(members) < (1 if tps else 2):
        raise ValueError('an ensemble needs at least two affine stages (--member twice); '
                         'one affine stage goes under a TPS stage only (--tps)')
    loaded = [(path, *_load_state(path, 'member')) for path in members]
    first_path, first_config, first_state = loaded[0]
    trunk = _part(first_state, 'backbone.')
    others = loaded[1:] + ([(tps, *_load_state(tps, 'tps'))] if tps else [])
    for path, config, state in others:
        _check_same(first_config, config, path, ARCH_KEYS)
        theirs = _part(state, 'backbone.')
        if theirs.keys() != trunk.keys() or any(not torch.equal(trunk[k], theirs[k]) for k in trunk):
            raise ValueError(f'{path}: its trunk differs from {first_path}\'s; an ensemble shares '
                             f'one trunk (train the members on the same frozen one)')
    state = {f'backbone.{k}': v for k, v in trunk.items()}
    for i, (path, config, member) in enumerate(loaded):
        prefix = 'affine.' if i == 0 else f'affine_others.{i - 1}.'
        if int(config.get('affine_members', 1)) != 1:
            raise ValueError(f'{path}: is an ensemble already; join single affine stages')
        state.update({prefix + k: v for k, v in _part(member, 'affine.').items()})
    if tps:
        state.update({f'tps.{k}': v for k, v in _part(others[-1][2], 'tps.').items()})
    arch = {k: v for k, v in first_config.items() if k not in TRAINING_KEYS}
    config = {**arch, 'affine_members': len(members), 'tps': bool(tps)}
    CnnGeoNet(config_from_dict(config)).load_state_dict(state)  # refuses anything missing
    return config, state


def provenance(path: str) -> dict:
    """How an affine stage was made: a shipped checkpoint's record (command and stages), or
    a run's training state (command, steps and minutes), which has no record beside it."""
    from dense_match_ros.training import checkpoint as ckpt
    record = read_record(path)
    if record:
        return {'weights': path, 'command': record.get('command'), 'stages': record.get('stages')}
    return {'weights': path, **ckpt.run_summary(ckpt.load_training_state(path))}


def ensemble_main(argv: Sequence[str] | None = None) -> int:
    from dense_match_ros.training import checkpoint as ckpt
    from dense_match_ros.training.cli import stages_after
    p = argparse.ArgumentParser(prog='python -m dense_match_ros.training.cnngeo_task ensemble',
                                description="join affine stages trained apart into the paper's "
                                'ensemble (parameters averaged), optionally under a TPS stage')
    p.add_argument('--member', action='append', required=True,
                   help='an affine stage (a cnngeo run or shipped checkpoint); twice or more')
    p.add_argument('--tps', default=None, help='take the TPS stage from this cnngeo-tps checkpoint')
    p.add_argument('--out', required=True, help='shipped-format weights to write (fp16)')
    p.add_argument('--note', default='')
    args = p.parse_args(argv)
    config, state = join_ensemble(args.member, args.tps)
    method = 'cnngeo-tps' if args.tps else 'cnngeo-affine'
    command = 'python -m dense_match_ros.training.cnngeo_task ensemble ' + ' '.join(
        argv if argv is not None else sys.argv[2:])
    members = [provenance(m) for m in args.member]
    record = {'command': command, 'note': args.note,
              'ensemble': {'members': members, 'tps': args.tps}}
    if args.tps:
        # The affine stage(s) are this stage's news: the chain keeps how they were trained.
        record['stages'] = stages_after(args.tps, {'command': command, 'affine_members': members})
    out = ckpt.export_weights({'model': state, 'method': method, 'config': {'model': config},
                               'step': 0}, args.out, record)
    print(json.dumps({k: out[k] for k in ('file', 'method', 'sha256', 'bytes')}))
    return 0


# ======================================================================================
# the matchability's sigma
# ======================================================================================

SIGMA_SEED = 7  # the calibration seed of evaluation.calibrate, not the evaluation set's 2026
SIGMAS_PX = tuple(float(s) for s in np.geomspace(0.25, 64.0, 33))


def fit_sigma(matcher, pairs: Sequence, sigmas: Sequence[float] = SIGMAS_PX) -> dict:
    """The round-trip sigma maximising the mean matchability Jaccard index (matchability >
    0.5 against the pixels whose true match lies in the target) over ``pairs``.

    The round-trip error of each pair is computed once; only the threshold moves.
    """
    scores = np.zeros(len(sigmas))
    for pair in pairs:
        h, w = pair.source.shape[:2]
        th, tw = pair.target.shape[:2]
        kind, theta, _ = matcher.predict(pair.source, pair.target)
        theta = theta.cpu()
        error = matcher.round_trip(kind, theta, (w, h))
        inside = parametric.inside(parametric.dense_map(kind, theta[:1], (w, h))[0]).numpy()
        truth = np.asarray(pair.valid, bool) & grid.in_bounds(pair.flow, (tw, th))
        for i, sigma in enumerate(sigmas):
            # exp(-e^2 / 2 sigma^2) > 0.5  <=>  e < sigma sqrt(2 ln 2)
            pred = inside & (error < sigma * np.sqrt(2.0 * np.log(2.0)))
            union = np.count_nonzero(pred | truth)
            scores[i] += np.count_nonzero(pred & truth) / union if union else 1.0
    scores /= max(1, len(pairs))
    best = int(np.argmax(scores))
    return {'sigma_px': float(sigmas[best]), 'jaccard': float(scores[best]),
            'curve': {'sigma_px': list(map(float, sigmas)), 'jaccard': scores.tolist()}}


def sigma_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m dense_match_ros.training.cnngeo_task sigma',
                                description='fit the cnngeo matchability sigma on held-out '
                                'synthetic pairs (held-out photos, seed 7)')
    p.add_argument('--method', default='cnngeo', choices=('cnngeo', 'cnngeo-affine'))
    p.add_argument('--weights', default=None)
    p.add_argument('--pairs', type=int, default=40)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--write', action='store_true',
                   help="store it as calibration.sigma_px in the checkpoint's JSON record")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    from dense_match_ros.core.methods.cnngeo import SIGMA_KEYS
    from dense_match_ros.core.registry import load_matcher
    from dense_match_ros.data.photos import PhotoSource
    from dense_match_ros.data.synthetic import SyntheticPairGenerator
    matcher = load_matcher(args.method, device='cpu', weights=args.weights)
    gen = SyntheticPairGenerator(PhotoSource(split='heldout'), size=(240, 240))
    pairs = [gen.pair(SIGMA_SEED, i) for i in range(args.pairs)]
    fit = fit_sigma(matcher, pairs)
    print(json.dumps({k: fit[k] for k in ('sigma_px', 'jaccard')}))
    if args.write:
        record = read_record(matcher.weights)
        key = SIGMA_KEYS[matcher.stages]
        calibration = dict(record.get('calibration') or {})
        calibration[key] = fit['sigma_px']
        calibration.setdefault('fits', {})[args.method] = {
            **fit, 'pairs': args.pairs, 'seed': SIGMA_SEED,
            'command': 'python -m dense_match_ros.training.cnngeo_task sigma '
                       + ' '.join(argv if argv is not None else sys.argv[2:])}
        record['calibration'] = calibration
        print(f'wrote calibration.{key} into {write_record(matcher.weights, record)}')
    return 0


COMMANDS = {'sigma': sigma_main, 'ensemble': ensemble_main}

if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit('usage: python -m dense_match_ros.training.cnngeo_task '
                         f'{{{"|".join(COMMANDS)}}} [options]')
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
