"""DeepMatching as a U-shaped network (Revaud et al. IJCV 2016; trained end to end as in
Thewlis et al. BMVC 2016): a correlation pyramid going up, its reverse coming down.

Geometry. Descriptors (trained backbone level, or :class:`~core.networks.hog.HogDescriptor`)
are computed on both images at stride ``s``. The source descriptor map is cut into atomic
4x4 patches on a grid (Gy, Gx); each is correlated with the target at every descriptor
position (the patch's top-left corner there), giving the finest volume (B, Gy, Gx, Ht, Wt):
(HW)^2/16 scores for an HxW descriptor map. A source patch of level ``l`` covers 2^l x 2^l
atomic cells from its top-left cell (i, j); its four children are the level-(l-1) patches
at (i + a d, j + b d), a, b in {0, 1}, d = 2^(l-1), and its target maps have one cell per
2^l descriptor pixels.

Bottom-up, each level: 3x3 max-pool (each child may move a cell on its own: the
deformation the method tolerates), subsample by 2, average the four children each read at
its own offset (2 cells at the new resolution: a child sits half the parent's size from
its corner), then a power rectification ``x^lambda`` (lambda learnable, 1.4 to start)
that favours patches whose children agree. All source positions are kept at every level,
so the source axes never shrink while the target maps do; the total volume is 4/3 of the
finest.

Top-down (backtracking as convolutions): the transpose of each operator, in reverse
order: a parent's scores go back to its children's positions (each child averages its up
to four parents), then through the max-pool's switches to the cell each pooled value came
from (the largest contribution wins where windows overlap, as backtracking would choose),
and are added to that level's own scores. The atomic level so holds evidence from every
scale, and its argmax per patch is the match. Everything is differentiable, so a loss on
the atomic scores trains the descriptor through both passes.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from dense_match_ros.core.networks.backbone import LEVELS, STRIDES, VGGBackbone, VGGConfig
from dense_match_ros.core.networks.hog import HogDescriptor

ATOMIC = 4
"""Side of an atomic patch, in descriptor pixels (the paper's 4x4)."""
DESCRIPTORS = ('backbone', 'hog')
_EPS = 1e-6


@dataclasses.dataclass
class DeepMatchingConfig:
    """Architecture (stored in checkpoints; plain types only)."""

    descriptor: str = 'backbone'
    """'backbone' (trained VGG levels) or 'hog' (untrained; DM-HOG)."""
    width: float = 0.25
    batch_norm: bool = True
    level: str = 'conv2'
    """Backbone level used as the pixel descriptor (its stride is the descriptor stride)."""
    exponent: float = 1.4
    """Initial power of the rectification (the paper's lambda)."""
    learn_exponent: bool = True
    levels: int = 0
    """Aggregation levels above the atomic one; 0: as many as the image allows."""


TRAINING_ONLY = ('backbone_init', 'init_weights')
"""Model-section keys that say how training started, not what the network is (a run's
checkpoint keeps them; building the network ignores them)."""


def config_from_dict(values: dict) -> DeepMatchingConfig:
    names = {f.name for f in dataclasses.fields(DeepMatchingConfig)}
    values = {k: v for k, v in values.items() if k not in TRAINING_ONLY}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f'unknown deepmatching model keys: {sorted(unknown)}')
    cfg = DeepMatchingConfig(**values)
    if cfg.descriptor not in DESCRIPTORS:
        raise ValueError(f'descriptor must be one of {DESCRIPTORS}, got {cfg.descriptor!r}')
    if cfg.level not in LEVELS[:3]:
        raise ValueError(f'level must be one of {LEVELS[:3]} (a shallow, dense level), got {cfg.level!r}')
    if not 0.5 <= cfg.exponent <= 4.0:
        raise ValueError(f'exponent must be in [0.5, 4], got {cfg.exponent}')
    if cfg.levels < 0:
        raise ValueError(f'levels must be >= 0 (0: automatic), got {cfg.levels}')
    return cfg


