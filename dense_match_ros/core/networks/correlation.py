"""Correlation between two feature maps: global, as DGC-Net (and CNNGeo before it) uses it,
and local, as the refinement steps of ``neuflow`` and the finer levels of ``dmp`` use it.

Global: every source position is compared with every target position, so the coarsest level
can recover displacements of any size -- which is why DGC-Net handles large viewpoint
changes where local-cost-volume flow networks fail. The volume lives on the SOURCE grid (our
flow convention) and its channel ``k = ty * Wt + tx`` indexes the target position.

Local: each source position against the target positions within ``radius`` cells of the
same position (the target usually warped by the current flow first).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def global_correlation(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, Ht*Wt, Hs, Ws) dot products of every source feature with every target feature.

    ``source`` (B, C, Hs, Ws) and ``target`` (B, C, Ht, Wt); channel ``ty * Wt + tx``.
    Features should already be L2-normalised (then each entry is a cosine in [-1, 1]).
    """
    b, c, hs, ws = source.shape
    _, ct, ht, wt = target.shape
    if ct != c:
        raise ValueError(f'feature channels differ: source {c}, target {ct}')
    tgt = target.flatten(2).transpose(1, 2)                    # (B, Ht*Wt, C)
    corr = torch.bmm(tgt, source.flatten(2))                   # (B, Ht*Wt, Hs*Ws)
    return corr.view(b, ht * wt, hs, ws)


