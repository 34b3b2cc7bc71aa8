"""DMP's test-time optimisation (Sec. 3.4): fit the matching network to one pair.

The loss needs no ground truth: the target, warped onto the source grid by the network's
final flow, must look like the source *to the network's own features*. At every pyramid
level, M random source positions are compared with the warped target at the same positions
by a contrastive (InfoNCE) loss of temperature tau: each warped feature must be nearer its
own source position than the other M-1. The confidence-aware version leaves out positions
whose probability of the true position is below phi (occluded or out-of-view points, which
no flow can make similar).

Two ways to get the warped target's features (``warp``):

* ``'features'`` (default): the target's trunk features, computed once per pair, adapted and
  sampled at the flow's positions on each level's grid. Only the adaptation and residual
  modules are in the backward pass: the CPU path;
* ``'image'``: the paper's way, the target image itself warped by the final flow and run
  through the trunk at every iteration (gradients pass through the frozen trunk to the flow).

A-DMP (Sec. 3.5, ``augment`` > 0): a copy of the target warped by a random homography, whose
flow is therefore known, is matched to the target alongside the pair (one batch of two), and
its supervised flow loss (the pre-training's, :mod:`core.networks.dmp_supervision`) is added
with weight ``augment``: the network keeps matching this scene's own appearance correctly
while the unsupervised loss adapts it to the pair. Only the pair's loss ranks the iterates.

Stopping (:class:`Stopping`): the mean flow update over the last ``window`` iterations below
``min_update_px``, no new lowest loss for ``patience`` iterations, or the wall-time budget.
The lowest-loss iterate is returned, never a later, worse one; a non-finite loss ends the
loop with a warning and returns the best finite iterate.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dense_match_ros.core.device import autocast
from dense_match_ros.core.geometry import transforms as tf
from dense_match_ros.core.networks.dmp import DmpNet, DmpOutput, cell_centres, sample_at, unit
from dense_match_ros.core.networks.dmp_supervision import flow_loss
from dense_match_ros.core.networks.backbone import STRIDES

WARPS = ('features', 'image')


@dataclasses.dataclass
class Stopping:
    """When the per-pair optimisation ends (whichever comes first)."""

    iterations: int = 300
    """At most this many Adam steps (the paper: 300 from a pre-trained prior, 2000 without)."""
    min_update_px: float = 0.05
    """Converged when the final flow moved less than this (mean, working pixels) per step,
    averaged over the last ``window`` steps; 0 disables."""
    window: int = 10
    patience: int = 40
    """Stop after this many steps without a new lowest loss; 0 disables."""
    time_budget_s: float = 0.0
    """Wall-time budget of the whole call (trunk features included); no step starts that would
    end past it, judged by the last step's time; 0: none."""

    def check(self) -> None:
        if self.iterations < 0:
            raise ValueError(f'iterations must be >= 0, got {self.iterations}')
        if self.min_update_px < 0 or self.window < 1 or self.patience < 0 or self.time_budget_s < 0:
            raise ValueError('min_update_px, patience and time_budget_s must be >= 0 and window >= 1')


@dataclasses.dataclass
class LossSettings:
    """The test-time loss (paper defaults)."""

    samples: int = 256
    """M: positions compared per level and iteration."""
    tau: float = 0.1
    """InfoNCE temperature (features are L2-normalised)."""
    phi: float = 0.01
    """Confidence-aware threshold on the probability of the true position (0: keep all)."""
    warp: str = 'features'
    lr: float = 1e-4
    """Adam step size (on calibration pairs, from a mid-training prior: 1e-4 beat 3e-4 and 1e-3
    at 20 and 60 iterations; README, DMP)."""
    augment: float = 0.0
    """A-DMP: weight of the augmented pair's flow loss (0: plain DMP, one pair per step)."""
    augment_shift: float = 0.1
    """The augmented copy's homography moves each image corner by up to this share of the
    image's width and height."""

    def check(self) -> None:
        if not self.augment >= 0 or not 0 <= self.augment_shift <= 0.4:
            raise ValueError(f'augment must be >= 0 and augment_shift in [0, 0.4], got '
                             f'{self.augment} and {self.augment_shift}')
        if self.samples < 2:
            raise ValueError(f'samples must be >= 2 (a contrastive loss needs negatives), got {self.samples}')
        if not self.tau > 0 or not 0 <= self.phi < 1 or not self.lr > 0:
            raise ValueError('tau and lr must be > 0 and phi in [0, 1)')
        if self.warp not in WARPS:
            raise ValueError(f'warp must be one of {WARPS}, got {self.warp!r}')


class Optimised(NamedTuple):
    flow: torch.Tensor
    """(1, 2, H, W) working-grid flow of the lowest-loss iterate, pixels."""
    confidence: torch.Tensor
    """(1, 1, H, W) its confidence."""
    iterations: int
    """Adam steps taken."""
    best_iteration: int
    loss: float
    """Loss of the returned iterate (nan when no iterate had a finite loss)."""
    initial_loss: float
    reason: str
    """Why the loop ended: 'iterations', 'converged', 'plateau', 'time' or 'non-finite'."""


