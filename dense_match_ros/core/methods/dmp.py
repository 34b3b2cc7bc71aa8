"""``dmp`` (DMP-dagger, pre-trained prior) and ``dmp-scratch``: a matching network optimised on
each pair (Hong and Kim, ICCV 2021).

Where other methods apply fixed weights, DMP fits the network's adaptation and residual
modules (:mod:`core.networks.dmp`) to the pair at hand with a loss that needs no ground truth
(:mod:`.dmp_optim`), so it adapts to what training never showed. ``dmp`` starts from weights
pre-trained on synthetic pairs (``dense-match-train dmp``) and needs few iterations;
``dmp-scratch`` starts from the identity (the plain correlation matcher on the project's
trained trunk) and needs many. Every call starts from the stored weights, so results do not
depend on earlier pairs; ``warm_start`` keeps the previous pair's optimised weights instead
(a video stream's consecutive frames look alike).

Any size (``mode``): ``'resize'`` runs the whole pyramid at the network's input size (240x240
unless the checkpoint says otherwise) and resizes the flow back; ``'adaptive'`` runs the
coarse level at the input size and the finer levels on both images at the source's aspect
ratio, longest side ``max_side`` (the paper's adaptive resolution).

Rolled cameras (``rotations``): the trunk's features are not rotation invariant, so a target
turned by 90 or 180 degrees is out of the prior's reach; with ``rotations`` 2 or 4 the matcher
tries the target turned by each multiple of 180 or 90 degrees, keeps the turn whose copy gives
the lowest test-time loss at iteration 0, optimises on that copy and maps its flow back into
the target's own pixels.

Full resolution: the optimised flow is right to a working pixel at best, so a DIS residual at
the input's size refines it (``refine='dis'``), except where the residual is longer than
``refine_max_cells`` working pixels (DIS locking on to another structure: on Sintel's ambush
pair the residual took the optimised 31.6 px to 39.0), and a short variational polish
(``polish`` iterations) evens out the seams between refined and kept pixels. Both settings
were chosen on held-out calibration pairs (``scripts/dmp_tune_residual.py``).

Matchability: the finest level's probability within one cell of the matched position
(``confidence='peak'``: of the matched position alone), mapped through the checkpoint
record's table (``calibrated``, on by default) and times the in-bounds mask. The shipped table
predicts that a pixel has a visible match (``dense-match-calibrate --truth visible``): a table
of being right within 1 px never passed one half at this flow's precision (a 240 px working
grid), so it starved the pose's matchability threshold (Middlebury pose AUC@20 0.033 against
0.390 uncalibrated).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from dense_match_ros.core import calibration, refine as _refine
from dense_match_ros.core.checkpoint import CheckpointError, load_trunk
from dense_match_ros.core.device import check_precision, inference_dtype
from dense_match_ros.core.geometry import grid
from dense_match_ros.core.methods import weights as _weights
from dense_match_ros.core.methods.inputs import check_rgb
from dense_match_ros.core.methods.dmp_optim import LossSettings, Stopping, optimise
from dense_match_ros.core.networks.dmp import DmpConfig, DmpNet, config_from_dict
from dense_match_ros.core.registry import Matcher

TRAIN_HINT = ('dense-match-train dmp --config config/train_dmp_cpu.yaml --out runs/dmp_cpu && '
              'dense-match-train export runs/dmp_cpu --out dense_match_ros/weights/dmp_cpu.pt')
WEIGHTS = _weights.LearnedWeights('dmp', lambda cfg: DmpNet(config_from_dict(cfg)), TRAIN_HINT)
TRUNK_WEIGHTS = 'cnngeo'
"""Whose shipped checkpoint gives ``dmp-scratch`` its trunk: ``cnngeo``'s, the project's
backbone (``hilm``'s) fine-tuned with a matching loss on pool4. Its nearest neighbours on the
HPatches pair at 240x240 are within a cell for 0.89 / 0.84 / 0.61 of the pool4 / conv4 /
conv3 cells against ``hilm``'s 0.54 / 0.55 / 0.53 (``scripts/dmp_trunk_matches.py
--weights``), and DMP from scratch needs mostly right neighbours to start from: on
``hilm``'s trunk it diverged (56.5 px)."""
SCRATCH_CONFIG = DmpConfig(width=0.25, input_size=(240, 240), finest='conv3', radius=3, hidden=32,
                           adapt_kernel=1, temperature=0.02)
