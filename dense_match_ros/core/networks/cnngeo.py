"""CNNGeo (Rocco et al., CVPR 2017): a global correlation regressed to a geometric transform.

Structure (for the paper's 240x240 input):

1. features: the project's VGG trunk (:mod:`.backbone`) cut at pool4 (240 -> 15 px),
   L2-normalised per position, one trunk for both images and both stages;
2. matching: every source position against every target position (225 channels on the
   source grid, :func:`.correlation.global_correlation`), then ReLU and L2 normalisation over
   the channels (``normalize_matches=False`` leaves them raw: the paper's ablation);
3. regression (paper Fig. 4): two *unpadded* stride-1 conv-BN-ReLU blocks (7x7 -> 128,
   5x5 -> 64 channels: 15 -> 9 -> 5 px) and a fully connected layer to 6 (affine) or 18
   (TPS) parameters, initialised to output the identity exactly (zero weights, identity
   bias), so an untrained stage passes its input on instead of warping it at random;
4. hierarchy (paper Sec. 3.4): the affine stage's transform renders the target on the
   source grid (the *target* is the image that gets warped), the TPS stage regresses on
   (source, aligned target), and the result is their composition, one TPS
   (:func:`core.geometry.parametric.compose_affine_tps_torch`);
5. the paper's affine ensemble (Sec. 5.1, Table 1): ``affine_members`` > 1 regressors read
   the same correlation and their parameters are averaged. The members are trained apart
   (``dense-match-train cnngeo-affine`` on different transform ranges) and joined by
   ``python -m dense_match_ros.training.cnngeo_task ensemble``; joining costs one more
   regressor pass, since the trunk and the correlation are shared.

Direction: every transform maps source points to target points (:mod:`core.geometry.transforms`):
``grid_sample(target, T)`` renders the source, and ``T(x) - x`` is the flow. No inversion
anywhere, which is why the target, not the source, is warped between the stages.

Precision: the trunk and the regression convolutions may run under bf16 autocast; the
correlation and the final linear layer run in float32, since bf16 (8 bits of mantissa)
would resolve a parameter only to ~0.4 % -- half a pixel at 240 px.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dense_match_ros.core.geometry import parametric, transforms as tf
from dense_match_ros.core.networks.backbone import VGGBackbone, VGGConfig
from dense_match_ros.core.networks.correlation import global_correlation, normalize_correlation
from dense_match_ros.core.networks.folding import fold_sequential

STAGES = ('affine', 'tps')


@dataclasses.dataclass
class CnnGeoConfig:
    """Architecture of :class:`CnnGeoNet` (stored in checkpoints; plain types only)."""

    width: float = 1.0
    """Trunk channel multiplier (1.0: VGG-16's; 0.25 on a CPU)."""
    batch_norm: bool = True
    """BatchNorm in the trunk (as the project's trunks are trained)."""
    input_size: tuple[int, int] = (240, 240)
    """(H, W) both images are resized to; the correlation is input / 16 a side."""
    normalize_matches: bool = True
    """ReLU + L2 normalisation of the correlation over its channels (off: ablation)."""
    tps: bool = True
    """Build the TPS stage (False: the affine stage alone, as ``cnngeo-affine`` trains it)."""
    channels: tuple[int, int] = (128, 64)
    """Output channels of the two regression blocks (the paper's)."""
    kernel_sizes: tuple[int, int] = (7, 5)
    """Kernels of the two unpadded regression blocks (the paper's; tests use smaller)."""
    affine_members: int = 1
    """Affine regressors whose parameters are averaged (the paper's ensemble: 2)."""


class CnnGeoOutput(NamedTuple):
    affine: torch.Tensor
    """(B, 6) float32: the affine stage, source -> target, CNNGeo's layout."""
    tps: torch.Tensor | None
    """(B, 18) float32: the TPS stage, source -> affine-aligned target (None: no TPS stage)."""
    composed: torch.Tensor | None
    """(B, 18) float32: ``affine(tps(x))``, source -> target (None: no TPS stage)."""
    features: tuple[torch.Tensor, torch.Tensor] | None = None
    """(source, target) pool4 features, (B, C, h, w) float32 L2-normalised, when the forward
    was asked for them (training's matching loss), else None."""
    levels: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    """(source, target) raw features of the shallower trunk levels the forward was asked for
    (``feature_levels``; training's matching loss on them), else None."""


class Regressor(nn.Module):
    """Two unpadded conv-BN-ReLU blocks and a linear layer that starts at ``identity``."""

    def __init__(self, in_channels: int, corr_size: tuple[int, int], channels: Sequence[int],
                 kernel_sizes: Sequence[int], identity: Sequence[float]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        h, w = corr_size
        for out_ch, k in zip(channels, kernel_sizes):
            layers += [nn.Conv2d(in_channels, out_ch, k, padding=0, bias=False),
                       nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            in_channels, h, w = out_ch, h - k + 1, w - k + 1
        if h < 1 or w < 1:
            raise ValueError(f'a {corr_size[0]}x{corr_size[1]} correlation is too small for '
                             f'unpadded kernels {tuple(kernel_sizes)}: make input_size larger '
                             f'(at least 16 x (1 + sum(kernel - 1)) px a side)')
        self.convs = nn.Sequential(*layers)
        self.linear = nn.Linear(in_channels * h * w, len(identity))
        for m in self.convs:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        nn.init.zeros_(self.linear.weight)
        with torch.no_grad():
            self.linear.bias.copy_(torch.as_tensor(identity, dtype=torch.float32))

    def forward(self, correlation: torch.Tensor) -> torch.Tensor:
        x = self.convs(correlation).flatten(1)
        with torch.autocast(x.device.type, enabled=False):
            return self.linear(x.float())


class CnnGeoNet(nn.Module):
    """Affine, or affine then TPS, parameters of the transform taking source to target."""

    fixed_input = True
    """The regressors' first layers are sized for the correlation at ``input_size``, so the
    network runs at that size only (the matcher resizes); timing tools read this."""

    def __init__(self, config: CnnGeoConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or CnnGeoConfig()
        h, w = c.input_size
        if h < 16 or w < 16 or h % 16 or w % 16:
            raise ValueError(f'input_size must be multiples of 16, got {tuple(c.input_size)}')
        if len(c.channels) != len(c.kernel_sizes):
            raise ValueError('channels and kernel_sizes need one entry per regression block')
        self.corr_size = (h // 16, w // 16)
        self.backbone = VGGBackbone(VGGConfig(width=c.width, batch_norm=c.batch_norm))
        corr_channels = self.corr_size[0] * self.corr_size[1]
        if int(c.affine_members) < 1:
            raise ValueError(f'affine_members must be >= 1, got {c.affine_members}')
        self.affine = Regressor(corr_channels, self.corr_size, c.channels, c.kernel_sizes,
                                tf.AFFINE_IDENTITY.tolist())
        # The ensemble's further members (none by default, so single-net checkpoints keep
        # their keys); ``affine`` is member 0.
        self.affine_others = nn.ModuleList(
            Regressor(corr_channels, self.corr_size, c.channels, c.kernel_sizes,
                      tf.AFFINE_IDENTITY.tolist()) for _ in range(int(c.affine_members) - 1))
        self.tps = (Regressor(corr_channels, self.corr_size, c.channels, c.kernel_sizes,
                              tf.tps_identity().tolist()) if c.tps else None)
        self.frozen: set[str] = set()
        self.folded = False

    # ------------------------------------------------------------------ freezing

    def freeze(self, parts: Sequence[str]) -> None:
        """Stop training ``parts`` ('backbone', 'affine', 'tps'): weights and BN statistics.
        'affine' is the whole affine stage, every member of an ensemble."""
        for part in parts:
            module = getattr(self, part, None)
            if module is None:
                raise ValueError(f'no part {part!r} to freeze in this network')
            names = [part, 'affine_others'] if part == 'affine' else [part]
            for name in names:
                for p in getattr(self, name).parameters():
                    p.requires_grad_(False)
                self.frozen.add(name)
        self.train(self.training)

    def train(self, mode: bool = True) -> 'CnnGeoNet':
        if mode and self.folded:
            raise RuntimeError('this network has its BatchNorm folded (inference only)')
        super().train(mode)
        for part in self.frozen:
            getattr(self, part).eval()  # frozen means frozen BatchNorm statistics too
        return self

    def fold_batch_norm(self) -> 'CnnGeoNet':
        """Fold every BatchNorm into the convolution before it, for inference only.

        In eval mode a BatchNorm is a per-channel affine map, so it merges into the
        convolution's weights and bias exactly (up to rounding); on a CPU the separate
        normalisation pass costs about a fifth of the trunk's time. A folded network
        cannot be trained any more (it has no statistics left), so :meth:`train` refuses it.
        """
        self.eval()
        regressors = [self.affine, *self.affine_others] + ([self.tps] if self.tps else [])
        for module in [*self.backbone.blocks, *(r.convs for r in regressors)]:
            fold_sequential(module)
        self.folded = True
        return self

    # ------------------------------------------------------------------ pieces

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """pool4 features of RGB (B, 3, H, W) in [0, 1], L2-normalised per position (float32)."""
        return self._trunk(images)[0]

    def _trunk(self, images: torch.Tensor, extra: tuple[str, ...] = ()
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(normalised pool4 features, raw features of the ``extra`` levels) from one pass."""
        out = self.backbone(images, levels=('pool4', *extra))
        return F.normalize(out['pool4'].float(), dim=1), {k: out[k] for k in extra}

    def correlation(self, source_feat: torch.Tensor, target_feat: torch.Tensor) -> torch.Tensor:
        """(B, Ht*Wt, Hs, Ws) float32 matches, normalised over channels unless switched off."""
        with torch.autocast(source_feat.device.type, enabled=False):  # bmm would go bf16
            corr = global_correlation(source_feat.float(), target_feat.float())
            return normalize_correlation(corr) if self.config.normalize_matches else corr

    def _check(self, images: torch.Tensor, what: str) -> None:
        if tuple(images.shape[-2:]) != tuple(self.config.input_size):
            raise ValueError(f'{what} is {tuple(images.shape[-2:])}, the network runs at '
                             f'input_size {tuple(self.config.input_size)} (resize first)')

    def regress(self, source: torch.Tensor, target: torch.Tensor, source_feat: torch.Tensor,
                target_feat: torch.Tensor, stages: str = 'tps', tps_passes: int = 1,
                affine_passes: int = 1, later_rows: int | None = None,
                all_rows_passes: int | None = None) -> CnnGeoOutput:
        """Both stages from images and their already computed features (the matcher
        computes each image's features once for both directions).

        ``tps_passes`` > 1 runs the TPS stage again on the target aligned by the composed
        transform so far, and composes (:func:`parametric.compose_tps_tps_torch`): the
        stage then corrects what is left, a smaller warp than training's, where a regressor
        is more precise (the paper's hierarchy, one more level at test time).
        ``affine_passes`` > 1 does the same for the affine stage, whose passes compose exactly
        (:func:`parametric.compose_affine_affine_torch`). TPS passes after the first
        ``all_rows_passes`` run on the first ``later_rows`` rows only (:meth:`two_way`: the
        forward transforms; the backward ones serve only the round trip)."""
        affine = self.affine_stage(self.correlation(source_feat, target_feat))
        size = (source.shape[-1], source.shape[-2])
        for _ in range(int(affine_passes) - 1):
            aligned = self._aligned(target, 'affine', affine, size)
            step = self.affine_stage(self.correlation(source_feat, self.features(aligned)))
            affine = parametric.compose_affine_affine_torch(affine, step)
        if stages == 'affine' or self.tps is None:
            return CnnGeoOutput(affine, None, None)
        # The target rendered on the source grid by the affine: the TPS stage sees a pair
        # that differs only by what the affine could not model. The warp is not trained
        # through (the affine stage is trained on its own loss).
        tps = self._tps_on_aligned(source_feat, target, 'affine', affine, size)
        composed = parametric.compose_affine_tps_torch(affine, tps)
        for index in range(2, int(tps_passes) + 1):
            k = len(composed)
            if later_rows is not None and all_rows_passes is not None and index > all_rows_passes:
                k = int(later_rows)
            step = self._tps_on_aligned(source_feat[:k], target[:k], 'tps', composed[:k], size)
            composed = torch.cat([parametric.compose_tps_tps_torch(composed[:k], step),
                                  composed[k:]])
        return CnnGeoOutput(affine, tps, composed)

    def affine_stage(self, correlation: torch.Tensor) -> torch.Tensor:
        """(B, 6) the affine parameters: one regressor's, or the mean of the ensemble's."""
        theta = self.affine(correlation)
        if not len(self.affine_others):
            return theta
        return torch.stack([theta, *(m(correlation) for m in self.affine_others)]).mean(0)

    def _tps_on_aligned(self, source_feat: torch.Tensor, target: torch.Tensor, kind: str,
                        theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The TPS stage on the target aligned by the transform so far (:meth:`_aligned`)."""
        aligned = self._aligned(target, kind, theta, size)
        return self.tps(self.correlation(source_feat, self.features(aligned)))

    @staticmethod
    def _aligned(target: torch.Tensor, kind: str, theta: torch.Tensor, size: tuple[int, int]
                 ) -> torch.Tensor:
        """The target rendered on the source grid (``size`` (W, H)) by a transform (zeros
        outside; not trained through)."""
        grid = parametric.dense_map(kind, theta.detach(), size)
        return F.grid_sample(target.float(), grid, mode='bilinear', padding_mode='zeros',
                             align_corners=False).to(target.dtype)

    def forward(self, source: torch.Tensor, target: torch.Tensor, stages: str = 'tps',
                with_features: bool = False, feature_levels: tuple[str, ...] = ()
                ) -> CnnGeoOutput:
        """``source``, ``target``: RGB (B, 3, H, W) in [0, 1] at ``input_size``.
        ``stages='affine'`` stops after the affine stage. ``with_features`` also returns the
        pool4 features and ``feature_levels`` those of shallower trunk levels, so a loss on
        them shares this pass (and a multi-process wrapper, which only synchronises
        gradients through its forward, still sees every use)."""
        if stages not in STAGES:
            raise ValueError(f'stages must be one of {STAGES}, got {stages!r}')
        self._check(source, 'source')
        self._check(target, 'target')
        b = source.shape[0]
        # One pass over both images: a shared BN batch.
        feats, levels = self._trunk(torch.cat([source, target], dim=0), tuple(feature_levels))
        out = self.regress(source, target, feats[:b], feats[b:], stages)
        if with_features:
            out = out._replace(features=(feats[:b], feats[b:]))
        if levels:
            out = out._replace(levels={k: (v[:b], v[b:]) for k, v in levels.items()})
        return out

    def two_way(self, image_a: torch.Tensor, image_b: torch.Tensor, stages: str = 'tps',
                tps_passes: int = 1, affine_passes: int = 1,
                backward_passes: int | None = None) -> CnnGeoOutput:
        """(a -> b, b -> a) as one batch of two: each image's features are computed once.
        ``backward_passes`` (default ``tps_passes``) caps the TPS passes of b -> a, which a
        matcher needs only for the round trip of its matchability."""
        self._check(image_a, 'source')
        self._check(image_b, 'target')
        images = torch.cat([image_a, image_b], dim=0)
        feats = self.features(images)
        n = len(image_a)
        swapped = torch.cat([image_b, image_a], dim=0)
        return self.regress(images, swapped, feats, torch.cat([feats[n:], feats[:n]]), stages,
                            tps_passes, affine_passes, later_rows=n,
                            all_rows_passes=backward_passes)


def config_from_dict(values: dict) -> CnnGeoConfig:
    """Rebuild a config from a checkpoint's dict, ignoring keys it does not know
    (training-only keys such as the trunk's initialisation live beside it)."""
    names = {f.name for f in dataclasses.fields(CnnGeoConfig)}
    kwargs = {k: v for k, v in values.items() if k in names}
    for key in ('input_size', 'channels', 'kernel_sizes'):
        if key in kwargs:
            kwargs[key] = tuple(int(v) for v in kwargs[key])
    return CnnGeoConfig(**kwargs)
