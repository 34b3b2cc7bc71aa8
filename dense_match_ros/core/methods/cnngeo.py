"""``cnngeo`` and ``cnngeo-affine``: one global transform per pair, regressed from a correlation.

CNNGeo (:mod:`core.networks.cnngeo`) predicts the parameters of the transform taking the
source to the target: ``cnngeo`` the composition of its affine and TPS stages (a TPS),
``cnngeo-affine`` the affine stage alone. Both images are resized to the network's input
size (240x240 unless the checkpoint says otherwise) only to *predict* the parameters; the
flow is the transform evaluated at every source pixel at native size (sizes may differ),
so it is exact at any resolution and never upsampled.

Matchability from warping consistency: (source, target) and (target, source) run as one
batch of two, and a source pixel x gets

    [T_st(x) inside the target] * exp(-e^2 / (2 sigma^2)),  e = |T_ts(T_st(x)) - x|

with e in pixels of the network's input size (a threshold fitted at 240x240 then means the
same on a 480x640 frame) and sigma from the checkpoint record (``calibration.sigma_px``,
``sigma_px_affine`` for ``cnngeo-affine``, fitted on held-out synthetic pairs by ``python -m dense_match_ros.training.cnngeo_task
sigma``), else :data:`DEFAULT_SIGMA_PX`. A degenerate affine (determinant <= 0 or outside
[0.1, 10], or a non-finite parameter) in either direction gives matchability 0 and a
warning: the flow of such a transform is no view change, whatever it says.

Inputs are checked before anything runs: RGB uint8 HxWx3, at least :data:`MIN_SIDE` px a
side (smaller than one correlation cell of the 240 px input after resizing).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch

from dense_match_ros.core.checkpoint import CheckpointError, checkpoint_method, load_weights
from dense_match_ros.core.device import autocast, check_precision, inference_dtype
from dense_match_ros.core.geometry import direct_alignment, parametric
from dense_match_ros.core.methods import weights as _weights
from dense_match_ros.core.methods.inputs import check_rgb
from dense_match_ros.core.networks.cnngeo import CnnGeoNet, config_from_dict
from dense_match_ros.core.registry import Matcher

TRAIN_HINT = ('dense-match-train cnngeo-affine --config config/train_cnngeo_affine_cpu.yaml '
              '--out runs/cnngeo_affine_cpu && dense-match-train cnngeo-tps --config '
              'config/train_cnngeo_tps_cpu.yaml --out runs/cnngeo_tps_cpu && dense-match-train '
              'export runs/cnngeo_tps_cpu --out dense_match_ros/weights/cnngeo_cpu.pt')
CHECKPOINT_METHODS = ('cnngeo-tps', 'cnngeo-affine')
"""What a checkpoint of either training stage says it holds (the training task's name)."""
MIN_SIDE = 16
DEFAULT_SIGMA_PX = 2.0
"""Round-trip sigma (input-size pixels) where the checkpoint record has no fitted one."""
ALIGN_MODES = ('none', 'photometric')
"""``align``: the network's spline as it is, or refined by direct alignment on the pixels
(:mod:`.geometry.direct_alignment`; README, "cnngeo: direct alignment")."""
SIGMA_KEYS = {'tps': 'sigma_px', 'affine': 'sigma_px_affine'}
"""Where the record's ``calibration`` keeps each method's fitted sigma (the round trip of the
affine stage alone errs more than that of the composition, so each has its own)."""


@dataclasses.dataclass
class StageWeights(_weights.LearnedWeights):
    """LearnedWeights for a method whose checkpoints come from several training tasks:
    the shipped ``cnngeo_<variant>.pt`` holds a ``cnngeo-tps`` (or ``cnngeo-affine``) run."""

    accepted: tuple[str, ...] = CHECKPOINT_METHODS

    def load(self, weights: str | Path, device: str = 'cpu') -> tuple[torch.nn.Module, dict]:
        found = checkpoint_method(weights)
        if found not in self.accepted:
            # load_weights names the file, what it found and what was expected (or why the
            # file is no checkpoint at all).
            load_weights(weights, ' or '.join(self.accepted))
        model_config, state, record = load_weights(weights, found)
        net = self.build(model_config)
        net.load_state_dict(state)
        record = {**record, 'checkpoint_method': found}
        return net.to(device).eval(), record


WEIGHTS = StageWeights('cnngeo', lambda cfg: CnnGeoNet(config_from_dict(cfg)), TRAIN_HINT)


def check_image(image: np.ndarray, what: str) -> None:
    """The input rules (uint8 RGB, at least :data:`MIN_SIDE` px a side), each named in its ValueError."""
    check_rgb(image, what, MIN_SIDE)


class CnnGeoMatcher(Matcher):
    """Affine + TPS (``cnngeo``) as a dense flow with round-trip matchability."""

    stages = 'tps'

    def __init__(self, device: str = 'cpu', weights: str | None = None, variant: str | None = None,
                 sigma: float | None = None, width: float | None = None,
                 precision: str = 'auto', tps_passes: int | None = None,
                 affine_passes: int = 1, round_trip_passes: int | None = None,
                 align: str | None = None, align_levels: list | None = None,
                 align_max_shift: float | None = None, net: CnnGeoNet | None = None) -> None:
        check_precision(precision)
        if align is not None and align not in ALIGN_MODES:
            raise ValueError(f'align must be one of {ALIGN_MODES}, got {align!r}')
        if align == 'photometric' and self.stages != 'tps':
            raise ValueError('align refines the TPS of cnngeo; cnngeo-affine stays the affine '
                             'stage alone (the paper\'s baseline)')
        for name, passes in (('tps_passes', tps_passes), ('affine_passes', affine_passes),
                             ('round_trip_passes', round_trip_passes)):
            if passes is not None and int(passes) < 1:
                raise ValueError(f'{name} must be >= 1, got {passes}')
        if sigma is not None and not sigma > 0:
            raise ValueError(f'sigma must be > 0 px (round-trip tolerance), got {sigma}')
        self.device = device
        self.net, self.record, self.weights = WEIGHTS.network_for(net, weights, variant, device)
        # A checkpoint says how many TPS passes it was measured best with (a further pass
        # helped stage 5 on every set and cost stage 4 on Sintel), so the default follows it.
        inference = self.record.get('inference') or {}
        if tps_passes is None:
            tps_passes = int(inference.get('tps_passes', 1))
            if tps_passes < 1:
                raise CheckpointError(f'{self.weights}: inference.tps_passes must be >= 1, '
                                      f'found {tps_passes}')
        self.tps_passes, self.affine_passes = int(tps_passes), int(affine_passes)
        # The backward transform serves only the round trip, whose sigma is tens of pixels:
        # a checkpoint may say its further TPS passes are not worth their time there.
        if round_trip_passes is None:
            round_trip_passes = int(inference.get('round_trip_passes', self.tps_passes))
            if round_trip_passes < 1:
                raise CheckpointError(f'{self.weights}: inference.round_trip_passes must be '
                                      f'>= 1, found {round_trip_passes}')
        self.round_trip_passes = min(self.tps_passes, int(round_trip_passes))
        # The record says whether the checkpoint was measured best with the alignment; it is
        # cnngeo's (the TPS) only, so the affine stage alone never takes it from there.
        if align is None:
            align = inference.get('align', 'none') if self.stages == 'tps' else 'none'
            if align not in ALIGN_MODES:
                raise CheckpointError(f'{self.weights}: inference.align must be one of '
                                      f'{ALIGN_MODES}, found {align!r}')
        self.align = align
        if align_levels is None:
            align_levels = inference.get('align_levels')
        settings = {}
        if align_levels is not None:
            settings['levels'] = tuple((int(side), int(steps)) for side, steps in align_levels)
        if align_max_shift is not None:
            settings['max_shift'] = float(align_max_shift)
        self.alignment = direct_alignment.AlignmentSettings(**settings)
        found_width = float(self.net.config.width)
        if width is not None and abs(float(width) - found_width) > 1e-9:
            raise CheckpointError(f'{self.weights or "the network"}: expected a width-{width:g} '
                                  f'cnngeo checkpoint, found width {found_width:g}')
        if self.stages == 'tps' and self.net.tps is None:
            found = self.record.get('checkpoint_method', 'an affine-only network')
            raise CheckpointError(f'{self.weights or "the network"}: cnngeo needs a checkpoint '
                                  f'with the TPS stage (expected cnngeo-tps, found {found}); '
                                  f'use method cnngeo-affine for the affine stage alone')
        fitted = (self.record.get('calibration') or {}).get(SIGMA_KEYS[self.stages])
        self.sigma = float(sigma if sigma is not None else fitted or DEFAULT_SIGMA_PX)
        self._amp = inference_dtype(precision, device)
        # Channels-last convolutions are ~3x faster on a CPU (measured: the trunk on two
        # 240x240 images, one thread, bf16: 17 ms against 45 ms), and folded BatchNorm saves
        # the trunk a pass per layer; the matcher never trains its network.
        if net is None:
            self.net.fold_batch_norm()
        self.net.to(memory_format=torch.channels_last)

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) the network predicts the parameters at."""
        return tuple(self.net.config.input_size)

    def match(self, source: np.ndarray, target: np.ndarray):
        check_image(source, 'source')
        check_image(target, 'target')
        return super().match(source, target)

    # -- parameters -----------------------------------------------------------------

    def _resized(self, image: np.ndarray) -> np.ndarray:
        """``image`` at the network's input size (itself when it is that size already)."""
        h, w = self.input_size
        ih, iw = image.shape[:2]
        if (iw, ih) == (w, h):
            return image
        shrink = w < iw or h < ih
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        image = self._resized(image)
        t = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None]
        return (t.float() / 255.0).contiguous(memory_format=torch.channels_last)

    def _autocast(self):
        return autocast(self.device, self._amp)

    @torch.no_grad()
    def predict(self, source: np.ndarray, target: np.ndarray
                ) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(kind, parameters (2, 6|18) float32 of [source -> target, target -> source],
        affine stage (2, 6)): one batch of two."""
        with self._autocast():
            out = self.net.two_way(self._tensor(source), self._tensor(target), stages=self.stages,
                                   tps_passes=self.tps_passes, affine_passes=self.affine_passes,
                                   backward_passes=self.round_trip_passes)
        if self.stages == 'affine':
            return 'affine', out.affine.float(), out.affine.float()
        return 'tps', out.composed.float(), out.affine.float()

    # -- matching -------------------------------------------------------------------

    def _match(self, source: np.ndarray, target: np.ndarray):
        h, w = source.shape[:2]
        th, tw = target.shape[:2]
        # The network's copies of both images serve the alignment too: its working sizes
        # (at most 120 px) are below the input size, so nothing is lost.
        small_s, small_t = self._resized(source), self._resized(target)
        kind, theta, affine = self.predict(small_s, small_t)
        theta, affine = theta.cpu(), affine.cpu()
        why = [f'{name}: {reason}' for name, a in (('source->target', affine[0]),
                                                   ('target->source', affine[1]))
               if (reason := parametric.degenerate_affine(a.numpy()))]
        if not torch.isfinite(theta).all():
            why.append('non-finite transform parameters')
        if why:
            warnings.warn(f'{self.name or "cnngeo"}: degenerate affine ({"; ".join(why)}); '
                          f'matchability 0', RuntimeWarning, stacklevel=3)
            if not torch.isfinite(theta[0]).all():
                return np.zeros((h, w, 2), np.float32), np.zeros((h, w), np.float32)
        if self.align == 'photometric' and not why:
            # Forward only: the round trip's sigma (tens of px) does not see the few pixels
            # the alignment moves, and the backward direction would double its cost.
            aligned = direct_alignment.refine_tps(small_s, small_t, theta[0].numpy(), self.alignment)
            theta = torch.cat([torch.from_numpy(aligned.theta)[None], theta[1:]])
        there = parametric.dense_map(kind, theta[:1], (w, h))      # T_st at every source pixel
        flow = _finite(parametric.map_to_flow(there, (tw, th))[0].numpy())
        if why:
            return flow, np.zeros((h, w), np.float32)
        consistency = self._consistency(kind, theta, (w, h))
        matchability = consistency * parametric.inside(there[0]).numpy()
        return flow, _finite(matchability)

    def round_trip(self, kind: str, theta: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """e(x) = |T_ts(T_st(x)) - x| in input-size pixels on the source grid of ``size`` (W, H),
        from ``theta`` = [forward, backward] parameters (2, P).

        Computed on a grid of at most a quarter of the input size a side (60x60 for 240x240)
        and resized: e is as smooth as the two transforms (a spline of a spline), so the
        resize loses nothing a threshold of a pixel or more would see, and a frame does not
        pay for a second spline evaluation at every pixel (measured: 8 -> 1 ms at 640x480).
        """
        ih, iw = self.input_size
        w, h = size
        gw, gh = min(w, max(2, iw // 4)), min(h, max(2, ih // 4))
        there = parametric.dense_map(kind, theta[:1], (gw, gh))
        error = parametric.round_trip_error(kind, theta[1:], there, (iw, ih))[0].numpy()
        if (gw, gh) != (w, h):
            error = cv2.resize(error, (w, h), interpolation=cv2.INTER_LINEAR)
        return error

    def _consistency(self, kind: str, theta: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """exp(-e^2 / 2 sigma^2) of the round trip (:meth:`round_trip`)."""
        error = self.round_trip(kind, theta, size)
        return np.exp(-np.square(error) / (2.0 * self.sigma ** 2)).astype(np.float32)


def _finite(values: np.ndarray) -> np.ndarray:
    """``values`` with any NaN or infinity made finite; one pass when there is none (a full
    frame's nan_to_num costs a millisecond)."""
    return values if np.isfinite(values).all() else np.nan_to_num(values)


class CnnGeoAffineMatcher(CnnGeoMatcher):
    """The affine stage alone (``cnngeo-affine``): the paper's first stage, as a baseline."""

    stages = 'affine'
