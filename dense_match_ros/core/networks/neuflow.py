"""A light flow network for the CPU, after NeuFlow v2's layout (global matching at 1/16,
shared-weight refinement at 1/8, convex upsampling), scaled down to train on two cores.

Why this layout and not DGC-Net's for the default: DGC-Net sees the pair at one fixed,
square working size, so on wide frames its coarse grid is both stretched and too coarse for
sub-pixel flow; this network runs on the input at its own aspect ratio (padded to a
multiple of 16), matches globally only at 1/16 where it is cheap, and spends its steps on
a local cost volume at 1/8, where precision comes from.

Data path (shapes for an H x W input, both dimensions multiples of 16):

1. one shared encoder, four stride-2 stages -> features at 1/8 (``c8`` channels) and
   1/16 (``c16``);
2. global matching at 1/16: softmax over the target cells within ``+-window`` cells of
   each source cell (a window, not the whole image: an unbounded softmax trained at one
   size drifts towards the image centre at larger test sizes, because the number of
   candidates changes), soft-argmax -> flow at 1/16, upsampled to 1/8;
3. ``iterations`` refinement steps at 1/8 with shared weights: local correlation of radius
   ``radius`` between source features and target features warped by the current flow, a
   motion encoder, a tanh-gated hidden state seeded from the source's context, a head that
   adds a flow update;
4. convex 8x upsampling (a learned 3x3 combination per output pixel, from the hidden state)
   and a matchability logit at 1/8, upsampled bilinearly.

Positions stay in fp32 even under bf16 autocast: bf16 keeps 8 significant bits, which
would round a 1/16 coordinate of 40 cells to a quarter cell.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dense_match_ros.core.networks import correlation
from dense_match_ros.core.networks.folding import fold_sequential


@dataclasses.dataclass
class NeuFlowConfig:
    """Architecture settings (stored in every checkpoint)."""

    width: float = 1.0
    """Channel multiplier of the encoder (1.0: 24/48/64/96 channels)."""
    hidden: int = 64
    """Channels of the refinement hidden state and of the context features."""
    window: int = 8
    """Global matching window at 1/16, in cells each way (8 cells = +-128 px)."""
    radius: int = 3
    """Local correlation radius at 1/8, in cells (a (2r+1)^2 cost volume)."""
    iterations: int = 4
    """Refinement steps at 1/8 (test time may run more or fewer)."""
    temperature: float = 0.1
    """Softmax temperature of the global matching (features are L2-normalised)."""
    corr_channels: int = 64
    """Channels the cost volume is encoded to in a refinement step (1x1 convolution)."""
    flow_channels: int = 32
    """Channels the current flow is encoded to (7x7 convolution)."""
    head_channels: int = 64
    """Channels of the flow-update head's hidden layer."""
    mask_channels: int = 96
    """Channels of the convex-upsampling mask's hidden layer."""
    match_channels: int = 32
    """Channels of the matchability head's hidden layer.

    The five above are the refinement's fixed costs: with a smaller ``hidden`` they decide
    a step's time (a lighter network for the CPU's time budget sets them all lower; the
    defaults are the shipped network's)."""


