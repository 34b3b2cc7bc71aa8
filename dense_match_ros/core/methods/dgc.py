"""``dgc``: DGC+M-Net (Melekhov et al., WACV 2019) dense correspondence with matchability.

Two ways to meet inputs of any size (``mode``):

* ``'resize'`` (default): both images are resized to the size the network was trained at
  (240x240 unless the checkpoint says otherwise), and the final grid is turned into a flow
  and upsampled to the source's full grid (:func:`core.geometry.grid.resize_flow`). The network then
  sees exactly the statistics it was trained on; precision is bounded by the working size.
* ``'pyramid'``: the pyramid runs on each image at its own aspect ratio, longest side
  ``max_side`` (multiples of 16): finer levels, finer flow, but the finer levels see
  sizes they were not trained on (the coarsest level still runs at the trained size, see
  :mod:`core.networks.dgc`). Measured on the CPU checkpoint, it is worse than ``resize``
  at every size tried (the note of issue 6 has the numbers), so it stays an option.

Matchability is the sigmoid of the DGC+M-Net head; a checkpoint trained without it gives
matchability 1 where the flow lands inside the target and 0 elsewhere.

``refine='dis'`` adds a full-resolution DIS residual on top of the network's flow
(:mod:`core.refine`): the network finds the match, DIS makes it precise at the input's own
resolution. It costs one DIS call per pair on the CPU, so it is an option, off by default.
``fb_sigma > 0`` also matches the pair the other way and multiplies the matchability by
``exp(-(e / fb_sigma)^2)`` of the round-trip error e: the head judges whether a pixel can be
matched, the round trip whether this match is right, which is what pose selection needs (it
doubles the time, so it is off by default too).
"""
from __future__ import annotations


import cv2
import numpy as np
import torch

from dense_match_ros.core import refine as _refine
from dense_match_ros.core.geometry import grid
from dense_match_ros.core.methods import weights as _weights
from dense_match_ros.core.networks.dgc import PYRAMID, DgcNet, config_from_dict
from dense_match_ros.core.registry import LEVELS, Matcher

TRAIN_HINT = ('on a GPU: scripts/gpu_train_dgc.sh (see docs/GPU_TRAINING.md); on a CPU: '
              'dense-match-train dgc --config config/train_dgc_cpu.yaml --out runs/dgc_cpu; then '
              'dense-match-train export RUN --out dense_match_ros/weights/dgc_gpu.pt (or dgc_cpu.pt)')
MODES = ('resize', 'pyramid')


WEIGHTS = _weights.LearnedWeights('dgc', lambda cfg: DgcNet(config_from_dict(cfg)), TRAIN_HINT)


class DgcMatcher(Matcher):
    """DGC+M-Net: coarse-to-fine grids from a global correlation, upsampled to the input."""

    capabilities = frozenset({LEVELS})

    def __init__(self, device: str = 'cpu', weights: str | None = None, variant: str | None = None,
                 mode: str = 'resize', max_side: int = 640, half: bool | None = None,
                 net: DgcNet | None = None, refine: str = 'none',
                 refine_preset: str = 'medium', fb_sigma: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        _refine.check_refiner(refine, refine_preset)
        if not fb_sigma >= 0:
            raise ValueError(f'fb_sigma must be >= 0 (0: no forward-backward check), '
                             f'got {fb_sigma}')
        self.refine, self.refine_preset = refine, refine_preset
        self.fb_sigma = float(fb_sigma)
        self.device = device
        self.net, self.record, self.weights = WEIGHTS.network_for(
            net, weights, variant, device)
        self.mode = mode
        self.max_side = int(max_side)
        # fp16 where it is fast (CUDA); the CPU runs fp32.
        self.half = (str(device).startswith('cuda')) if half is None else bool(half)
        if self.half:
            self.net.half()

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) the network was trained at."""
        return tuple(self.net.config.input_size)

    def _working_size(self, image: np.ndarray) -> tuple[int, int]:
        """(W, H) the network runs this image at."""
        if self.mode == 'resize':
            h, w = self.input_size
            return w, h
        h, w = image.shape[:2]
        return grid.working_size((w, h), self.max_side, min_side=32, multiple=16, upscale=True)

    def _tensor(self, image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        h, w = image.shape[:2]
        if (w, h) != size:
            shrink = size[0] < w or size[1] < h
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        t = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None]
        return t.to(torch.float16 if self.half else torch.float32) / 255.0

    @torch.no_grad()
    def working_flow(self, source: np.ndarray, target: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, tuple[int, int], tuple[int, int]]:
        """Flow and matchability on the working source grid, with both working sizes (W, H)."""
        s_size, t_size = self._working_size(source), self._working_size(target)
        out = self.net(self._tensor(source, s_size), self._tensor(target, t_size))
        g = out.grids[-1][0].float().permute(1, 2, 0).cpu().numpy()
        flow = grid.grid_to_flow(g, t_size)
        if out.matchability is not None:
            matchability = torch.sigmoid(out.matchability[0, 0].float()).cpu().numpy()
        else:
            matchability = grid.in_bounds(flow, t_size).astype(np.float32)
        return flow, matchability, s_size, t_size

    def level_labels(self, source: np.ndarray) -> list[str]:
        """Names of the :meth:`level_flows` levels with their working heights, e.g. 'pool4 (15 px)'."""
        wh = self._working_size(source)[1]
        heights = [self.input_size[0] // 16] + [wh // (16 // 2 ** i) for i in range(1, len(PYRAMID))]
        return [f'{name} ({h} px)' for name, h in zip(PYRAMID, heights)]

    @torch.no_grad()
    def level_flows(self, source: np.ndarray, target: np.ndarray) -> list[np.ndarray]:
        """The flow of every pyramid level (coarse to fine) on the source's full grid.

        For the per-level AEPE of the evaluation (DGC-Net's supplementary Table 2): each
        level's grid is upsampled to the working grid as the network itself upsamples it,
        then brought to the full grid like the final flow.
        """
        h, w = source.shape[:2]
        th, tw = target.shape[:2]
        (ww, wh), (tww, twh) = self._working_size(source), self._working_size(target)
        out = self.net(self._tensor(source, (ww, wh)), self._tensor(target, (tww, twh)))
        flows = []
        for g in out.grids:
            g = torch.nn.functional.interpolate(g.float(), size=(wh, ww), mode='bilinear',
                                                align_corners=False)
            flow = grid.grid_to_flow(g[0].permute(1, 2, 0).cpu().numpy(), (tww, twh))
            flows.append(grid.to_source_grid(flow, None, (w, h), (tww, twh), (tw, th))[0])
        return flows

    def _match(self, source: np.ndarray, target: np.ndarray):
        flow, matchability = self._one_way(source, target)
        if self.fb_sigma > 0:
            backward, _ = self._one_way(target, source)
            matchability = matchability * grid.forward_backward_consistency(
                flow, backward, self.fb_sigma)
        return flow, matchability

    def _one_way(self, source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flow and the head's matchability on the source's full grid."""
        h, w = source.shape[:2]
        th, tw = target.shape[:2]
        flow, matchability, _, (tww, twh) = self.working_flow(source, target)
        flow, matchability = grid.to_source_grid(flow, matchability, (w, h), (tww, twh), (tw, th))
        if self.refine == 'dis':
            flow = _refine.dis_residual(source, target, flow, self.refine_preset)
        return flow, matchability