def normalize_correlation(corr: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """ReLU then L2 normalisation over the target axis (channels), per source position.

    The ReLU drops dissimilar (negative) matches and the normalisation turns each source
    position's scores into a direction, so a position whose best score is ambiguous (many
    similar candidates) gets a flat, low-peaked profile; DGC-Net's ablation shows both
    steps improve accuracy. A source position with no positive score stays all-zero.
    """
    corr = F.relu(corr)
    return corr / (corr.square().sum(dim=1, keepdim=True) + eps).sqrt()


_BAND_CHUNK = 32
"""Source columns per matrix product in :class:`_LocalCorrelation`'s backward pass (the
product computes ``chunk + 2r`` candidates per source cell where ``2r + 1`` are kept; chunks
bound that waste on wide inputs)."""
_FORWARD_CHUNK = 16
"""The same for the forward pass, whose product covers every row offset at once: 16 columns
measured fastest at 24x32 to 60x80 cells (one thread, 64 channels, radius 3: 4.0 / 6.2 / 25.5
ms against 4.3 / 6.8 / 32.1 with 32)."""


def _chunks(width: int, k: int, device, chunk: int = _BAND_CHUNK):
    """(x0, x1, index): column chunks of the source row and, per chunk, the (x1 - x0, k)
    positions of the kept band (x - x0 + dx + r) in the chunk's product."""
    band = torch.arange(k, device=device)
    for x0 in range(0, width, chunk):
        x1 = min(width, x0 + chunk)
        yield x0, x1, torch.arange(x1 - x0, device=device)[:, None] + band


class _LocalCorrelation(torch.autograd.Function):
    """Local correlation as banded matrix products.

    Each image row of source cells (W x C) is multiplied with the 2r + 1 padded target rows
    around it (C x (2r + 1)(W + 2r)) and, per row offset dy, the 2r + 1 diagonals x + dx are
    kept: one batched matrix product per chunk of columns instead of a multiply and a channel
    reduction per offset. Measured on this project's 2-core CPU, one thread, 64 channels,
    radius 3, against per-offset products with autograd: bf16 inference at 2x60x80 cells
    8 ms against 13 ms; forward + backward at neuflow's training size (8x24x24, fp32) 14 ms
    against 55 ms. The backward scatters the output gradient back onto the band and uses
    the same products transposed.

    The products run in the inputs' dtype, never autocast's: a caller that wants bf16
    passes bf16 (``neuflow`` at inference), one that keeps positions precise passes fp32
    (``dmp``, whose optimisation stalled with bf16 scores).
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, target: torch.Tensor, radius: int) -> torch.Tensor:
        with torch.autocast(source.device.type, enabled=False):
            return _LocalCorrelation._forward(ctx, source, target, radius)

    @staticmethod
    def _forward(ctx, source: torch.Tensor, target: torch.Tensor, radius: int) -> torch.Tensor:
        b, c, h, w = source.shape
        k = 2 * radius + 1
        rows = F.pad(target, (radius,) * 4).permute(0, 2, 1, 3)           # (B, H+2r, C, W+2r)
        cells = source.permute(0, 2, 3, 1).reshape(b * h, w, c)            # (BH, W, C)
        # Each source row's 2r + 1 target rows side by side (a view; copied per chunk): one
        # product per chunk of columns for every dy (neuflow's 24x32 cells, one thread, one
        # interleaved run at 32 columns a chunk: 6.4 against 8.8 ms; 16 columns faster still).
        stack = rows.unfold(1, k, 1).permute(0, 1, 2, 4, 3)               # (B, H, C, k, W+2r)
        out = source.new_empty(b * h, w, k, k)
        for x0, x1, index in _chunks(w, k, source.device, _FORWARD_CHUNK):
            span = x1 - x0 + 2 * radius
            band = stack[..., x0:x0 + span].reshape(b * h, c, k * span)
            scores = torch.bmm(cells[:, x0:x1], band).view(b * h, x1 - x0, k, span)
            out[:, x0:x1] = scores.gather(3, index[None, :, None].expand(b * h, -1, k, -1))
        ctx.save_for_backward(cells, rows)
        ctx.shape = (b, c, h, w, radius)
        # (B, k*k, h, w) in channels-last memory, the layout the 1x1 convolution after it takes.
        return out.reshape(b, h, w, k * k).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with torch.autocast(grad.device.type, enabled=False):
            return _LocalCorrelation._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor):
        cells, rows = ctx.saved_tensors
        b, c, h, w, r = ctx.shape
        k = 2 * r + 1
        grad = grad.permute(0, 2, 3, 1).reshape(b * h, w, k, k).to(cells.dtype)
        grad_cells = torch.zeros_like(cells) if ctx.needs_input_grad[0] else None
        grad_rows = torch.zeros_like(rows) if ctx.needs_input_grad[1] else None
        for dy in range(k):
            row = rows[:, dy:dy + h].reshape(b * h, c, w + 2 * r)
            for x0, x1, index in _chunks(w, k, cells.device):
                full = cells.new_zeros(b * h, x1 - x0, x1 - x0 + 2 * r)
                full.scatter_(2, index.expand(b * h, -1, -1), grad[:, x0:x1, dy])
                if grad_cells is not None:
                    grad_cells[:, x0:x1] += torch.bmm(full, row[:, :, x0:x1 + 2 * r].transpose(1, 2))
                if grad_rows is not None:
                    update = torch.bmm(cells[:, x0:x1].transpose(1, 2), full)
                    grad_rows[:, dy:dy + h, :, x0:x1 + 2 * r] += update.reshape(b, h, c, -1)
        grad_source = (grad_cells.reshape(b, h, w, c).permute(0, 3, 1, 2)
                       if grad_cells is not None else None)
        grad_target = (grad_rows.permute(0, 2, 1, 3)[:, :, r:r + h, r:r + w]
                       if grad_rows is not None else None)
        return grad_source, grad_target, None


def local_correlation(source: torch.Tensor, target: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, (2r+1)^2, h, w) dot products of each source feature with the target features at the
    offsets (dy, dx) in [-r, r]^2 (row-major, dy outer), zeros beyond the border.

    No unfold: it would copy the target (2r+1)^2 times (measured 5x slower on the CPU)."""
    if source.shape != target.shape:
        raise ValueError(f'local correlation needs equal shapes, got {tuple(source.shape)} '
                         f'and {tuple(target.shape)}')
    dtype = torch.promote_types(source.dtype, target.dtype)
    return _LocalCorrelation.apply(source.to(dtype), target.to(dtype), int(radius))
