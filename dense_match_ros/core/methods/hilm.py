"""``hilm``: HiLM hierarchical matching (Fathy et al., ECCV 2018) densified by EpicFlow.

Pipeline on a working copy of each image (longest side capped by ``max_side``):

1. descriptors from the trained :class:`~core.networks.hilm_net.HilmNet` (shallow conv2,
   deep conv4);
2. for source points on a regular grid (every ``grid_step`` px, coarser if that would
   exceed the interpolator's 30 000 matches): deep nearest neighbour
   over the whole target, then shallow refinement within ``radius`` px of it (HiLM uses
   32 px at full resolution for ~1000 px wide images; the default scales that to the
   working size) with sub-cell refinement;
3. forward-backward check: each match is matched back from the target, and kept only if
   it returns within ``fb_threshold`` px of where it started;
4. EpicFlow's edge-aware interpolation (``cv2.ximgproc``, locally-weighted affine fits
   over geodesic neighbours) turns the surviving matches into a dense flow, and the same
   matches reversed into a dense backward flow;
5. matchability = ``exp(-(fb / fb_sigma)^2)`` of the dense forward-backward error, times the
   shallow-descriptor similarity (clipped to [0, 1]) at both ends of the flow, times a
   support term that decays with the distance to the nearest surviving match, so a pixel
   scores high only where the flow is consistent, looks alike at both ends, and rests on
   matches nearby rather than on extrapolation.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from dense_match_ros.core.geometry import grid
from dense_match_ros.core.methods.epicflow import MAX_MATCHES, EpicInterpolator
from dense_match_ros.core.methods.hilm_hierarchical import hierarchical_match, sample_descriptors
from dense_match_ros.core.methods import weights as _weights
from dense_match_ros.core.networks.hilm_net import HilmNet, config_from_dict
from dense_match_ros.core.registry import HIERARCHICAL_FEATURES, Matcher

TRAIN_HINT = ('dense-match-train hilm --config config/train_hilm_cpu.yaml --out runs/hilm_cpu && '
              'dense-match-train export runs/hilm_cpu --out dense_match_ros/weights/hilm_cpu.pt')


WEIGHTS = _weights.LearnedWeights('hilm', lambda cfg: HilmNet(config_from_dict(cfg)), TRAIN_HINT)


class HilmMatcher(Matcher):
    """Hierarchical deep->shallow nearest-neighbour matching + EpicFlow densification."""

    capabilities = frozenset({HIERARCHICAL_FEATURES})

    def __init__(self, device: str = 'cpu', weights: str | None = None, variant: str | None = None,
                 max_side: int = 512, grid_step: int = 2, radius: float | None = None,
                 fb_threshold: float = 3.0, fb_sigma: float = 2.0, subpixel: bool = True,
                 postprocess: bool = False, net: HilmNet | None = None) -> None:
        self.device = device
        self.net, self.record, self.weights = WEIGHTS.network_for(
            net, weights, variant, device)
        self.max_side = int(max_side)
        self.grid_step = max(1, int(grid_step))
        self.radius = radius
        self.fb_threshold = float(fb_threshold)
        if not fb_sigma > 0:
            raise ValueError(f'fb_sigma must be > 0 px, got {fb_sigma}')
        self.fb_sigma = float(fb_sigma)
        self.subpixel = bool(subpixel)
        self._interp = EpicInterpolator(postprocess)

    # ------------------------------------------------------------------ helpers

    def _working(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        # The deep level needs a few cells per side: at least 16 px.
        size = grid.working_size((w, h), self.max_side, min_side=16)
        if size == (w, h):
            return image
        interp = cv2.INTER_AREA if size[0] < w else cv2.INTER_LINEAR
        return cv2.resize(image, size, interpolation=interp)

    @torch.no_grad()
    def features(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        shallow, deep = self.net(x)
        return shallow[0].float(), deep[0].float()

    def search_radius(self, working_size: tuple[int, int]) -> float:
        if self.radius is not None:
            return float(self.radius)
        # HiLM: 32 px for ~1024 px wide images; never below 1.25 deep cells (the deep
        # match is a cell centre, up to 0.7 cell from the truth when it is right).
        return max(32.0 * max(working_size) / 1024.0, 1.25 * self.net.deep_stride)

    def _densify(self, img_a: np.ndarray, pts_a: np.ndarray, img_b: np.ndarray,
                 pts_b: np.ndarray) -> np.ndarray:
        """Dense flow on ``img_a``'s grid from sparse matches (:mod:`.epicflow`)."""
        return self._interp.densify(img_a, pts_a, img_b, pts_b)

    # ------------------------------------------------------------------ matching

    @torch.no_grad()
    def sparse_matches(self, src: np.ndarray, tgt: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
        """Consistent matches between working images: (src px (N, 2), tgt px (N, 2),
        shallow similarity (N,), features) -- the part before densification."""
        sh_s, dp_s = self.features(src)
        sh_t, dp_t = self.features(tgt)
        h, w = src.shape[:2]
        step = self.grid_step
        n = math.ceil(h / step) * math.ceil(w / step)
        if n > MAX_MATCHES:
            step = math.ceil(math.sqrt(h * w / MAX_MATCHES))
        ys, xs = np.mgrid[step // 2:h:step, step // 2:w:step]
        pts = torch.from_numpy(np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32)).to(self.device)
        s_str, d_str = self.net.shallow_stride, self.net.deep_stride
        radius = self.search_radius((w, h))
        fwd, _, sim = hierarchical_match(pts, sh_s, dp_s, sh_t, dp_t, s_str, d_str, radius, self.subpixel)
        back, _, _ = hierarchical_match(fwd, sh_t, dp_t, sh_s, dp_s, s_str, d_str, radius, self.subpixel)
        th, tw = tgt.shape[:2]
        ok = ((back - pts).norm(dim=-1) <= self.fb_threshold) \
            & (fwd[:, 0] >= 0) & (fwd[:, 0] <= tw - 1) & (fwd[:, 1] >= 0) & (fwd[:, 1] <= th - 1)
        return (pts[ok].cpu().numpy(), fwd[ok].cpu().numpy(), sim[ok].cpu().numpy(),
                (sh_s, sh_t))

    def _match(self, source: np.ndarray, target: np.ndarray):
        h, w = source.shape[:2]
        th, tw = target.shape[:2]
        src, tgt = self._working(source), self._working(target)
        wh, ww = src.shape[:2]
        twh, tww = tgt.shape[:2]
        p_src, p_tgt, _, (sh_s, sh_t) = self.sparse_matches(src, tgt)
        forward = self._densify(src, p_src, tgt, p_tgt)
        backward = self._densify(tgt, p_tgt, src, p_src)
        if len(p_src) == 0:
            matchability = np.zeros((wh, ww), np.float32)
        else:
            consistency = grid.forward_backward_consistency(forward, backward, self.fb_sigma)
            similarity = self._dense_similarity(forward, sh_s, sh_t)
            support = self._support(p_src, (wh, ww))
            matchability = (consistency * support * np.clip(similarity, 0.0, 1.0)).astype(np.float32)
        return grid.to_source_grid(forward, matchability, (w, h), (tww, twh), (tw, th))

    def _support(self, points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """1 near a surviving match, falling off over a few grid steps away from any.

        Both dense flows are interpolated from the same matches, so they agree with each
        other even where no match survived; distance to the nearest match says how much
        the flow there is evidence rather than extrapolation.
        """
        h, w = shape
        mask = np.full((h, w), 255, np.uint8)
        ij = np.clip(np.rint(points).astype(int), 0, [w - 1, h - 1])
        mask[ij[:, 1], ij[:, 0]] = 0
        dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
        scale = 2.0 * self.grid_step
        return np.exp(-np.square(np.maximum(dist - self.grid_step, 0.0) / scale))

    @torch.no_grad()
    def _dense_similarity(self, flow: np.ndarray, sh_s: torch.Tensor, sh_t: torch.Tensor) -> np.ndarray:
        """Cosine similarity of shallow descriptors at both ends of each flow vector."""
        h, w = flow.shape[:2]
        stride = self.net.shallow_stride
        src_pts = torch.from_numpy(grid.pixel_coords(h, w).reshape(1, -1, 2)).to(self.device)
        tgt_pts = torch.from_numpy(grid.flow_to_map(flow).reshape(1, -1, 2)).to(self.device)
        a = sample_descriptors(sh_s[None], src_pts, stride)
        b = sample_descriptors(sh_t[None], tgt_pts, stride)
        return (a * b).sum(-1).reshape(h, w).cpu().numpy()