"""``dmp-scratch``'s network: the architecture of the CPU pre-training (config/train_dmp_cpu.yaml),
so that ``dmp`` and ``dmp-scratch`` differ only in where their weights start."""
MODES = ('resize', 'adaptive')
MIN_SIDE = 16
TURNS = {1: (0,), 2: (0, 2), 4: (0, 1, 2, 3)}
"""Quarter turns of the target tried per ``rotations`` setting (:meth:`DmpMatcher.upright_turns`)."""
TURN_MARGIN = 0.1
"""A turned copy replaces the upright target only when its initial loss is lower by this
fraction. Measured (stages 2 and 4d2, the 90 and 180 degree HPatches copies against the
Sintel, HPatches and synthetic pairs): the right turn's loss is 42-44 % below the upright
one's, and no upright pair had a turned copy below its own loss."""


def check_image(image: np.ndarray, what: str) -> None:
    """The input rules (uint8 RGB, at least :data:`MIN_SIDE` px a side), each named in its ValueError."""
    check_rgb(image, what, MIN_SIDE)


def scratch_network(weights: str | Path | None, config: DmpConfig = SCRATCH_CONFIG) -> tuple[DmpNet, str]:
    """An untrained DMP network on the trunk of ``weights`` (any checkpoint holding
    ``backbone.*``; default: the shipped ``hilm``)."""
    path = str(weights) if weights else str(_weights.LearnedWeights(TRUNK_WEIGHTS, None, '').shipped())
    with torch.random.fork_rng():   # the caller's random stream stays untouched
        torch.manual_seed(0)         # the adaptation layers' inner convolutions: the same every time
        net = DmpNet(config)
    try:
        load_trunk(net.trunk, path, 'the dmp trunk')
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return net, path


DEFAULT_LR = 1e-4
"""The test-time Adam step of a checkpoint whose record holds none (stage 2's fit)."""


def recorded_lr(record: dict, fallback: float = DEFAULT_LR) -> float:
    """The test-time learning rate fitted for these weights (``test_time.lr`` in the record,
    written by ``python -m dense_match_ros.evaluation.test_time_lr --write``), else
    ``fallback``. Each pre-training stage leaves a prior of its own sharpness, so the
    step that improves it most differs (stage 2: 1e-4; stage 3c: 5e-5): the step travels
    with the weights it was fitted for rather than with the code."""
    fitted = (record.get('test_time') or {}).get('lr')
    return float(fitted) if fitted else float(fallback)


