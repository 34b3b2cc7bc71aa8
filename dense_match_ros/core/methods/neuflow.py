"""``neuflow``: the light flow network (:mod:`core.networks.neuflow`), made precise by a DIS
residual and fused per pixel with plain DIS, so one matcher covers both regimes.

Why the three parts:

* the network resolves large and independent motion (global matching at 1/16) but, trained
  on a CPU, has a floor of about a pixel on small motion;
* a full-resolution DIS residual on the network's flow (:mod:`core.refine`) brings that
  flow to sub-pixel precision where it is right;
* plain DIS is better than both on small motion, so ``fuse='dis'`` takes, per pixel, the
  candidate with the smaller forward-backward error plus photometric error (each pair is
  matched both ways anyway, for the matchability).

Around all of it, ``prealign`` (default on) takes out what a CPU-trained CNN handles worst,
rotation, zoom and perspective: when the first result's reliable matches (or, if they cannot
tell, SIFT or ORB matches: ``prealign_features``) agree on a homography that is more than a
shift, the matcher runs again on the target warped onto the source by it, and the flow is
composed with it (:mod:`core.geometry.prealign`; HPatches pair 0.90 -> 0.52 px, rotated by
30 degrees 6.29 -> 0.57).

The network runs on both images resized to one working size (longest side ``max_side``,
padded to a multiple of 16 by :class:`~core.networks.padding.InputPadder`); both directions
go through one batched call. Matchability is the network's visibility head times the
forward-backward consistency ``exp(-(e / fb_sigma)^2)`` of the chosen flow.
"""
from __future__ import annotations

import contextlib
import functools
from concurrent import futures
from concurrent.futures import Future

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from dense_match_ros.core import calibration, refine as _refine
from dense_match_ros.core.device import autocast, check_precision, inference_dtype, limit_threads
from dense_match_ros.core.dis_presets import (check_concurrency, check_preset, create_dis,
                                              in_background, runs_concurrently, two_way_flow,
                                              two_way_flow_in_background)
from dense_match_ros.core.geometry import grid, prealign as _prealign
from dense_match_ros.core.methods import weights as _weights
from dense_match_ros.core.networks.neuflow import NeuFlowNet, config_from_dict
from dense_match_ros.core.networks.padding import InputPadder
from dense_match_ros.core.registry import Matcher

TRAIN_HINT = ('dense-match-train neuflow --config config/train_neuflow_cpu.yaml --out runs/neuflow_cpu '
              '&& dense-match-train export runs/neuflow_cpu --out dense_match_ros/weights/neuflow_cpu.pt')
WEIGHTS = _weights.LearnedWeights('neuflow', lambda cfg: NeuFlowNet(config_from_dict(cfg)),
                                  TRAIN_HINT)
FUSIONS = ('none', 'dis')
FB_CHECKS = ('full', 'working')
"""Where the network's forward-backward error is taken: on the full grid after refining both
directions (two DIS residuals), or on the working grid before refinement (one: faster)."""
_PHOTO_PX_PER_GREY = 1.0 / 20.0  # photometric error of 20 grey levels weighs like 1 px of FB error
_FB_CAP = 20.0                    # FB errors beyond this are all 'wrong'