def contrastive(source: torch.Tensor, warped: torch.Tensor, index: torch.Tensor,
                settings: LossSettings) -> torch.Tensor:
    """Confidence-aware InfoNCE at the flat positions ``index`` of (1, C, h, w) normalised
    feature maps.

    A position whose probability of the true position is below phi adds no gradient (it is
    occluded or out of view: no flow can make it similar) but still counts, at the cap
    -log(phi), which no kept position exceeds. Dropping positions therefore never lowers the
    loss: with a plain mean over the kept ones, a flow that pushes positions out of view
    (where warped features are zero) would look better while getting worse.
    """
    # float32 whatever autocast says: in bf16 the M x M scores (up to 1/tau = 10) carry
    # errors of about 0.04, and the lowest-loss iterate was picked among near-ties.
    with torch.autocast(source.device.type, enabled=False):
        s = source.flatten(2)[0, :, index].float()                # (C, M)
        t = warped.flatten(2)[0, :, index].float()
        nll = -(s.t() @ t / settings.tau).log_softmax(1).diagonal()
    if settings.phi > 0:
        nll = nll.clamp(max=-math.log(settings.phi))
    return nll.mean()


class PairLoss(NamedTuple):
    value: torch.Tensor
    """What the step minimises: positions drawn afresh at every iteration."""
    score: float
    """The same loss at positions fixed for the whole call: what ranks the iterates (with
    fresh positions each time, the lowest loss would often be the luckiest draw)."""


def pair_loss(net: DmpNet, src: dict, tgt: dict, target_image: torch.Tensor, flow: torch.Tensor,
              settings: LossSettings, generator: torch.Generator,
              fixed: dict[str, torch.Tensor],
              adapted: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> PairLoss:
    """The test-time loss of a final flow (1, 2, H, W), summed over the levels. ``adapted``:
    the decode's adapted features of the same pair (:attr:`DmpOutput.adapted`), reused where
    given (the same values and gradients as adapting again, at half the adaptation cost)."""
    adapted = adapted or {}
    h, w = flow.shape[-2:]
    if settings.warp == 'image':
        origin = cell_centres(h, w, 1, flow.device)[None]
        warped_image = sample_at(target_image, origin + flow, (h, w))
        warped_feats = net.trunk(warped_image, levels=net.levels)
    value, score = None, 0.0
    for level in net.levels:
        s = STRIDES[level]
        lh, lw = src[level].shape[-2:]
        source, target = adapted.get(level) or (None, None)
        if settings.warp == 'image':
            warped = net.adapted(warped_feats, level)
        else:
            level_flow = F.interpolate(flow, size=(lh, lw), mode='area')
            positions = cell_centres(lh, lw, s, flow.device)[None] + level_flow
            target = net.adapt[level](tgt[level]) if target is None else target
            warped = unit(sample_at(target, positions, (h, w)))
        source = net.adapted(src, level) if source is None else source
        index = torch.randperm(lh * lw, generator=generator)[:settings.samples].to(flow.device)
        term = contrastive(source, warped, index, settings)
        value = term if value is None else value + term
        with torch.no_grad():
            score += float(contrastive(source, warped, fixed[level], settings))
    return PairLoss(value, score)


class Augmented(NamedTuple):
    """A-DMP's extra pair: ``image`` matched to the target, with its known flow."""

    image: torch.Tensor
    """(1, 3, H, W) the target resampled through the homography (reflected past its edges, so
    no black border gives the match away)."""
    flow: torch.Tensor
    """(1, 2, H, W) pixels: image (x, y) shows target (x+u, y+v)."""
    ok: torch.Tensor
    """(1, H, W) bool: the flow lands inside the target."""


def augmented_copy(target: torch.Tensor, shift: float, seed: int) -> Augmented:
    """A-DMP's warped copy of ``target`` (1, 3, H, W): a homography that moves each image
    corner by up to ``shift`` of the image's size, drawn from ``seed`` (one per call)."""
    h, w = target.shape[-2:]
    rng = np.random.default_rng(seed + 2)
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])
    moved = corners + rng.uniform(-1.0, 1.0, (4, 2)) * shift * np.array([w, h])
    homography = tf.homography_from_points(corners, moved)       # copy pixel -> target pixel
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    points = np.stack((xs, ys), -1)
    mapped, depth = tf.apply_homography(homography, points)
    flow = np.nan_to_num(mapped - points)
    ok = ((depth > 0) & (mapped[..., 0] >= -0.5) & (mapped[..., 0] < w - 0.5)
          & (mapped[..., 1] >= -0.5) & (mapped[..., 1] < h - 0.5))
    positions = torch.from_numpy(np.nan_to_num(mapped)).float().permute(2, 0, 1)[None]
    image = sample_at(target.float(), positions.to(target.device), (h, w), padding='reflection')
    flow_t = torch.from_numpy(flow).float().permute(2, 0, 1)[None].to(target.device)
    return Augmented(image.contiguous(memory_format=torch.channels_last), flow_t,
                     torch.from_numpy(ok)[None].to(target.device))


