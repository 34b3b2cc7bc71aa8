"""``deepmatching`` and ``deepmatching-hog``: quasi-dense matches from the correlation
pyramid (:mod:`core.networks.deepmatching`), densified by EpicFlow.

Pipeline, on working copies of both images (longest side ``max_side``):

1. descriptors (the trained backbone level for ``deepmatching``, the untrained HOG-like
   descriptor for ``deepmatching-hog``), the atomic volume, bottom-up and top-down passes;
2. each atomic patch's best target position and score; a match is kept when it is
   reciprocal (the target cell's best source patch is it or a neighbour) or its score is at
   least ``threshold``, and its score is at least ``min_score``; with ``consistency_px``
   (fitted per checkpoint) a match whose displacement strays that far from its
   neighbours' median is dropped too: :meth:`match_sparse` returns these, in the images'
   own pixels;
3. EpicFlow's edge-aware interpolation (:mod:`.epicflow`) makes the dense flow, optionally
   polished by ``cv2.VariationalRefinement`` (``refine=True``, the default: better on every
   shared set for both descriptors, e.g. Sintel 8.06 -> 7.88 px with HOG; README);
4. matchability, ``matchability='support'`` (default): 1 at a kept match (its score having
   passed ``min_score``), decaying with the distance to the nearest one,
   ``exp(-d^2 / 2 sigma^2)`` with sigma one patch spacing; ``'fb'``: forward-backward
   consistency of the two directions' dense flows (twice the matching cost; Jaccard on
   held-out moving-object pairs 0.36 against 0.76 for ``support``, HOG descriptor).

Memory: the finest volume holds (Hd Wd / 16) * Hd' Wd' scores for descriptor maps of
Hd x Wd (source) and Hd' x Wd' (target), i.e. (HW)^2 / 16 / s^4 for HxW working images at
descriptor stride s; the pyramid adds a third, the top-down pass as much again. A working
size whose finest volume (float32) exceeds ``max_memory_mb`` is shrunk until it fits, with
a warning. At the default 512 px a 1024x436 Sintel frame works at 512x218: 1728 patches x
256x109 target cells = 48.2 M scores, 193 MB.

Inputs are checked before anything runs: RGB uint8 HxWx3, each side at least
:meth:`min_side` px (the top-level patch, two atomic patches when the level count is
automatic).
"""
from __future__ import annotations

import dataclasses
import warnings

import cv2
import numpy as np
import torch

from dense_match_ros.core.checkpoint import CheckpointError
from dense_match_ros.core.device import autocast, check_precision, inference_dtype
from dense_match_ros.core.geometry import grid
from dense_match_ros.core.refine import variational_polish
from dense_match_ros.core.methods import weights as _weights
from dense_match_ros.core.methods.epicflow import EpicInterpolator, neighbour_consistent
from dense_match_ros.core.networks.deepmatching import (ATOMIC, DeepMatchingConfig, DeepMatchingNet,
                                                        best_matches, config_from_dict,
                                                        finest_volume)
from dense_match_ros.core.methods.inputs import check_rgb
from dense_match_ros.core.registry import Matcher

TRAIN_HINT = ('dense-match-train deepmatching --config config/train_deepmatching_cpu.yaml --out '
              'runs/deepmatching_cpu && dense-match-train export runs/deepmatching_cpu --out '
              'dense_match_ros/weights/deepmatching_cpu.pt')
WEIGHTS = _weights.LearnedWeights('deepmatching', lambda cfg: DeepMatchingNet(config_from_dict(cfg)),
                                  TRAIN_HINT)
MATCHABILITY = ('support', 'fb')
BYTES_PER_SCORE = 4


@dataclasses.dataclass
class SparseMatches:
    """Kept matches of one pair, in the images' own pixels."""

    source: np.ndarray
    """(N, 2) float32 x, y in the source (atomic patch centres)."""
    target: np.ndarray
    """(N, 2) float32 x, y in the target."""
    score: np.ndarray
    """(N,) float32 in [0, 1]: the top-down score over the levels summed into it."""
    reciprocal: np.ndarray
    """(N,) bool."""