class DmpMatcher(Matcher):
    """DMP-dagger: the pre-trained network, optimised on each pair."""

    pretrained = True
    default_iterations = 300
    default_lr = DEFAULT_LR
    """The test-time step where the weights' record fits none."""
    default_patience = 40
    default_time_budget_s = 2.0
    """Per call (trunk features included): the CPU target of a pair at 240x240. Without it the
    loop ran its 300 iterations on most pairs (about 30 s on the 2-core CPU); 0 removes it."""

    def __init__(self, device: str = 'cpu', weights: str | None = None, variant: str | None = None,
                 mode: str = 'resize', max_side: int = 480, iterations: int | None = None,
                 lr: float | None = None, samples: int = 256, tau: float = 0.1, phi: float = 0.01,
                 warp: str = 'features', min_update_px: float = 0.05, window: int = 10,
                 patience: int | None = None, time_budget_s: float | None = None, warm_start: bool = False,
                 precision: str = 'auto', calibrated: bool = True, seed: int = 0,
                 refine: str = 'dis', refine_preset: str = 'medium',
                 refine_max_cells: float = 6.0, polish: int = 5,
                 augment: float = 0.0, augment_shift: float = 0.1, rotations: int = 4,
                 confidence: str | None = None, net: DmpNet | None = None) -> None:
        _refine.check_refiner(refine, refine_preset)
        if not float(refine_max_cells) >= 0:
            raise ValueError(f'refine_max_cells must be >= 0 (0: no limit), got {refine_max_cells}')
        if int(polish) < 0:
            raise ValueError(f'polish must be >= 0 iterations (0: off), got {polish}')
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        if int(rotations) not in TURNS:
            raise ValueError(f'rotations must be one of {sorted(TURNS)} (1: upright only), got {rotations}')
        if int(max_side) < 32:
            raise ValueError(f'max_side must be at least 32, got {max_side}')
        check_precision(precision)
        budget = self.default_time_budget_s if time_budget_s is None else float(time_budget_s)
        self.stopping = Stopping(self.default_iterations if iterations is None else int(iterations),
                                 float(min_update_px), int(window),
                                 self.default_patience if patience is None else int(patience), budget)
        self.stopping.check()
        self.device = device
        if self.pretrained or net is not None:
            self.net, self.record, self.weights = WEIGHTS.network_for(net, weights, variant, device)
        else:
            net, self.weights = scratch_network(weights)
            self.net, self.record = net.to(device).eval(), {}
        if lr is None:
            lr = recorded_lr(self.record, self.default_lr)
        self.loss = LossSettings(int(samples), float(tau), float(phi), warp, float(lr),
                                 float(augment), float(augment_shift))
        self.loss.check()
        if confidence is not None:
            self.net.use_confidence(confidence)
        self.mode, self.max_side = mode, int(max_side)
        self.refine, self.refine_preset = refine, refine_preset
        self.refine_max_cells, self.polish = float(refine_max_cells), int(polish)
        self.warm_start, self.seed = bool(warm_start), int(seed)
        self.turns = TURNS[int(rotations)]
        self._amp = inference_dtype(precision, device)
        self.calibration = self.record.get('calibration') if calibrated else None
        # Each call starts from these (the shipped weights), unless warm_start.
        self._stored = copy.deepcopy({k: v for k, v in self.net.state_dict().items()
                                      if not k.startswith('trunk.')})
        self._finishing: tuple[int, float] = (0, 0.0)
        """(pixels of both images, seconds) of the last call's steps after the loop."""
        self.last_run: dict = {}
        """Figures of the last call: iterations, best_iteration, loss, initial_loss, reason, seconds."""

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.net.config.input_size)

    def _working_size(self, source: np.ndarray) -> tuple[int, int]:
        """(W, H) both images run at."""
        if self.mode == 'resize':
            h, w = self.input_size
            return w, h
        h, w = source.shape[:2]
        return grid.working_size((w, h), self.max_side, min_side=32, multiple=16, upscale=True)

    def _tensor(self, image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        h, w = image.shape[:2]
        if (w, h) != size:
            interp = cv2.INTER_AREA if size[0] * size[1] < w * h else cv2.INTER_LINEAR
            image = cv2.resize(image, size, interpolation=interp)
        t = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None]
        return t.float().div(255.0).contiguous(memory_format=torch.channels_last)

    def reset(self) -> None:
        """Back to the stored weights (what every call does unless ``warm_start``)."""
        self.net.load_state_dict(self._stored, strict=False)

    def working_flow(self, source: np.ndarray, target: np.ndarray, reserve_s: float = 0.0):
        """(flow, confidence, working size (W, H)) of the optimised network on the working grid;
        ``reserve_s`` of the time budget is left for what the caller does after."""
        called = time.perf_counter()
        size = self._working_size(source)
        s, t = self._tensor(source, size), self._tensor(target, size)
        coarse = self.net.coarse_features(s, t)
        if not self.warm_start or not self.last_run:
            self.reset()
        started = time.perf_counter()
        stopping = self.stopping
        if stopping.time_budget_s:
            # The budget bounds the whole call: the resizing and coarse features before the
            # loop and the reserve after it come off what the loop may spend.
            left = stopping.time_budget_s - (started - called) - float(reserve_s)
            stopping = dataclasses.replace(stopping, time_budget_s=max(left, 1e-6))
        result = optimise(self.net, s, t, stopping, self.loss, self._amp, self.seed, coarse)
        self.last_run = {'iterations': result.iterations, 'best_iteration': result.best_iteration,
                     'loss': result.loss, 'initial_loss': result.initial_loss,
                     'reason': result.reason, 'seconds': time.perf_counter() - started}
        flow = result.flow[0].permute(1, 2, 0).cpu().numpy()
        confidence = result.confidence[0, 0].cpu().numpy()
        return flow, confidence, size

    def match(self, source: np.ndarray, target: np.ndarray):
        check_image(source, 'source')
        check_image(target, 'target')
        return super().match(source, target)

    def upright_turns(self, source: np.ndarray, target: np.ndarray) -> tuple[int, dict[int, float]]:
        """The quarter turns of the target (``np.rot90``) whose copy the network matches best,
        judged by the test-time loss of the stored weights' flow (iteration 0), and that loss
        per turn tried.

        The trunk's features are not rotation invariant, so a camera rolled by 90 or 180
        degrees (a downward-looking drone that turned, a hand-held camera) leaves the pair
        outside what the prior and the per-pair loss can recover; matching an upright copy
        instead costs one forward pass per turn tried."""
        if len(self.turns) == 1:
            return 0, {}
        if not self.warm_start or not self.last_run:
            self.reset()
        size = self._working_size(source)
        s = self._tensor(source, size)
        once = dataclasses.replace(self.stopping, iterations=0, time_budget_s=0.0)
        pair_only = dataclasses.replace(self.loss, augment=0.0)   # A-DMP's copy ranks nothing
        losses = {}
        for k in self.turns:
            t = self._tensor(np.ascontiguousarray(np.rot90(target, k)), size)
            result = optimise(self.net, s, t, once, pair_only, self._amp, self.seed,
                              self.net.coarse_features(s, t))
            losses[k] = result.initial_loss
        finite = {k: v for k, v in losses.items() if math.isfinite(v)}
        if not finite:
            return 0, losses
        best = min(finite, key=finite.get)
        upright = finite.get(0, math.inf)
        return (best if finite[best] < (1.0 - TURN_MARGIN) * upright else 0), losses

    def _match(self, source: np.ndarray, target: np.ndarray):
        started = time.perf_counter()
        turns, losses = self.upright_turns(source, target)
        scan_s = time.perf_counter() - started
        th, tw = target.shape[:2]
        if turns:
            target = np.ascontiguousarray(np.rot90(target, turns))
        flow, matchability = self._match_upright(source, target, scan_s)
        self.last_run.update({'turns': turns, 'turn_losses': losses})
        if losses:
            # How much lower the chosen copy's loss is than the upright target's (0: upright).
            chosen, upright = losses[turns], losses[0]
            finite = math.isfinite(chosen) and math.isfinite(upright) and upright
            self.last_run['turn_gain'] = 1.0 - chosen / upright if finite else 0.0
            self.last_run['upright_loss'] = losses[0]
        # Rotation maps the target's frame onto itself, so in-bounds pixels stay in bounds.
        return grid.unrotate_flow(flow, turns, (tw, th)), matchability

    def _match_upright(self, source: np.ndarray, target: np.ndarray, spent_s: float = 0.0):
        h, w = source.shape[:2]
        th, tw = target.shape[:2]
        # What the steps after the loop (full-resolution work) took on the last pair, scaled
        # by the pixel count, is kept out of the time budget, so a call ends within it, as is
        # what the call spent before (``spent_s``: choosing the target's turn).
        pixels = w * h + tw * th
        reserve = self._finishing[1] * pixels / self._finishing[0] if self._finishing[0] else 0.0
        flow, confidence, size = self.working_flow(source, target, reserve + spent_s)
        finishing = time.perf_counter()
        flow, confidence = grid.to_source_grid(flow, confidence, (w, h), size, (tw, th))
        flow = np.nan_to_num(flow, nan=0.0, posinf=0.0, neginf=0.0)
        if self.refine == 'dis':
            # The optimised flow lives on a 240 px grid: a full-resolution DIS residual gives
            # it sub-pixel precision (one DIS call). A residual longer than refine_max_cells
            # working pixels is DIS jumping to another structure, so it is dropped there.
            limit = self.refine_max_cells * max(w / size[0], h / size[1])
            flow = _refine.dis_residual(source, target, flow, self.refine_preset, limit or None)
        if self.polish:
            # Where the residual was dropped the flow keeps its coarse grid's error beside
            # refined neighbours: one variational pass evens the seams out.
            flow = _refine.variational_polish(source, target, flow, iterations=self.polish)
        # In-bounds after the table, so its floor never lifts a match that leaves the target.
        matchability = calibration.apply_table(np.nan_to_num(confidence).astype(np.float32),
                                               self.calibration)
        matchability = (matchability * grid.in_bounds(flow, (tw, th))).astype(np.float32)
        self._finishing = (pixels, time.perf_counter() - finishing)
        return flow, matchability


class DmpScratchMatcher(DmpMatcher):
    """DMP without pre-training: the identity-initialised network on the project's trunk,
    optimised from scratch on each pair (``weights``: a checkpoint whose trunk to use)."""

    pretrained = False
    default_iterations = 2000
    """The paper's count; on the HPatches pair at 240x240 (the ``cnngeo`` stage-6 trunk in
    fp32, lr 3e-4) 2,000 iterations gave 1.83 px and 3,500 gave 1.74 (README, "dmp-scratch on
    a matching-trained trunk")."""
    default_time_budget_s = 300.0
    """2,000 iterations take about 4 minutes on the 2-core CPU beside other work: the budget
    only stops a slower machine from running much longer."""
    default_lr = 3e-4
    """Measured over 120 s on the HPatches pair (the stage-5 ``cnngeo`` trunk): 1e-4 3.45 px
    (stopped on patience at 805 iterations), 3e-4 2.76, 1e-3 2.93; over 2,000 iterations (the
    stage-6 trunk) 3e-4 1.83, 5e-4 1.90."""
    default_patience = 300
    """From the identity the loss falls slowly and unevenly: 40 iterations without a new
    lowest loss stopped lr 1e-4 at iteration 805 while it was still improving."""