def _flow_tensor(flow: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A pixel flow (h, w, 2) on the grid of ``size`` (W, H) (:func:`grid.resize_flow`), as a
    (1, 2, H, W) tensor."""
    if flow.shape[1::-1] != tuple(size):
        flow = grid.resize_flow(flow, tuple(size))
    return torch.from_numpy(np.ascontiguousarray(flow, np.float32)).permute(2, 0, 1)[None]


def _done(value) -> Future:
    """A future that already holds ``value`` (the serial path hands the fusion the same)."""
    future = Future()
    future.set_result(value)
    return future


def _better_round_trip(first: tuple[np.ndarray, np.ndarray, np.ndarray],
                       second: tuple[np.ndarray, np.ndarray, np.ndarray],
                       size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel and per direction, the pass whose forward-backward error is smaller, on the
    second pass's grid ``size`` (W, H); visibility from the second pass."""
    fwd1, bwd1 = (grid.resize_flow(f, tuple(size)) for f in first[:2])
    fwd2, bwd2, visibility = second
    keep_fwd = grid.forward_backward_error(fwd1, bwd1) < grid.forward_backward_error(fwd2, bwd2)
    keep_bwd = grid.forward_backward_error(bwd1, fwd1) < grid.forward_backward_error(bwd2, fwd2)
    return (np.where(keep_fwd[..., None], fwd1, fwd2).astype(np.float32),
            np.where(keep_bwd[..., None], bwd1, bwd2).astype(np.float32), visibility)


def _working_round_trip(forward: np.ndarray, backward: np.ndarray,
                        size: tuple[int, int]) -> np.ndarray:
    """The round-trip error of two flows on the network's working grid, in pixels of the
    full-size source and resized to it (``size`` (W, H)); misses beyond 1e6 px (leaving the
    target: infinite) are capped there so that the resize stays finite. Both the network's
    own check and DIS's cross check (``dis_cross``) are taken this way: no full-size
    backward flow is needed."""
    w, h = size
    error = grid.forward_backward_error(forward, backward) * (w / forward.shape[1])
    return cv2.resize(np.minimum(error, 1e6), (w, h), interpolation=cv2.INTER_LINEAR)


class NeuFlowMatcher(Matcher):
    """Light flow network + DIS residual, optionally fused per pixel with plain DIS.

    Defaults chosen on the shipped CPU checkpoint (README, "Measured results"): the network
    at longest side 320 with 8 refinement steps and the round trip on the working grid was
    better than 512 px / 4 steps / full-grid check on Sintel, the HPatches viewpoint set and
    the held-out synthetic set, at two thirds of the time. The second pass at 640 and the
    polish made Sintel 13.21 -> 12.87 px (PCK@1 0.546 -> 0.553) and HPatches at 240
    1.34 -> 0.94 px, at about 2.5x the time (``cascade_side=0 polish=0`` restores the faster
    pipeline).
    """

    calibration_key = 'neuflow'
    """Which of the record's ``calibrations`` is this matcher's (see ``__init__``)."""
    shipped_variant: str | None = 'cpu'
    """The shipped checkpoint loaded when neither ``weights`` nor ``variant`` is given: the
    one that measured best for this matcher (None: ``gpu`` before ``cpu``). Each checkpoint
    ships only where it beats the last on the shared sets, and a stage can do that for one
    matcher and not the other: the GPU stage behind ``neuflow_gpu.pt`` beats stage 5 under
    ``neuflow-fast``'s options on every set, but not under ``neuflow``'s (Sintel 12.75 ->
    13.08 px; README, "A GPU stage")."""

    def __init__(self, device: str = 'cpu', weights: str | None = None, variant: str | None = None,
                 max_side: int = 320, iterations: int | None = 8, refine: str = 'dis',
                 refine_preset: str = 'medium', fuse: str = 'dis', dis_preset: str = 'medium',
                 fb_sigma: float = 1.0, fb_check: str = 'working', precision: str = 'auto',
                 calibrated: bool = True, cascade_side: int = 640, cascade_steps: int = 4,
                 polish: int = 10, polish_min_texture: float = 1e-4,
                 prealign: bool = True, prealign_features: str = 'sift', prealign_side: int = 480,
                 polish_scale: float = 1.0, fb_cross: bool = False, agree_px: float = 0.0,
                 concurrent: str | bool = 'off', settled_share: float = 0.0,
                 settled_px: float = 3.0, dis_cross: bool = False, dis_margin_px: float = 0.0,
                 backward_iterations: int | None = None, net: NeuFlowNet | None = None) -> None:
        _refine.check_refiner(refine, refine_preset)
        check_preset(dis_preset, 'dis_preset')
        if fuse not in FUSIONS:
            raise ValueError(f'fuse must be one of {FUSIONS}, got {fuse!r}')
        if fb_check not in FB_CHECKS:
            raise ValueError(f'fb_check must be one of {FB_CHECKS}, got {fb_check!r}')
        check_precision(precision)
        if not fb_sigma > 0:
            raise ValueError(f'fb_sigma must be > 0 px, got {fb_sigma}')
        if int(max_side) < 32 and int(max_side) != 0:
            raise ValueError(f'max_side must be 0 (input size) or at least 32, got {max_side}')
        if iterations is not None and int(iterations) < 0:
            raise ValueError(f'iterations must be >= 0, got {iterations}')
        if backward_iterations is not None and int(backward_iterations) < 0:
            raise ValueError(f'backward_iterations must be >= 0, got {backward_iterations}')
        if int(cascade_side) < 32 and int(cascade_side) != 0:
            raise ValueError(f'cascade_side must be 0 (off) or at least 32, got {cascade_side}')
        if int(cascade_steps) < 1:
            raise ValueError(f'cascade_steps must be >= 1, got {cascade_steps}')
        if not float(agree_px) >= 0:
            raise ValueError(f'agree_px must be >= 0 px, got {agree_px}')
        if not float(dis_margin_px) >= 0:
            raise ValueError(f'dis_margin_px must be >= 0 px, got {dis_margin_px}')
        concurrent = check_concurrency(concurrent)
        if not 0.0 <= float(settled_share) < 1.0:
            raise ValueError(f'settled_share must be in [0, 1), got {settled_share}')
        if not float(settled_px) > 0:
            raise ValueError(f'settled_px must be > 0 px, got {settled_px}')
        if float(settled_share) and fuse != 'dis':
            raise ValueError("settled_share needs fuse='dis' (it looks at DIS's flows first)")
        if int(polish) < 0:
            raise ValueError(f'polish must be >= 0 iterations, got {polish}')
        if not polish_min_texture >= 0:
            raise ValueError(f'polish_min_texture must be >= 0, got {polish_min_texture}')
        self.device = device
        self.net, self.record, self.weights = WEIGHTS.network_for(
            net, weights, variant or self.shipped_variant, device)
        self.max_side = int(max_side)
        self.iterations = None if iterations is None else int(iterations)
        self.backward_iterations = (None if backward_iterations is None
                                    else int(backward_iterations))
        self.cascade_side, self.cascade_steps = int(cascade_side), int(cascade_steps)
        self.polish = int(polish)
        self.polish_min_texture = float(polish_min_texture)
        if not 0.1 <= float(polish_scale) <= 1.0:
            raise ValueError(f'polish_scale must be in [0.1, 1], got {polish_scale}')
        self.polish_scale = float(polish_scale)
        self.prealign = bool(prealign)
        self.prealign_config = _prealign.PrealignConfig(features=prealign_features,
                                                        max_side=int(prealign_side))
        self.refine, self.refine_preset = refine, refine_preset
        self.fuse, self.fb_sigma, self.fb_check = fuse, float(fb_sigma), fb_check
        self.fb_cross, self.agree_px = bool(fb_cross), float(agree_px)
        self.dis_cross, self.dis_margin_px = bool(dis_cross), float(dis_margin_px)
        self.concurrent = concurrent
        self.settled_share, self.settled_px = float(settled_share), float(settled_px)
        self._dis = create_dis(dis_preset) if fuse == 'dis' else None
        # Its own buffers: with two threads the settled check runs DIS's two flows side by side.
        self._dis_backward = create_dis(dis_preset) if self.settled_share else None
        self._amp = inference_dtype(precision, device)
        self.net.correlation_dtype(self._amp)
        if net is None:   # a network handed in (tests, analysis) is left as it is
            # Channels-last weights as well as inputs: the convolutions then need no layout
            # conversion per call (network 38.5 -> 32.3 ms at 256 px on one thread, same output).
            self.net.fold_batch_norm().to(memory_format=torch.channels_last)
        # A registered variant reads its own table when the record has one (it scores on
        # its own scale), else the method's (``dense-match-calibrate --method M --write``).
        tables = self.record.get('calibrations') or {}
        self.calibration = ((tables.get(self.calibration_key) or self.record.get('calibration'))
                            if calibrated else None)

    # -- the network ----------------------------------------------------------------

    def _autocast(self):
        return autocast(self.device, self._amp)

    @torch.no_grad()
    def network_flows(self, source: np.ndarray, target: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(forward flow, backward flow, forward visibility) on the working grid of the
        source (both images at the source's working size; flows in working pixels).

        With a ``cascade_side`` above the first pass's size, a second pass at that size
        starts the refinement steps from the first pass's flows: the global match stays at
        the size training showed (large motion in few cells), the steps gain the finer
        grid's precision. Smaller inputs are scaled up to it (a 240x240 pair gets a 1/8 grid
        of 80x80 cells instead of 30x30); the flows then lie on that larger grid, and the
        first pass's flow is kept wherever its round trip is better: an upscaled copy holds no
        detail the network could use, only interpolation it never trained on (held-out
        synthetic pairs: 9.88 px with the second pass everywhere, 5.93 with this choice, 6.01
        without upscaling; README, "neuflow: second pass and polish").
        """
        h, w = source.shape[:2]
        size = grid.working_size((w, h), self.max_side, min_side=32)
        flows = self._pass(source, target, size, self.iterations)
        if self.cascade_side:
            fine = grid.working_size((w, h), self.cascade_side, min_side=32, upscale=True)
            if fine[0] > size[0]:
                refined = self._pass(source, target, fine, self.cascade_steps, flows[:2])
                flows = _better_round_trip(flows, refined, fine) if fine[0] > w else refined
        return flows

    @torch.no_grad()
    def _pass(self, source: np.ndarray, target: np.ndarray, size: tuple[int, int],
              iterations: int | None, start: tuple[np.ndarray, np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One batched call (both directions) with both images at ``size`` (W, H);
        ``start``: (forward, backward) flows of an earlier pass to refine from."""
        ww, wh = size
        images = []
        for image in (source, target):
            ih, iw = image.shape[:2]
            if (iw, ih) != (ww, wh):
                interp = cv2.INTER_AREA if ww * wh < iw * ih else cv2.INTER_LINEAR
                image = cv2.resize(image, (ww, wh), interpolation=interp)
            images.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        s, t = (x[None].to(self.device).float() / 255.0 for x in images)
        padder = InputPadder(wh, ww, 16)
        s, t = padder.pad(s, t)
        init = None
        if start is not None:
            init = torch.cat([padder.pad(_flow_tensor(f, size).to(self.device))[0]
                              for f in start])
            init = F.avg_pool2d(init, 8) / 8.0  # pixels -> 1/8 cells
        s, t = (x.contiguous(memory_format=torch.channels_last) for x in (s, t))
        with self._autocast():
            out = self.net(s, t, iterations=iterations, init_flow=init, two_way=True,
                           backward_iterations=self.backward_iterations)
        flows = padder.unpad(out.flows[-1].float()).permute(0, 2, 3, 1).cpu().numpy()
        visibility = torch.sigmoid(padder.unpad(out.matchability[0, 0].float())).cpu().numpy()
        return flows[0], flows[1], visibility

    # -- matching -------------------------------------------------------------------

    def _match(self, source: np.ndarray, target: np.ndarray):
        dis_flows = None
        if self.settled_share:
            dis_flows = self._dis_flows(source, target)
            if self._settled(dis_flows[2]):
                return self._dis_result(source, target, dis_flows)
        first = functools.partial(self._match_aligned, dis_flows=dis_flows)
        if self.prealign:
            return _prealign.match_prealigned(self._match_aligned, source, target,
                                              self.prealign_config, first=first)
        return first(source, target)

    # -- DIS first, when it settles the pair ------------------------------------------

    def _dis_flows(self, source: np.ndarray, target: np.ndarray
                   ) -> tuple[Future, Future, Future]:
        """DIS's (forward, backward) flows on the source's grid and their round-trip error,
        as the fusion takes them; with two threads the two flows run side by side."""
        h, w = source.shape[:2]
        fwd, bwd = two_way_flow(self._dis, source, target, (w, h), self._dis_backward,
                                concurrent=runs_concurrently(self.concurrent))
        return _done(fwd), _done(bwd), _done(grid.forward_backward_error(fwd, bwd))

    def _settled(self, dis_error: Future) -> bool:
        """Whether DIS's round trip closes within ``settled_px`` on all but ``settled_share``
        of the pixels (leaving the target counts as open): then the network has nothing to
        add. On the shared sets: 1.0-1.9 % of the pixels stay open on the TUM pairs and the
        two small-motion Sintel pairs, where the fusion took DIS's flow anyway, 8.6 % and
        more on every other pair (Middlebury 39-93 %, the HPatches pair 20-33 %, held-out
        synthetic pairs 12-99 %; ``scripts/dis_open_share.py``, README "Partial
        pre-alignment fits, and DIS first")."""
        return float(np.mean(dis_error.result() > self.settled_px)) <= self.settled_share

    def _dis_result(self, source: np.ndarray, target: np.ndarray,
                    dis_flows: tuple[Future, Future, Future]) -> tuple[np.ndarray, np.ndarray]:
        """What ``dis`` returns for the pair: its forward flow and the consistency of its round
        trip (``fb_sigma``), zero where the match leaves the target. Not through the
        network's matchability table: a settled pair is DIS's, and pose selection sees it
        as it would see ``dis``'s (DIS's consistency is close to calibrated at the top
        anyway: 92 % of held-out pixels above 0.9 are right within 1 px)."""
        h, w = source.shape[:2]
        th, tw = target.shape[:2]
        flow, _ = grid.to_source_grid(dis_flows[0].result(), None, (w, h), (w, h), (tw, th))
        # The round trip is infinite where the match leaves the target: consistency 0 there.
        return flow, grid.consistency_from_error(dis_flows[2].result(), self.fb_sigma)

    def _concurrent(self) -> bool:
        """Whether DIS's two flows run beside the network: ``auto`` when OpenCV may use
        more than one thread (``threads`` >= 2 in the node), so one thread stays one core.

        It pays where the network takes about as long as those flows (``neuflow-fast``:
        'auto'); ``neuflow``'s two passes take several times as long, and one thread for
        them costs more than the overlap saves (640x480, two threads: 305 -> 350 ms)."""
        return self.fuse == 'dis' and runs_concurrently(self.concurrent)

    def _match_aligned(self, source: np.ndarray, target: np.ndarray,
                       dis_flows: tuple[Future, Future, Future] | None = None):
        """The network, its residual and the fusion; ``dis_flows``: DIS's flows and their
        round-trip error for this very pair when already computed (:meth:`_dis_flows`)."""
        h, w = source.shape[:2]
        th, tw = target.shape[:2]
        with contextlib.ExitStack() as split:
            pending = dis_flows
            if pending is None and self._concurrent():
                # DIS's two flows (the fusion's candidate, independent of the network) on a
                # second thread while the network and its residual run here. torch on one
                # thread, or both pools fight for the two cores (640x480, two threads:
                # 88 ms; serial 82; split so 66-68, dis 34-37); OpenCV keeps its pool.
                split.enter_context(limit_threads(1, opencv=False))
                fwd, bwd = two_way_flow_in_background(self._dis, source, target, (w, h))
                # DIS's own round trip follows its flows there, while the fusion here costs
                # the forward flow's photometric error.
                pending = (fwd, bwd, in_background(
                    lambda: grid.forward_backward_error(fwd.result(), bwd.result())))
                # Never leave with DIS still running (an exception here): the next call
                # may use the same DIS instance.
                split.callback(futures.wait, pending)
            forward, backward, visibility = self.network_flows(source, target)
            wh, ww = forward.shape[:2]
            net_backward = backward  # on the working grid, for the fusion's cross check
            if self.fb_check == 'working':
                # The round trip on the working grid, in source pixels: the check needs no
                # full-resolution backward flow, so only the forward one is refined.
                error = _working_round_trip(forward, backward, (w, h))
            # Back to each image's own grid and pixels (the backward flow lives on the target).
            forward, visibility = grid.to_source_grid(forward, visibility, (w, h), (ww, wh),
                                                      (tw, th))
            if self.refine == 'dis':
                forward = _refine.dis_residual(source, target, forward, self.refine_preset)
            if self.fb_check == 'full':
                backward, _ = grid.to_source_grid(backward, None, (tw, th), (ww, wh), (w, h))
                if self.refine == 'dis':
                    backward = _refine.dis_residual(target, source, backward, self.refine_preset)
                error = grid.forward_backward_error(forward, backward)
            if self.fuse == 'dis':
                if pending is None:
                    # DIS on the source's grid, as the dis method runs it (the target resized).
                    pending = self._dis_flows(source, target)
                forward, error = self._fuse_with_dis(source, target, forward, error, pending,
                                                     net_backward)
        if self.polish:
            forward = _refine.variational_polish(source, target, forward, self.polish,
                                                  self.polish_min_texture, self.polish_scale)
        consistency = grid.consistency_from_error(error, self.fb_sigma)
        matchability = calibration.apply_table(visibility * consistency, self.calibration)
        # After the table: its floor (how often a pixel without any evidence is right anyway)
        # must not lift a match that leaves the target.
        matchability[~grid.in_bounds(forward, (tw, th))] = 0.0
        return forward, matchability

    def _fuse_with_dis(self, source: np.ndarray, target: np.ndarray, flow: np.ndarray,
                       error: np.ndarray, dis_flows: tuple[Future, Future, Future],
                       net_backward: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per pixel, the network's or DIS's flow: whichever has the smaller forward-backward
        plus photometric error (DIS wins ties: it is the more precise where both agree), and
        DIS where both fail the round trip. ``dis_flows``: futures of DIS's (forward, backward)
        flows on the source's grid (:func:`two_way_flow_in_background`) and of their round-trip
        error; the network's side is costed while they may still be running.

        ``fb_cross``: the network's refined flow also goes round through DIS's backward flow,
        and the smaller error counts. Its own round trip is taken on the working grid before
        the residual, and misses by about a working pixel where the refined flow is right to
        a fraction of one; DIS's backward flow, where it is right, is full-size and precise.
        ``agree_px``: where the two candidates lie within that many pixels of each other,
        both are right to about that much, and DIS is the precise one.

        ``dis_cross``: the mirror of ``fb_cross``. DIS's forward flow also goes round through
        the network's backward flow (``net_backward``, working grid), and the smaller error
        counts: where DIS's backward flow fails (a region it cannot find its way back from,
        though its forward flow is right) its own round trip would hand the pixel to the
        network. Taken on the working grid, as the network's own check, so it costs two
        small resizes and a small warp.
        ``dis_margin_px``: the network's candidate must beat DIS's cost by more than this to
        be taken. The costs are estimates; where they are that close, DIS is right more
        often, and to a fraction of a pixel where it is.
        """
        h, w = source.shape[:2]
        th, tw = target.shape[:2]
        grey_s = cv2.cvtColor(source, cv2.COLOR_RGB2GRAY)
        grey_t = cv2.cvtColor(target, cv2.COLOR_RGB2GRAY)

        def photometric(candidate: np.ndarray) -> np.ndarray:
            warped = grid.warp(grey_t, candidate, border_mode=cv2.BORDER_REPLICATE)
            # Both grey images are uint8, so their absolute difference is exact in uint8.
            return cv2.blur(cv2.absdiff(warped, grey_s).astype(np.float32), (5, 5))

        photo_net = photometric(flow)
        d_bwd = dis_flows[1].result()
        if self.fb_cross:
            # DIS's backward flow lies on the target resized to the source's grid.
            d_bwd_t, _ = grid.to_source_grid(d_bwd, None, (tw, th), (w, h), (w, h))
            error = np.minimum(error, grid.forward_backward_error(flow, d_bwd_t))

        def cost(fb: np.ndarray, photo: np.ndarray) -> np.ndarray:
            return np.minimum(fb, _FB_CAP) + _PHOTO_PX_PER_GREY * photo

        cost_net = cost(error, photo_net)
        d_fwd, _ = grid.to_source_grid(dis_flows[0].result(), None, (w, h), (w, h), (tw, th))
        photo_dis = photometric(d_fwd)
        agree = None
        if self.agree_px:
            gap = d_fwd - flow
            agree = cv2.magnitude(gap[..., 0], gap[..., 1]) < self.agree_px
        d_error = dis_flows[2].result()
        if self.dis_cross and net_backward is not None:
            wh, ww = net_backward.shape[:2]
            d_fwd_w = grid.resize_flow(d_fwd, (ww, wh), target_scale=(w / tw, h / th))
            d_error = np.minimum(d_error, _working_round_trip(d_fwd_w, net_backward, (w, h)))
        use_dis = cost(d_error, photo_dis) <= cost_net + self.dis_margin_px
        # Where neither flow survives its round trip, the photometric term alone would decide,
        # and there (occlusions, large non-rigid motion) it favours the network's smooth flow
        # wrongly: keep DIS, the conservative choice (Sintel subset 14.13 -> 13.21 px, HPatches
        # 240 unchanged; README, "Measured results").
        use_dis |= (d_error >= _FB_CAP) & (error >= _FB_CAP)
        if agree is not None:
            use_dis |= agree
        # OpenCV's masked copy: the same values as np.where, which broadcasting the mask over
        # both channels took 3.7 against 0.5 ms at 640x480.
        use_dis = cv2.medianBlur(use_dis.astype(np.uint8), 5)
        fused = cv2.copyTo(np.ascontiguousarray(d_fwd, np.float32), use_dis,
                           np.array(flow, np.float32))
        fused_error = cv2.copyTo(np.ascontiguousarray(d_error, np.float32), use_dis,
                                 np.array(error, np.float32))
        return fused, fused_error