def fixed_positions(src: dict, levels, samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Per level, the positions that score every iterate of one call."""
    generator = torch.Generator().manual_seed(seed + 1)
    return {lv: torch.randperm(src[lv].shape[-2] * src[lv].shape[-1], generator=generator)[:samples]
            for lv in levels}


def optimise(net: DmpNet, source: torch.Tensor, target: torch.Tensor, stopping: Stopping,
             settings: LossSettings, amp=None, seed: int = 0,
             coarse: tuple[torch.Tensor, torch.Tensor] | None = None) -> Optimised:
    """Optimise ``net``'s trainable parts on one pair (images (1, 3, H, W) in [0, 1], the
    working size) and return the lowest-loss iterate. The network keeps the optimised
    weights; the caller restores them when each call must start afresh."""
    device = source.device
    started = last = time.perf_counter()
    src, tgt = net.trunk_features(source), net.trunk_features(target)
    size = tuple(source.shape[-2:])
    # What decode sees: the pair alone, or (A-DMP) the pair and the augmented copy as a batch.
    batch_src, batch_tgt, batch_coarse, aug = src, tgt, coarse, None
    if settings.augment > 0:
        aug = augmented_copy(target, settings.augment_shift, seed)
        copy = net.trunk_features(aug.image)
        batch_src = {lv: torch.cat((src[lv], copy[lv])) for lv in net.levels}
        batch_tgt = {lv: torch.cat((tgt[lv], tgt[lv])) for lv in net.levels}
        if coarse is not None:
            copy_coarse = net.coarse_features(aug.image, target)
            batch_coarse = (torch.cat((coarse[0], copy_coarse[0])), torch.cat((coarse[1], coarse[1])))
    params = net.trainable_parameters()
    optimiser = torch.optim.Adam(params, lr=settings.lr)
    generator = torch.Generator().manual_seed(seed)
    fixed = {lv: i.to(device) for lv, i in fixed_positions(src, net.levels, settings.samples, seed).items()}
    best = (math.inf, None, None, 0)
    initial_loss, reason, steps = math.nan, 'iterations', 0
    updates: collections.deque[float] = collections.deque(maxlen=stopping.window)
    previous = None
    net.train()
    for step in range(stopping.iterations + 1):
        with autocast(str(device), amp):
            out = net.decode(batch_src, batch_tgt, size, batch_coarse)
            if aug is not None:
                copy_out = DmpOutput([f[1:] for f in out.flows], out.flow[1:], out.confidence[1:])
                out = DmpOutput([f[:1] for f in out.flows], out.flow[:1], out.confidence[:1],
                                {lv: (a[:1], b[:1]) for lv, (a, b) in out.adapted.items()})
            loss = pair_loss(net, src, tgt, target, out.flow, settings, generator, fixed,
                             out.adapted)
            objective = loss.value
            if aug is not None:
                objective = objective + settings.augment * flow_loss(
                    copy_out, net.levels, aug.flow, aug.ok).total
        value = loss.score if bool(torch.isfinite(objective.detach())) else math.nan
        if not math.isfinite(value):
            warnings.warn(f'dmp: non-finite test-time loss at iteration {step}; returning the '
                          f'best finite iterate ({best[3]})', RuntimeWarning, stacklevel=3)
            reason = 'non-finite'
            break
        if step == 0:
            initial_loss = value
        flow = out.flow.detach().float()
        if value < best[0]:
            best = (value, flow, out.confidence.detach().float(), step)
        if previous is not None:
            updates.append(float((flow - previous).norm(dim=1).mean()))
        previous = flow
        if step == stopping.iterations:
            break
        if (stopping.min_update_px > 0 and len(updates) == stopping.window
                and sum(updates) / len(updates) < stopping.min_update_px):
            reason = 'converged'
            break
        if stopping.patience and step - best[3] >= stopping.patience:
            reason = 'plateau'
            break
        now = time.perf_counter()
        if stopping.time_budget_s and now + (now - last) - started >= stopping.time_budget_s:
            reason = 'time'  # the next step would end past the budget
            break
        last = now
        optimiser.zero_grad(set_to_none=True)
        objective.backward()
        optimiser.step()
        steps += 1
    net.eval()
    if best[1] is None:  # not even iteration 0 was finite: the plain correlation matcher
        with torch.no_grad():
            out = net.decode(src, tgt, size, coarse)
        flow = torch.nan_to_num(out.flow.float())
        return Optimised(flow, torch.zeros_like(out.confidence), steps, 0, math.nan, initial_loss, reason)
    return Optimised(best[1], best[2], steps, best[3], best[0], initial_loss, reason)