def config_from_dict(values: dict) -> NeuFlowConfig:
    """Rebuild a config from a checkpoint's dict, ignoring keys it does not know (training-
    only keys such as ``init_weights`` are stored beside the architecture; the training task
    rejects unknown keys before they get here)."""
    names = {f.name for f in dataclasses.fields(NeuFlowConfig)}
    return NeuFlowConfig(**{k: v for k, v in values.items() if k in names})


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """Four stride-2 stages of two conv-BN-ReLU each; returns (1/8, 1/16) features."""

    def __init__(self, width: float) -> None:
        super().__init__()
        chans = [max(8, int(round(c * width))) for c in (24, 48, 64, 96)]
        stages, cin = [], 3
        for c in chans:
            stages.append(nn.Sequential(_conv(cin, c, 2), _conv(c, c)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.channels = chans

    def forward(self, x: torch.Tensor, coarse: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1/8, 1/16) features; ``coarse=False`` skips the 1/16 stage (a pass that starts
        from a given flow needs no global match)."""
        for stage in self.stages[:3]:
            x = stage(x)
        return x, self.stages[3](x) if coarse else None


def coords_grid(b: int, h: int, w: int, device) -> torch.Tensor:
    """(B, 2, H, W) pixel-centre coordinates (x, y) of an H x W grid, fp32."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing='ij')
    return torch.stack((xs, ys))[None].expand(b, -1, -1, -1)


def warp_features(features: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``features`` (target grid) sampled at x + flow(x) of the source grid (zeros outside)."""
    b, _, h, w = flow.shape
    pos = coords_grid(b, h, w, flow.device) + flow.float()
    gx = 2.0 * (pos[:, 0] + 0.5) / features.shape[-1] - 1.0
    gy = 2.0 * (pos[:, 1] + 0.5) / features.shape[-2] - 1.0
    return F.grid_sample(features.float(), torch.stack((gx, gy), -1), mode='bilinear',
                         padding_mode='zeros', align_corners=False)


def windowed_softmax_flow(source: torch.Tensor, target: torch.Tensor, window: int,
                          temperature: float) -> torch.Tensor:
    """Soft-argmax flow (B, 2, H, W), in cells, of a softmax over a +-window neighbourhood.

    The dense (HW x HW) score matrix is cheap at 1/16 (1200 cells for a 480x640 frame); the
    window is a mask on it, so candidates outside it get no probability at all.
    """
    b, c, h, w = source.shape
    src = F.normalize(source.float().flatten(2), dim=1)                 # (B, C, HW)
    tgt = F.normalize(target.float().flatten(2), dim=1)
    scores = torch.bmm(src.transpose(1, 2), tgt) / temperature           # (B, HW_s, HW_t)
    pos = coords_grid(1, h, w, source.device)[0].flatten(1).t()          # (HW, 2)
    far = (pos[:, None, :] - pos[None, :, :]).abs().amax(-1) > window    # (HW_s, HW_t)
    scores = scores.masked_fill(far[None], float('-inf'))
    prob = scores.softmax(-1)
    matched = torch.bmm(prob, pos[None].expand(b, -1, -1))               # (B, HW_s, 2)
    return (matched - pos[None]).transpose(1, 2).reshape(b, 2, h, w)


def local_correlation(source: torch.Tensor, warped: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, (2r+1)^2, H, W) dot products (scaled by 1/sqrt(C)) of each source feature with the
    warped target's features at offsets -r..r (row-major, dy outer); zeros beyond the border.
    The shared :func:`core.networks.correlation.local_correlation` (banded matrix products,
    forward and backward: the per-offset products it replaced, and autograd's backward of
    them, were a third of a training step)."""
    return correlation.local_correlation(source, warped, radius) * source.shape[1] ** -0.5


def pointwise(x: torch.Tensor, conv: nn.Conv2d, channels_last_out: bool = False) -> torch.Tensor:
    """A 1x1 convolution as one matrix product over the channels.

    torch sends a 1x1 convolution on one thread to its generic kernel, which copies a
    channels-last input to planar and back (the upsampling mask's: about 12 ms of a lite
    pass at 256x192 in a one-thread profile on an AVX2 CPU); as a product on the
    channels-last layout it needs no copy.
    ``channels_last_out``: return (B, H, W, C_out) rather than an NCHW view of it."""
    out = F.linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias)
    return out if channels_last_out else out.permute(0, 3, 1, 2)


def run_layers(layers: nn.Sequential, x: torch.Tensor,
               channels_last_out: bool = False) -> torch.Tensor:
    """``layers(x)`` with every 1x1 convolution through :func:`pointwise`;
    ``channels_last_out`` as there, for a stack that ends in one."""
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1):
            x = pointwise(x, layer, channels_last_out and i == last)
        else:
            x = layer(x)
    return x


class Refiner(nn.Module):
    """One refinement step's weights (shared by all steps).

    The gate and the candidate both read (hidden, context, motion); the context is the same
    at every step, so its share of both is computed once per pass (:meth:`context_term`)
    and each step convolves only (hidden, motion), with one product for both: the same sums,
    a third fewer of the step's largest products."""

    def __init__(self, cost_channels: int, hidden: int, config: NeuFlowConfig) -> None:
        super().__init__()
        corr, flow, head = config.corr_channels, config.flow_channels, config.head_channels
        self.hidden = hidden
        self.corr = nn.Sequential(nn.Conv2d(cost_channels, corr, 1), nn.ReLU(inplace=True))
        self.flow = nn.Sequential(nn.Conv2d(2, flow, 7, padding=3), nn.ReLU(inplace=True))
        self.motion = nn.Sequential(nn.Conv2d(corr + flow, hidden - 2, 3, padding=1),
                                    nn.ReLU(inplace=True))
        self.gate = nn.Conv2d(3 * hidden, hidden, 3, padding=1)
        self.cand = nn.Conv2d(3 * hidden, hidden, 3, padding=1)
        self.head = nn.Sequential(nn.Conv2d(hidden, head, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(head, 2, 3, padding=1))
        self._split = None

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate and candidate stacked) weights for (hidden, motion), for the context, and
        their biases, from the parameters (so gradients reach them)."""
        hid = self.hidden
        both = torch.cat((self.gate.weight, self.cand.weight), 0)         # (2h, 3h, 3, 3)
        return (torch.cat((both[:, :hid], both[:, 2 * hid:]), 1), both[:, hid:2 * hid],
                torch.cat((self.gate.bias, self.cand.bias)))

    def _split_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_stacked_weights`, kept between calls at inference. The cache is keyed on
        the parameters' storage and version: loading other weights, or moving them, splits
        them again."""
        if self.training:
            return self._stacked_weights()
        key = tuple((t.data_ptr(), t._version) for t in
                    (self.gate.weight, self.cand.weight, self.gate.bias, self.cand.bias))
        if self._split is None or self._split[0] != key:
            self._split = (key, tuple(t.detach().contiguous(memory_format=torch.channels_last)
                                      if t.dim() == 4 else t.detach()
                                      for t in self._stacked_weights()))
        return self._split[1]

    def context_term(self, context: torch.Tensor) -> torch.Tensor:
        """The context's share of the gate and the candidate, biases included (B, 2h, H, W)."""
        _, weight, bias = self._split_weights()
        return F.conv2d(context, weight, bias, padding=1)

    def forward(self, hidden: torch.Tensor, context_term: torch.Tensor, corr: torch.Tensor,
                flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = flow / 8.0  # cells at 1/8 -> roughly unit range for the encoder
        cost = run_layers(self.corr, corr)
        motion = torch.cat((self.motion(torch.cat((cost, self.flow(scaled)), 1)), scaled), 1)
        weight, _, _ = self._split_weights()
        both = context_term + F.conv2d(torch.cat((hidden, motion.to(hidden.dtype)), 1),
                                       weight, padding=1)
        z = torch.sigmoid(both[:, :self.hidden])
        hidden = (1 - z) * hidden + z * torch.tanh(both[:, self.hidden:])
        return hidden, self.head(hidden)


class NeuFlowOutput(NamedTuple):
    flows: list[torch.Tensor]
    """Full-resolution flows in pixels (B, 2, H, W): in training mode the start (global match
    or given flow) and every step; in eval mode only the last step (the start when there are
    no steps)."""
    matchability: torch.Tensor
    """Logits (B, 1, H, W)."""


class NeuFlowNet(nn.Module):
    """Images (B, 3, H, W) in [0, 1], H and W multiples of 16 -> :class:`NeuFlowOutput`."""

    def __init__(self, config: NeuFlowConfig = NeuFlowConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.width)
        c8 = self.encoder.channels[2]
        hid = config.hidden
        self.context = nn.Sequential(nn.Conv2d(c8, 2 * hid, 3, padding=1))
        self.refiner = Refiner((2 * config.radius + 1) ** 2, hid, config)
        mask, match = config.mask_channels, config.match_channels
        self.upmask = nn.Sequential(nn.Conv2d(hid, mask, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(mask, 64 * 9, 1))
        self.match_head = nn.Sequential(nn.Conv2d(hid, match, 3, padding=1),
                                        nn.ReLU(inplace=True), nn.Conv2d(match, 1, 1))
        self._corr_dtype = None
        self.folded = False
        self.frozen_encoder = False
        self.register_buffer('mean', torch.tensor([0.45, 0.43, 0.40]).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))

    def fold_batch_norm(self) -> 'NeuFlowNet':
        """Fold the encoder's BatchNorms into its convolutions (inference only; see
        :mod:`core.networks.folding`)."""
        self.eval()
        for stage in self.encoder.stages:
            for block in stage:
                fold_sequential(block)
        self.folded = True
        return self

    def freeze_encoder(self, frozen: bool = True) -> 'NeuFlowNet':
        """Stop training the encoder (weights and BatchNorm statistics): a lighter refinement
        trained on the encoder of a network that already matches well learns only its own
        part, and each step skips the encoder's backward pass."""
        self.frozen_encoder = bool(frozen)
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> 'NeuFlowNet':
        if mode and self.folded:
            raise RuntimeError('this network has its BatchNorm folded (inference only)')
        super().train(mode)
        if self.frozen_encoder:
            self.encoder.eval()   # frozen means frozen BatchNorm statistics too
        return self

    def correlation_dtype(self, dtype: torch.dtype | None) -> 'NeuFlowNet':
        """Compute the local correlation in ``dtype`` at inference (bf16 halves its memory
        traffic, the step's largest cost on a CPU; the values need no more precision)."""
        self._corr_dtype = dtype
        return self

    def _upsample(self, flow8: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Convex 8x upsampling of a 1/8 flow (cells) to pixels: each output pixel is a
        softmax-weighted mix of its 3x3 coarse neighbours' flows, the weights from ``hidden``."""
        b, _, h, w = flow8.shape
        # Per coarse cell: softmax weights (9 neighbours x 64 sub-pixels) and the 9 neighbours'
        # flows (zero-padded, dy outer), mixed by one batched product. The mask comes out of
        # its 1x1 layer channels-last, the order the product takes: no layout copy (1.3
        # against 4.7 ms for the nine products and sums it replaced, at 1/8 of 256x192).
        mask = run_layers(self.upmask, hidden, channels_last_out=True)
        weights = mask.float().reshape(b, h, w, 9, 64).softmax(3)
        views = F.unfold(8.0 * flow8.float(), 3, padding=1).view(b, 2, 9, h, w)
        up = torch.matmul(views.permute(0, 3, 4, 1, 2), weights)          # (B, H, W, 2, 64)
        return F.pixel_shuffle(up.reshape(b, h, w, 2 * 64).permute(0, 3, 1, 2), 8)

    def forward(self, source: torch.Tensor, target: torch.Tensor,
                iterations: int | None = None, init_flow: torch.Tensor | None = None,
                two_way: bool = False, backward_iterations: int | None = None) -> NeuFlowOutput:
        """``init_flow`` (B, 2, H/8, W/8), in 1/8 cells, replaces the global match as the
        refinement's start: a second pass at a finer working size continues the flow of a
        coarser one (the refinement steps were trained to correct a start that is a few
        cells off, which an upsampled coarse flow is). ``flows[0]`` is then that start.

        ``two_way``: also target -> source, from the same encoding of each image (the
        encoder is a third of an inference pass); the output batch is then 2B, the forward
        flows first, and ``init_flow`` must hold 2B starts in that order.
        ``backward_iterations`` stops the backward half after that many steps: where it only
        checks the forward flows, its last steps cost as much as theirs and matter less
        (README, "A machine without bf16")."""
        b, _, h, w = source.shape
        if h % 16 or w % 16:
            raise ValueError(f'input must be a multiple of 16 on each side, got {h}x{w}')
        n = 2 * b if two_way else b
        if init_flow is not None and tuple(init_flow.shape) != (n, 2, h // 8, w // 8):
            raise ValueError(f'init_flow must be (B, 2, H/8, W/8) = {(n, 2, h // 8, w // 8)}, '
                             f'got {tuple(init_flow.shape)}')
        x = (torch.cat((source, target), 0) - self.mean) / self.std
        f8, f16 = self.encoder(x, coarse=init_flow is None)
        if two_way:   # sources (s, t), targets (t, s): the same features, rolled by B
            s8, t8 = f8, torch.roll(f8, b, 0)
            s16, t16 = (f16, torch.roll(f16, b, 0)) if f16 is not None else (None, None)
        else:
            s8, t8 = f8[:b], f8[b:]
            s16, t16 = (f16[:b], f16[b:]) if f16 is not None else (None, None)
        if init_flow is None:
            flow16 = windowed_softmax_flow(s16, t16, self.config.window,
                                           self.config.temperature)
            flow = 2.0 * F.interpolate(flow16, scale_factor=2, mode='bilinear',
                                       align_corners=False)
        else:
            flow = init_flow.float()
        steps = self.config.iterations if iterations is None else int(iterations)
        # Training supervises the start and every step at full resolution; inference needs
        # only the last step upsampled (the convex upsampling is a third of a step's cost).
        every_step = self.training
        flows = []
        if every_step or steps == 0:
            flows.append(8.0 * F.interpolate(flow, scale_factor=8, mode='bilinear',
                                             align_corners=False))
        hidden, context = torch.split(self.context(s8), self.config.hidden, 1)
        hidden = torch.tanh(hidden)
        context = self.refiner.context_term(torch.relu(context))
        src_n = F.normalize(s8.float(), dim=1)
        tgt_n = F.normalize(t8.float(), dim=1)
        if not self.training and self._corr_dtype is not None:
            src_n = src_n.to(self._corr_dtype)
        held = None
        for k in range(steps):
            if two_way and backward_iterations is not None and k == backward_iterations:
                # The backward flows stop here (they only check the forward ones); the
                # remaining steps run on the forward half of the batch alone.
                held = (flow[b:], hidden[b:])
                flow, hidden, context, src_n, tgt_n = (
                    x[:b] for x in (flow, hidden, context, src_n, tgt_n))
            flow = flow.detach() if self.training else flow
            warped = warp_features(tgt_n, flow).to(src_n.dtype)
            corr = local_correlation(src_n, warped, self.config.radius)
            hidden, delta = self.refiner(hidden, context, corr.to(hidden.dtype), flow)
            flow = flow + delta.float()
            if k == steps - 1 and held is not None:
                flow, hidden = torch.cat((flow, held[0])), torch.cat((hidden, held[1]))
            if every_step or k == steps - 1:
                flows.append(self._upsample(flow, hidden))
        logit = F.interpolate(run_layers(self.match_head, hidden).float(), scale_factor=8,
                              mode='bilinear', align_corners=False)
        return NeuFlowOutput(flows, logit)
