"""The matching network of DMP (Hong and Kim, "Deep Matching Prior", ICCV 2021, Sec. 3.3).

DMP optimises a matching network on each pair (:mod:`core.methods.dmp_optim`), so the
network is built to be *optimised*: a frozen trunk whose features are computed once per
pair, and small trainable parts that start as the identity, so that iteration 0 is the
plain correlation matcher and every later iteration is a correction of it.

Data path (sizes for a 240x240 working image; every level scales with the input):

1. the project's VGG trunk (:mod:`.backbone`, frozen) gives pool4 (15 px), conv4 (30),
   conv3 (60) and conv2 (120) features of both images;
2. per level, a residual *adaptation* layer ``f + g(f)`` whose last convolution starts at
   zero (identity at start): the only place where the optimisation may change the features;
3. at 15 px, a global correlation of the L2-normalised adapted features, a softmax over the
   target cells and its soft-argmax: the flow of every source cell;
4. below, the previous flow upsampled, the target features warped by it, a local correlation
   of radius ``radius`` cells, and the soft-argmax of its softmax added as an offset;
5. per level, a residual module (three convolutions, the last starting at zero) adds a flow
   correction from the correlation and the current flow;
6. the finest (120 px) flow is upsampled bilinearly to the working grid; the confidence is the
   softmax probability of the matched (most probable) position of the finest correlation, or
   (``confidence='mass'``, the default) the probability within one cell of it.

Flows are in pixels of the working image at every level (a level's cells are ``stride``
pixels apart). Under bf16 autocast only the convolutions run in bf16: correlations,
softmaxes and positions stay fp32 (bf16 keeps 8 significant bits, about a pixel at 240 px). The coarse level may run on images of another size than the finer
ones (``coarse_scale``): the paper's adaptive resolution, coarse at the trained size.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dense_match_ros.core.networks.backbone import STRIDES, VGGBackbone, VGGConfig, level_channels
from dense_match_ros.core.networks.correlation import global_correlation, local_correlation

LEVELS = ('pool4', 'conv4', 'conv3', 'conv2')
"""Coarse to fine: 15, 30, 60 and 120 px cells for a 240 px input (the paper's pyramid)."""


@dataclasses.dataclass
class DmpConfig:
    """Architecture of :class:`DmpNet` (stored in checkpoints; plain types only)."""

    width: float = 0.25
    """Trunk channel multiplier (0.25: the CPU width of every shipped trunk)."""
    batch_norm: bool = True
    input_size: tuple[int, int] = (240, 240)
    """(H, W) of the coarse level's input; sets the global correlation's size (input / 16)."""
    finest: str = 'conv2'
    """The finest level of the pyramid: 'conv2' (120 px at 240, the paper) or 'conv3' (60 px:
    a third of the time per iteration on the CPU, where the per-pair loop must stay short)."""
    radius: int = 4
    """Local correlation radius below the coarsest level, in cells ((2r+1)^2 candidates)."""
    hidden: int = 32
    """Channels of each residual module."""
    adapt_kernel: int = 1
    """Kernel of the adaptation layers' first convolution. 1: a per-pixel re-projection of the
    trunk's features; 3 also mixes neighbours but makes the adaptation convolutions most of an
    iteration's time on the CPU (both images, every level, every iteration)."""
    temperature: float = 0.05
    """Initial softmax temperature of the correlations (features are L2-normalised, so scores
    are cosines); each level learns its own from there."""
    confidence: str = 'mass'
    """What the finest level's softmax says of its match: 'peak', the probability of the most
    probable candidate, or 'mass', the probability within one cell of it (the 3x3 candidates
    around it). A match between two cells splits its probability over both, so 'peak' halves
    the confidence of a good sub-cell match: on 20 held-out synthetic pairs the matchability
    Jaccard was 0.451 with 'peak' and 0.861 with 'mass' at the same flow. Not trained: a
    checkpoint of either serves both."""


class DmpOutput(NamedTuple):
    flows: list[torch.Tensor]
    """(B, 2, h, w) per level (:attr:`DmpNet.levels`), coarse to fine, in working-image pixels."""
    flow: torch.Tensor
    """(B, 2, H, W) the final flow on the working grid, pixels."""
    confidence: torch.Tensor
    """(B, 1, H, W) probability of the matched position at the finest level, in [0, 1]."""
    adapted: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per level whose features came from the working images (every level but a pool4 taken
    from ``coarse``): (source, L2-normalised fp32; target, raw) adapted features, so the
    test-time loss reuses them instead of running the adaptation layers a second time."""


class Adaptation(nn.Module):
    """``f + conv1x1(relu(convKxK(f)))``, the last convolution zero: the identity at start."""

    def __init__(self, channels: int, kernel: int = 1) -> None:
        super().__init__()
        self.inner = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
        self.outer = nn.Conv2d(channels, channels, 1)
        nn.init.kaiming_normal_(self.inner.weight, mode='fan_out', nonlinearity='relu')
        nn.init.zeros_(self.inner.bias)
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.outer(F.relu(self.inner(features)))


class ResidualFlow(nn.Module):
    """Three 3x3 convolutions from (correlation, flow in cells) to a flow correction in cells;
    the last one zero, so the soft-argmax flow passes unchanged at start."""

    def __init__(self, in_ch: int, hidden: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.1, inplace=True))
        self.head = nn.Conv2d(hidden, 2, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, correlation: torch.Tensor, flow_cells: torch.Tensor) -> torch.Tensor:
        x = torch.cat([correlation, flow_cells.to(correlation.dtype)], dim=1)
        return self.head(self.blocks(x)).float()


def cell_centres(h: int, w: int, stride: float | tuple[float, float], device) -> torch.Tensor:
    """(2, h, w) pixel positions (x, y) of the centres of an h x w grid of cells ``stride``
    pixels apart (a cell covers [i*s, (i+1)*s), so its centre is i*s + (s-1)/2)."""
    sx, sy = (stride, stride) if isinstance(stride, (int, float)) else stride
    ys = torch.arange(h, device=device, dtype=torch.float32) * sy + (sy - 1) / 2
    xs = torch.arange(w, device=device, dtype=torch.float32) * sx + (sx - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing='ij')
    return torch.stack((gx, gy))


def sample_at(features: torch.Tensor, positions: torch.Tensor, size: tuple[int, int],
              padding: str = 'zeros') -> torch.Tensor:
    """``features`` of an image of ``size`` (H, W) pixels sampled at pixel ``positions``
    (B, 2, h, w), bilinear, zeros outside (``padding``: any of ``grid_sample``'s modes); fp32
    sampling grid."""
    h, w = size
    gx = 2.0 * (positions[:, 0] + 0.5) / w - 1.0
    gy = 2.0 * (positions[:, 1] + 0.5) / h - 1.0
    grid = torch.stack((gx, gy), -1)
    out = F.grid_sample(features.float(), grid, mode='bilinear', padding_mode=padding,
                        align_corners=False)
    return out.to(features.dtype)


def offsets(radius: int, device) -> torch.Tensor:
    """(K, 2) cell offsets (dx, dy) of :func:`local_correlation`'s channels."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    dy, dx = torch.meshgrid(r, r, indexing='ij')
    return torch.stack((dx.flatten(), dy.flatten()), -1)


CONFIDENCES = ('peak', 'mass')


def check_confidence(confidence: str) -> None:
    """Refuse a :attr:`DmpConfig.confidence` other than those of :data:`CONFIDENCES`, by name."""
    if confidence not in CONFIDENCES:
        raise ValueError(f'confidence must be one of {CONFIDENCES}, got {confidence!r}')


def unit(features: torch.Tensor) -> torch.Tensor:
    """``features`` (B, C, h, w) L2-normalised over channels, float32 (``F.normalize``'s
    values). Written out because ``F.normalize``'s channel reduction takes a slow path on
    the CPU: a 64x60x60 map measured 3.7 ms forward and backward against 1.7 ms for this,
    and the per-pair optimisation normalises several such maps per iteration."""
    x = features.float().contiguous()
    return x * torch.rsqrt(x.square().sum(1, keepdim=True).clamp_min(1e-24))


def soft_argmax(scores: torch.Tensor, positions: torch.Tensor, scale: torch.Tensor,
                grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected position (B, 2, h, w), confidence (B, 1, h, w)) of a softmax over the
    candidates (channel axis of ``scores`` (B, K, h, w)) at ``positions`` (K, 2), fp32.

    The confidence is the probability of the most probable candidate; with ``grid``, the
    (rows, columns) the K candidates form (row-major), the probability of it and of its
    neighbours on that grid (3x3 candidates; fewer at the grid's edge)."""
    prob = (scores.float() * scale).softmax(1)
    expected = torch.einsum('bkhw,kc->bchw', prob, positions)
    if grid is None:
        return expected, prob.amax(1, keepdim=True)
    b, k, h, w = prob.shape
    if grid[0] * grid[1] != k:
        raise ValueError(f'a grid of {grid} candidates for {k} scores')
    on_grid = prob.permute(0, 2, 3, 1).reshape(b * h * w, 1, *grid)
    near = F.avg_pool2d(on_grid, 3, stride=1, padding=1, count_include_pad=True) * 9.0
    near = near.reshape(b, h, w, k).permute(0, 3, 1, 2)
    return expected, near.gather(1, prob.argmax(1, keepdim=True)).clamp(0.0, 1.0)


class DmpNet(nn.Module):
    """Frozen trunk + identity-initialised adaptation and residual flow modules."""

    def __init__(self, config: DmpConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or DmpConfig()
        h, w = c.input_size
        if h < 32 or w < 32 or h % 16 or w % 16:
            raise ValueError(f'input_size must be multiples of 16, at least 32, got {c.input_size}')
        if c.finest not in LEVELS[1:]:
            raise ValueError(f'finest must be one of {LEVELS[1:]}, got {c.finest!r}')
        self.levels = LEVELS[:LEVELS.index(c.finest) + 1]
        if c.radius < 1:
            raise ValueError(f'radius must be >= 1 cell, got {c.radius}')
        if c.adapt_kernel not in (1, 3):
            raise ValueError(f'adapt_kernel must be 1 or 3, got {c.adapt_kernel}')
        if not c.temperature > 0:
            raise ValueError(f'temperature must be > 0, got {c.temperature}')
        check_confidence(c.confidence)
        self.coarse_cells = (h // 16, w // 16)
        self.trunk = VGGBackbone(VGGConfig(width=c.width, batch_norm=c.batch_norm))
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        feat = level_channels(c.width)
        self.adapt = nn.ModuleDict({lv: Adaptation(feat[lv], c.adapt_kernel) for lv in self.levels})
        k = (2 * c.radius + 1) ** 2
        self.residual = nn.ModuleDict(
            {lv: ResidualFlow((self.coarse_cells[0] * self.coarse_cells[1] if lv == LEVELS[0] else k) + 2,
                              c.hidden) for lv in self.levels})
        # log of 1/temperature per level: sharpness is what pre-training tunes first.
        self.log_scale = nn.Parameter(torch.full((len(self.levels),), float(-torch.log(torch.tensor(c.temperature)))))

    def train(self, mode: bool = True) -> 'DmpNet':
        super().train(mode)
        self.trunk.eval()  # frozen means frozen BatchNorm statistics too
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What pre-training and the per-pair optimisation change (never the trunk)."""
        return [p for n, p in self.named_parameters() if not n.startswith('trunk.')]

    @torch.no_grad()
    def trunk_features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Trunk features (no gradient) of ``image`` (B, 3, H, W) in [0, 1] at every level."""
        return self.trunk(image, levels=self.levels)

    def adapted(self, features: dict[str, torch.Tensor], level: str) -> torch.Tensor:
        """L2-normalised adapted features of one level, fp32 (the convolutions may run in bf16;
        the correlations may not: scores of 8 significant bits times a softmax scale of 20-50
        move the soft-argmax by tenths of a cell)."""
        return unit(self.adapt[level](features[level]))

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> DmpOutput:
        """Both images (B, 3, H, W) in [0, 1], the same size (a multiple of 16): the coarse
        level at that size if it is ``input_size``, else on both resized to it."""
        src, tgt = self.trunk_features(source), self.trunk_features(target)
        return self.decode(src, tgt, tuple(source.shape[-2:]), self.coarse_features(source, target))

    @torch.no_grad()
    def coarse_features(self, source: torch.Tensor, target: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """pool4 features of both images resized to ``input_size`` (the coarse level's grid),
        or None when the images already have that size (their own pool4 serves)."""
        if tuple(source.shape[-2:]) == tuple(self.config.input_size):
            return None
        small = F.interpolate(torch.cat((source, target)), size=self.config.input_size,
                              mode='bilinear', align_corners=False, antialias=True)
        pool = self.trunk(small, levels=('pool4',))['pool4']
        return pool[:source.shape[0]], pool[source.shape[0]:]

    def use_confidence(self, confidence: str) -> None:
        """Switch what the confidence measures (not trained, so any checkpoint serves)."""
        check_confidence(confidence)
        self.config = dataclasses.replace(self.config, confidence=confidence)

    def decode(self, src: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor],
               size: tuple[int, int], coarse: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> DmpOutput:
        """Flows from precomputed trunk features (the per-pair optimisation calls this each
        iteration). ``size``: the working image's (H, W); ``coarse``: pool4 features of both
        images at ``input_size`` when the working size differs from it."""
        h, w = size
        scales = self.log_scale.float().exp()
        # Coarsest level: global correlation, soft-argmax over every target cell.
        cs, ct = (src['pool4'], tgt['pool4']) if coarse is None else coarse
        ch, cw = cs.shape[-2:]
        stride = (w / cw, h / ch) if coarse is not None else (STRIDES['pool4'],) * 2
        s0 = unit(self.adapt['pool4'](cs))
        t_feat = self.adapt['pool4'](ct)
        t0 = unit(t_feat)
        adapted = {} if coarse is not None else {'pool4': (s0, t_feat)}
        with torch.autocast(s0.device.type, enabled=False):
            corr = global_correlation(s0, t0)
        th, tw = ct.shape[-2:]
        targets = cell_centres(th, tw, stride, cs.device).flatten(1).t()          # (K, 2)
        # Only the finest level's confidence is returned, so only it pays for the mass (the
        # coarsest never is the finest: ``finest`` is conv4 or below).
        matched, _ = soft_argmax(corr, targets, scales[0])
        origin = cell_centres(ch, cw, stride, cs.device)[None]
        cell = torch.tensor(stride, device=cs.device, dtype=torch.float32).view(1, 2, 1, 1)
        flow = matched - origin
        flow = flow + self.residual['pool4'](corr, flow / cell) * cell
        flows = [flow]
        for i, level in enumerate(self.levels[1:], start=1):
            s = STRIDES[level]
            lh, lw = src[level].shape[-2:]
            up = F.interpolate(flow, size=(lh, lw), mode='bilinear', align_corners=False)
            origin = cell_centres(lh, lw, s, up.device)[None]
            t_feat = self.adapt[level](tgt[level])
            warped = sample_at(t_feat, origin + up, (h, w))
            adapted[level] = (self.adapted(src, level), t_feat)
            corr = local_correlation(adapted[level][0], unit(warped),
                                     self.config.radius)
            side = 2 * self.config.radius + 1
            mass = i == len(self.levels) - 1 and self.config.confidence == 'mass'
            offset, confidence = soft_argmax(corr, offsets(self.config.radius, up.device) * s,
                                             scales[i], (side, side) if mass else None)
            flow = up + offset
            flow = flow + self.residual[level](corr, flow / s) * s
            flows.append(flow)
        final = F.interpolate(flow, size=(h, w), mode='bilinear', align_corners=False)
        confidence = F.interpolate(confidence, size=(h, w), mode='bilinear', align_corners=False)
        return DmpOutput(flows, final, confidence.clamp(0.0, 1.0), adapted)


def config_from_dict(values: dict) -> DmpConfig:
    """Rebuild a config from a checkpoint's dict, ignoring keys it does not know."""
    names = {f.name for f in dataclasses.fields(DmpConfig)}
    kwargs = {k: v for k, v in values.items() if k in names}
    if 'input_size' in kwargs:
        kwargs['input_size'] = tuple(int(v) for v in kwargs['input_size'])
    return DmpConfig(**kwargs)