def check_image(image: np.ndarray, what: str, min_side: int) -> None:
    """The input rules (uint8 RGB, at least the top-level patch a side), each named in its
    ValueError (:func:`.inputs.check_rgb`)."""
    check_rgb(image, what, min_side)


class DeepMatchingMatcher(Matcher):
    """Trained DeepMatching + EpicFlow (``deepmatching``)."""

    default_min_score = 0.62
    """Matches scoring below this are dropped even when reciprocal, where the checkpoint
    record has no ``calibration.min_score``. Chosen with the HOG descriptor on 40 held-out
    moving-object tuning pairs (held-out photos, the calibration seed 7, not an evaluation
    set; README): lowest mean dense AEPE after EpicFlow, 14.63 px against 16.55 keeping
    every reciprocal match and 15.50 at 0.6; a wrong match costs the pixels around it more
    than a missing one."""

    def __init__(self, device: str = 'cpu', weights: str | None = None, variant: str | None = None,
                 max_side: int = 512, max_memory_mb: float = 1024.0, levels: int = 0,
                 threshold: float = 0.8, min_score: float | None = None,
                 consistency_px: float | None = None, refine: bool = True,
                 matchability: str = 'support',
                 fb_sigma: float = 2.0, width: float | None = None, precision: str = 'auto',
                 net: DeepMatchingNet | None = None) -> None:
        check_precision(precision)
        if matchability not in MATCHABILITY:
            raise ValueError(f'matchability must be one of {MATCHABILITY}, got {matchability!r}')
        if not max_memory_mb > 0:
            raise ValueError(f'max_memory_mb must be > 0, got {max_memory_mb}')
        if int(levels) < 0:
            raise ValueError(f'levels must be >= 0 (0: automatic), got {levels}')
        if not fb_sigma > 0:
            raise ValueError(f'fb_sigma must be > 0 px, got {fb_sigma}')
        self.device = device
        self.net, self.record, self.weights = self._network(net, weights, variant, device)
        if width is not None and self.net.config.descriptor == 'backbone' \
                and abs(float(width) - float(self.net.config.width)) > 1e-9:
            raise CheckpointError(f'{self.weights or "the network"}: expected a width-{width:g} '
                                  f'deepmatching checkpoint, found width {self.net.config.width:g}')
        self.max_side = int(max_side)
        self.max_memory_mb = float(max_memory_mb)
        self.levels = int(levels)
        self.threshold = float(threshold)
        fitted = (self.record.get('calibration') or {}).get('min_score')
        self.min_score = float(min_score if min_score is not None else
                               fitted if fitted is not None else self.default_min_score)
        # Off unless asked or fitted for the checkpoint (``deepmatching_task consistency``).
        fitted = (self.record.get('calibration') or {}).get('consistency_px')
        self.consistency_px = float(consistency_px if consistency_px is not None else
                                    fitted if fitted is not None else 0.0)
        self.refine = bool(refine)
        self.matchability = matchability
        self.fb_sigma = float(fb_sigma)
        self._amp = inference_dtype(precision, device)
        self._interp = EpicInterpolator()

    def _network(self, net, weights, variant, device):
        return WEIGHTS.network_for(net, weights, variant, device)

    # ------------------------------------------------------------------ sizes

    def min_side(self) -> int:
        """Smallest input side: the top-level patch (two atomic patches when automatic)."""
        return ATOMIC * self.net.stride * 2 ** max(1, self.levels)

    def working_sizes(self, source_size: tuple[int, int], target_size: tuple[int, int]
                      ) -> tuple[tuple[int, int], tuple[int, int]]:
        """(W, H) of both working images: longest side ``max_side``, then shrunk (with a
        warning) until the finest volume fits ``max_memory_mb``."""
        floor = self.min_side()
        scale = 1.0
        while True:
            sizes = [grid.working_size(s, int(round(self.max_side * scale)) if self.max_side > 0
                                       else int(round(max(s) * scale)), min_side=floor)
                     for s in (source_size, target_size)]
            mb = self.volume_mb(*sizes)
            if mb <= self.max_memory_mb or min(min(sizes[0]), min(sizes[1])) <= floor:
                break
            scale *= 0.9
        if scale < 1.0:
            warnings.warn(f'{self.name or "deepmatching"}: working size shrunk to '
                          f'{sizes[0][0]}x{sizes[0][1]} so the finest volume ({mb:.0f} MB) fits '
                          f'max_memory_mb={self.max_memory_mb:g}', RuntimeWarning, stacklevel=5)
        return sizes[0], sizes[1]

    def volume_mb(self, source_size: tuple[int, int], target_size: tuple[int, int]) -> float:
        """Finest volume in MB (float32) for working images of these (W, H)."""
        s = self.net.stride
        n = finest_volume((source_size[1] // s, source_size[0] // s),
                          (target_size[1] // s, target_size[0] // s))
        return n * BYTES_PER_SCORE / 1e6

    # ------------------------------------------------------------------ matching

    def match(self, source: np.ndarray, target: np.ndarray):
        self._check(source, target)
        return super().match(source, target)

    def _check(self, source: np.ndarray, target: np.ndarray) -> None:
        check_image(source, 'source', self.min_side())
        check_image(target, 'target', self.min_side())

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float() / 255.0

    def working_images(self, source: np.ndarray, target: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Both images at their working sizes (:meth:`working_sizes`)."""
        sizes = self.working_sizes(source.shape[1::-1], target.shape[1::-1])
        return self._resize(source, sizes[0]), self._resize(target, sizes[1])

    @staticmethod
    def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        h, w = image.shape[:2]
        if (w, h) == tuple(size):
            return image
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA if size[0] < w else cv2.INTER_LINEAR)

    @torch.no_grad()
    def candidates(self, src: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, ...]:
        """(source px, target px, score, reciprocal, eligible) of every atomic patch of two
        working images, in working pixels: eligible when reciprocal or scoring at least
        ``threshold``, and landing inside the target. ``min_score`` is not applied: the
        kept matches are the eligible ones scoring at least that (:meth:`_working_matches`),
        and its fit (``deepmatching_task min-score``) moves it over the same candidates."""
        with autocast(self.device, self._amp):
            out = self.net(self._tensor(src), self._tensor(tgt), levels=self.levels)
        m = best_matches(out.scores[0], out.bottom_up[0][0], out.levels, self.net.stride)
        del out
        th, tw = tgt.shape[:2]
        t = m.target
        inside = (t[:, 0] >= 0) & (t[:, 0] <= tw - 1) & (t[:, 1] >= 0) & (t[:, 1] <= th - 1)
        finite = torch.isfinite(t).all(1)
        eligible = (m.reciprocal | (m.score >= self.threshold)) & inside & finite
        return (m.source.cpu().numpy(), torch.nan_to_num(t).cpu().numpy(), m.score.cpu().numpy(),
                m.reciprocal.cpu().numpy(), eligible.cpu().numpy())

    def _working_matches(self, src: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, ...]:
        """(source px, target px, score, reciprocal, kept) of every atomic patch, working pixels."""
        ps, pt, score, recip, eligible = self.candidates(src, tgt)
        return ps, pt, score, recip, self.kept(ps, pt, eligible & (score >= self.min_score))

    def kept(self, ps: np.ndarray, pt: np.ndarray, keep: np.ndarray,
             consistency_px: float | None = None) -> np.ndarray:
        """``keep`` less the matches that disagree with their neighbours by more than
        ``consistency_px`` working pixels (default: the matcher's; 0: none dropped)."""
        limit = self.consistency_px if consistency_px is None else float(consistency_px)
        if limit <= 0 or not keep.any():
            return keep
        out = keep.copy()
        out[keep] = neighbour_consistent(ps[keep], pt[keep], limit)
        return out

    def match_sparse(self, source: np.ndarray, target: np.ndarray) -> SparseMatches:
        """The kept matches, in the images' own pixels (no densification)."""
        self._check(source, target)
        source, target = np.asarray(source), np.asarray(target)
        src, tgt = self.working_images(source, target)
        ps, pt, score, recip, kept = self._working_matches(src, tgt)
        return SparseMatches(_rescale(ps[kept], src.shape[1::-1], source.shape[1::-1]),
                             _rescale(pt[kept], tgt.shape[1::-1], target.shape[1::-1]),
                             score[kept].astype(np.float32), recip[kept])

    def _dense(self, src: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dense flow, kept source px, their scores) on the working source grid."""
        ps, pt, score, _, kept = self._working_matches(src, tgt)
        return self.densify(src, tgt, ps[kept], pt[kept]), ps[kept], score[kept]

    def densify(self, src: np.ndarray, tgt: np.ndarray, points: np.ndarray,
                targets: np.ndarray) -> np.ndarray:
        """The dense flow of two working images from kept matches (working pixels): EpicFlow,
        then the variational polish when ``refine``."""
        flow = self._interp.densify(src, points, tgt, targets)
        if self.refine:   # OpenCV's default 5 fixed-point iterations; pairs of one size only
            flow = variational_polish(src, tgt, np.asarray(flow, np.float32), iterations=5)
        return np.nan_to_num(np.asarray(flow, np.float32))

    def _match(self, source: np.ndarray, target: np.ndarray):
        h, w = source.shape[:2]
        th, tw = target.shape[:2]
        src, tgt = self.working_images(source, target)
        (sh, sw), (twh, tww) = src.shape[:2], tgt.shape[:2]
        flow, points, scores = self._dense(src, tgt)
        if self.matchability == 'fb':
            backward, _, _ = self._dense(tgt, src)
            matchability = grid.forward_backward_consistency(flow, backward, self.fb_sigma)
        else:
            matchability = self._support(points, scores, (sh, sw))
        matchability = matchability * grid.in_bounds(flow, (tww, twh))
        return grid.to_source_grid(flow, np.asarray(matchability, np.float32), (w, h), (tww, twh),
                                   (tw, th))

    def _support(self, points: np.ndarray, scores: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """exp(-d^2 / 2 sigma^2) of the distance d beyond half a patch spacing to the nearest
        kept match, sigma one patch spacing.

        The score enters through the keep decision (``min_score``), not as a factor: the raw
        score's scale differs between descriptors, and weighting by it measured worse even
        for the HOG one (matchability Jaccard on 10 held-out moving-object pairs: 0.749 with
        the score as a factor, 0.758 without).
        """
        h, w = shape
        if len(points) == 0:
            return np.zeros((h, w), np.float32)
        from scipy.spatial import cKDTree
        dist, idx = cKDTree(points).query(grid.pixel_coords(h, w).reshape(-1, 2))
        sigma = float(ATOMIC * self.net.stride)
        decay = np.exp(-0.5 * np.square(np.maximum(dist - 0.5 * sigma, 0.0) / sigma))
        return decay.reshape(h, w).astype(np.float32)


class DeepMatchingHogMatcher(DeepMatchingMatcher):
    """``deepmatching-hog``: the same pyramid on the untrained HOG-like descriptor (DM-HOG)."""

    def _network(self, net, weights, variant, device):
        if weights:
            raise ValueError('deepmatching-hog has no weights (its descriptor is not trained); '
                             'leave `weights` empty')
        if net is None:
            net = DeepMatchingNet(DeepMatchingConfig(descriptor='hog'))
        return net.to(device).eval(), {}, None


def _rescale(points: np.ndarray, working: tuple[int, int], native: tuple[int, int]) -> np.ndarray:
    """Pixel positions from a working image of (W, H) to one of ``native`` (W, H)."""
    scale = np.array([native[0] / working[0], native[1] / working[1]], np.float32)
    return ((points + 0.5) * scale - 0.5).astype(np.float32)