@dataclasses.dataclass
class DeepMatchingOutput:
    scores: torch.Tensor
    """(B, Gy, Gx, Ht, Wt) atomic scores after the top-down pass (all scales summed)."""
    bottom_up: list[torch.Tensor]
    """Each level's own scores, finest first (the atomic correlation is ``bottom_up[0]``)."""
    levels: int
    """Aggregation levels above the atomic one."""


def auto_levels(grid: tuple[int, int], target: tuple[int, int], cap: int = 0) -> int:
    """Levels up to patches covering about half the source's longer side, while the
    coarsest target map keeps at least two cells a side (``cap`` > 0 caps it)."""
    gy, gx = grid
    up = max(1, int(math.floor(math.log2(max(gy, gx)))))
    fit = max(1, int(math.floor(math.log2(max(2, min(target)) / 2))) + 1)
    levels = max(1, min(up, fit))
    return min(levels, cap) if cap > 0 else levels


def finest_volume(source_desc: tuple[int, int], target_desc: tuple[int, int]) -> int:
    """Scores in the finest volume for descriptor maps of (H, W) each: (Hs Ws / 16) * Ht Wt."""
    return (source_desc[0] // ATOMIC) * (source_desc[1] // ATOMIC) * target_desc[0] * target_desc[1]


def atomic_correlation(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """(B, Gy, Gx, Ht, Wt): mean cosine of each source 4x4 patch placed with its top-left at
    every target position (zeros beyond the target's right and bottom edges).

    One grouped convolution: the source patches are the kernels, one group per pair.
    """
    b, c, hs, ws = fs.shape
    gy, gx = hs // ATOMIC, ws // ATOMIC
    ht, wt = ft.shape[-2:]
    kernels = (fs[:, :, :gy * ATOMIC, :gx * ATOMIC]
               .reshape(b, c, gy, ATOMIC, gx, ATOMIC).permute(0, 2, 4, 1, 3, 5)
               .reshape(b * gy * gx, c, ATOMIC, ATOMIC)) / float(ATOMIC * ATOMIC)
    target = F.pad(ft, (0, ATOMIC - 1, 0, ATOMIC - 1)).reshape(1, b * c, ht + ATOMIC - 1, wt + ATOMIC - 1)
    out = F.conv2d(target, kernels.to(target.dtype), groups=b)
    return out.reshape(b, gy, gx, ht, wt).clamp_min(0.0)


def _children(grid: tuple[int, int], target: tuple[int, int], d: int):
    """The (a, b) child offsets that exist for a grid and a level's target map size."""
    gy, gx = grid
    h, w = target
    return [(a, b) for a in (0, 1) for b in (0, 1)
            if a * d < gy and b * d < gx and 2 * a < h and 2 * b < w]


def _counts(grid: tuple[int, int], d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(children per parent, parents per child), each (Gy, Gx, 1, 1): the normalisers of
    the two passes (patches near the bottom-right lack children, near the top-left parents)."""
    gy, gx = grid
    i = torch.arange(gy, device=device).view(-1, 1)
    j = torch.arange(gx, device=device).view(1, -1)
    ny_c = 1 + (i + d < gy).float()
    nx_c = 1 + (j + d < gx).float()
    ny_p = 1 + ((i - d >= 0) & (d < gy)).float()
    nx_p = 1 + ((j - d >= 0) & (d < gx)).float()
    return (ny_c * nx_c)[..., None, None], (ny_p * nx_p)[..., None, None]


def aggregate(volume: torch.Tensor, d: int, exponent: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One bottom-up level: (parent scores (B, Gy, Gx, h, w), max-pool switches)."""
    b, gy, gx, hh, ww = volume.shape
    pooled, switches = F.max_pool2d(volume.reshape(b, gy * gx, hh, ww), 3, 2, 1, return_indices=True)
    h, w = pooled.shape[-2:]
    pooled = pooled.reshape(b, gy, gx, h, w)
    total = None
    for a, c in _children((gy, gx), (h, w), d):
        child = pooled[:, a * d:, c * d:, 2 * a:, 2 * c:]
        child = F.pad(child, (0, 2 * c, 0, 2 * a, 0, c * d, 0, a * d))
        total = child if total is None else total + child
    n_children, _ = _counts((gy, gx), d, volume.device)
    parent = (total / n_children.to(total.dtype)).clamp_min(_EPS)
    return parent.pow(exponent.to(parent.dtype)), switches


def spread(parent: torch.Tensor, d: int, switches: torch.Tensor, child_size: tuple[int, int]
           ) -> torch.Tensor:
    """The transpose of :func:`aggregate` (without the rectification): each child's share of
    its parents' scores, on the child level's target grid (B, Gy, Gx, H, W)."""
    b, gy, gx, h, w = parent.shape
    total = None
    for a, c in _children((gy, gx), (h, w), d):
        part = parent[:, :gy - a * d, :gx - c * d, :h - 2 * a, :w - 2 * c]
        part = F.pad(part, (2 * c, 0, 2 * a, 0, c * d, 0, a * d, 0))
        total = part if total is None else total + part
    _, n_parents = _counts((gy, gx), d, parent.device)
    total = (total / n_parents.to(total.dtype)).reshape(b, gy * gx, h * w)
    hh, ww = child_size
    out = total.new_zeros(b, gy * gx, hh * ww)
    out = out.scatter_reduce(2, switches.reshape(b, gy * gx, h * w), total, 'amax', include_self=False)
    return out.reshape(b, gy, gx, hh, ww)


def pyramid(atomic: torch.Tensor, exponent: torch.Tensor, levels: int) -> DeepMatchingOutput:
    """Bottom-up then top-down over an atomic volume (B, Gy, Gx, Ht, Wt)."""
    bottom = [atomic]
    switches = []
    for level in range(1, levels + 1):
        if min(bottom[-1].shape[-2:]) < 2:
            break
        parent, sw = aggregate(bottom[-1], 2 ** (level - 1), exponent)
        bottom.append(parent)
        switches.append(sw)
    top = bottom[-1]
    in_place = not torch.is_grad_enabled()
    for level in range(len(bottom) - 1, 0, -1):
        child = bottom[level - 1]
        down = spread(top, 2 ** (level - 1), switches[level - 1], tuple(child.shape[-2:]))
        if in_place and level - 1 > 0:
            top = child.add_(down)      # the level's own scores are not needed again
        elif in_place:
            top = down.add_(child)      # keep the atomic correlation for callers
        else:
            top = child + down
    return DeepMatchingOutput(top, bottom, len(bottom) - 1)


class DeepMatchingNet(nn.Module):
    """Descriptor + correlation pyramid; ``forward(source, target)`` in [0, 1] RGB."""

    def __init__(self, config: DeepMatchingConfig | None = None) -> None:
        super().__init__()
        self.config = config or DeepMatchingConfig()
        c = self.config
        if c.descriptor == 'backbone':
            self.backbone = VGGBackbone(VGGConfig(width=c.width, batch_norm=c.batch_norm))
            self.hog = None
        else:
            self.backbone = None
            self.hog = HogDescriptor(stride=STRIDES[c.level])
        self.exponent = nn.Parameter(torch.tensor(float(c.exponent)), requires_grad=c.learn_exponent)

    @property
    def stride(self) -> int:
        return STRIDES[self.config.level]

    def describe(self, image: torch.Tensor) -> torch.Tensor:
        """Per-pixel descriptors, L2-normalised (so the atomic scores are mean cosines)."""
        if self.hog is not None:
            return self.hog(image)
        feats = self.backbone(image, levels=(self.config.level,))[self.config.level]
        return F.normalize(feats.float(), dim=1)

    def rectifier(self) -> torch.Tensor:
        # Below 1 the rectification would favour disagreeing children; far above, it zeroes
        # everything but the best: both stall training.
        return self.exponent.clamp(1.0, 3.0)

    def forward(self, source: torch.Tensor, target: torch.Tensor, levels: int | None = None
                ) -> DeepMatchingOutput:
        fs, ft = self.describe(source), self.describe(target)
        return self.match_descriptors(fs, ft, levels)

    def match_descriptors(self, fs: torch.Tensor, ft: torch.Tensor, levels: int | None = None
                          ) -> DeepMatchingOutput:
        hs, ws = fs.shape[-2:]
        if min(hs, ws) < ATOMIC:
            raise ValueError(f'descriptor map {ws}x{hs} is smaller than one atomic patch')
        grid = (hs // ATOMIC, ws // ATOMIC)
        n = auto_levels(grid, tuple(ft.shape[-2:]), self.config.levels if levels is None else levels)
        atomic = atomic_correlation(fs, ft)
        return pyramid(atomic, self.rectifier(), n)


def patch_centres(grid: tuple[int, int], stride: int) -> torch.Tensor:
    """(Gy*Gx, 2) x, y pixel centres of the atomic patches (descriptor pixel u covers image
    pixels [u s, (u+1) s))."""
    gy, gx = grid
    ys, xs = torch.meshgrid(torch.arange(gy), torch.arange(gx), indexing='ij')
    c = torch.stack([xs, ys], -1).reshape(-1, 2).float() * ATOMIC + ATOMIC / 2.0
    return c * stride - 0.5


@dataclasses.dataclass
class Matches:
    source: torch.Tensor
    """(P, 2) x, y pixel centres of the atomic patches (working image pixels)."""
    target: torch.Tensor
    """(P, 2) their best target positions (sub-cell, working pixels)."""
    score: torch.Tensor
    """(P,) the best atomic score divided by the levels summed into it: in [0, 1]."""
    reciprocal: torch.Tensor
    """(P,) bool: the target position's best source patch is this one (or a neighbour)."""


@torch.no_grad()
def best_matches(scores: torch.Tensor, atomic: torch.Tensor, levels: int, stride: int) -> Matches:
    """Each atomic patch's best target position and whether the match is reciprocal, for one
    pair: ``scores`` the top-down volume (Gy, Gx, Ht, Wt), ``atomic`` the correlation.

    The top-down argmax picks the basin; the atomic correlation places the match inside it
    (the best atomic cell among the argmax's 3x3 neighbours, then a parabola through its
    neighbours): the coarse levels' cells straddle the fine ones, so the votes they route
    down land as often on a neighbour of the true cell as on it (measured with the HOG
    descriptor on a shifted texture: half the patches one cell off without this step, none
    with it).
    """
    gy, gx, ht, wt = scores.shape
    flat = scores.reshape(gy * gx, ht * wt)
    best, idx = flat.max(1)
    qy, qx = (idx // wt), (idx % wt)
    fine = atomic.reshape(gy * gx, ht * wt)

    def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        inside = (y >= 0) & (y < ht) & (x >= 0) & (x < wt)
        v = fine.gather(1, (y.clamp(0, ht - 1) * wt + x.clamp(0, wt - 1))[:, None])[:, 0]
        return torch.where(inside, v.float(), torch.full_like(v, -1.0, dtype=torch.float32))

    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    near = torch.stack([at(qy + dy, qx + dx) for dy, dx in steps], 1)
    pick = near.argmax(1)
    offsets = torch.tensor(steps, device=scores.device)[pick]
    qy, qx = qy + offsets[:, 0], qx + offsets[:, 1]
    peak = near.max(1).values

    def vertex(minus: torch.Tensor, plus: torch.Tensor) -> torch.Tensor:
        minus = torch.where(minus < 0, peak, minus)
        plus = torch.where(plus < 0, peak, plus)
        curve = minus - 2 * peak + plus
        off = torch.where(curve < -1e-12, 0.5 * (minus - plus) / curve.clamp(max=-1e-12),
                          torch.zeros_like(peak))
        return off.clamp(-0.5, 0.5)

    ox = vertex(at(qy, qx - 1), at(qy, qx + 1))
    oy = vertex(at(qy - 1, qx), at(qy + 1, qx))
    back = flat[:, qy * wt + qx].argmax(0)      # best source patch of each chosen cell
    p = torch.arange(gy * gx, device=scores.device)
    reciprocal = ((back // gx - p // gx).abs() <= 1) & ((back % gx - p % gx).abs() <= 1)
    source = patch_centres((gy, gx), stride).to(scores.device)
    target = torch.stack([qx.float() + ox, qy.float() + oy], -1) + ATOMIC / 2.0
    target = target * stride - 0.5
    score = (best.float() / float(levels + 1)).clamp(0.0, 1.0)
    return Matches(source, target, torch.nan_to_num(score), reciprocal)
