"""Descriptor-map geometry and HiLM's coarse-to-fine search, in torch (no ROS).

Shared by the HiLM loss (training) and the ``hilm`` method (inference) so that both sample
descriptors at exactly the same place. A descriptor map of stride s over an image has cell
i covering input pixels [i s, (i + 1) s); under the package's pixel convention
(:mod:`core.geometry.grid`: centres at integers, align_corners=False) cell i therefore sits at
input pixel ``i s + (s - 1) / 2`` and input pixel x lies at cell ``(x + 0.5) / s - 0.5``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pixels_to_cells(points: torch.Tensor, stride: int) -> torch.Tensor:
    """Input pixel coordinates -> fractional cell coordinates of a stride-``stride`` map."""
    return (points + 0.5) / stride - 0.5


def cells_to_pixels(cells: torch.Tensor, stride: int) -> torch.Tensor:
    """Cell coordinates of a stride-``stride`` map -> input pixel coordinates."""
    return (cells + 0.5) * stride - 0.5


def cell_centres(height: int, width: int, stride: int, device=None) -> torch.Tensor:
    """(H*W, 2) input-pixel (x, y) of every cell of an HxW map, row-major."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing='ij')
    return cells_to_pixels(torch.stack([xs, ys], dim=-1).reshape(-1, 2), stride)


def sample_descriptors(fmap: torch.Tensor, points: torch.Tensor, stride: int,
                       normalize: bool = True) -> torch.Tensor:
    """Bilinear descriptors (B, N, C) of ``fmap`` (B, C, h, w) at input pixels (B, N, 2).

    Points outside the map take the border descriptor (clamped), so a sample at an image
    edge stays a real descriptor rather than a blend with zeros.
    """
    b, c, h, w = fmap.shape
    cells = pixels_to_cells(points, stride)
    size = torch.tensor([w, h], dtype=cells.dtype, device=cells.device)
    norm = (2.0 * cells + 1.0) / size - 1.0
    out = F.grid_sample(fmap, norm[:, :, None, :].to(fmap.dtype), mode='bilinear',
                        padding_mode='border', align_corners=False)
    out = out[:, :, :, 0].permute(0, 2, 1)
    return F.normalize(out, dim=-1) if normalize else out


# --------------------------------------------------------------------------- matching
# Maps below are single-image descriptor maps (C, h, w), L2-normalised along C.


def nearest_cells(query: torch.Tensor, fmap: torch.Tensor, stride: int,
                  chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Global nearest neighbour of each descriptor (N, C) among all cells of ``fmap``.

    Returns the matched cell centres in input pixels (N, 2) and the cosine similarity (N,).
    """
    c, h, w = fmap.shape
    flat = fmap.reshape(c, h * w)
    best_sim, best_idx = [], []
    for start in range(0, query.shape[0], chunk):
        sim = query[start:start + chunk] @ flat
        s, i = sim.max(dim=1)
        best_sim.append(s)
        best_idx.append(i)
    sim = torch.cat(best_sim) if best_sim else query.new_zeros(0)
    idx = torch.cat(best_idx) if best_idx else torch.zeros(0, dtype=torch.long, device=query.device)
    cells = torch.stack([(idx % w).float(), (idx // w).float()], dim=-1)
    return cells_to_pixels(cells, stride), sim


def _cell_table(fmap: torch.Tensor) -> torch.Tensor:
    """(h*w, C) contiguous rows: gathering rows of it is far faster than of a (C, h*w) view."""
    return fmap.reshape(fmap.shape[0], -1).t().contiguous()


def _gather_cells(table: torch.Tensor, shape: tuple[int, int], cx: torch.Tensor,
                  cy: torch.Tensor) -> torch.Tensor:
    """Descriptors (..., C) of integer cells (clamped into the h x w map) from its table."""
    h, w = shape
    cx = cx.clamp(0, w - 1)
    cy = cy.clamp(0, h - 1)
    return table[cy * w + cx]


def _window_offsets(radius_cells: float, device) -> torch.Tensor:
    r = int(math.floor(radius_cells))
    d = torch.arange(-r, r + 1, device=device)
    oy, ox = torch.meshgrid(d, d, indexing='ij')
    keep = (ox.square() + oy.square()) <= radius_cells ** 2 + 1e-6
    return torch.stack([ox[keep], oy[keep]], dim=-1)                  # (K, 2) long


def refine_in_window(query: torch.Tensor, fmap: torch.Tensor, stride: int,
                     centres: torch.Tensor, radius: float, subpixel: bool = True,
                     chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cell of ``fmap`` for each descriptor within ``radius`` px of ``centres`` (N, 2).

    This is HiLM's fine step: the shallow level only has to choose among positions the
    deep level already made plausible. With ``subpixel`` a parabola through the best
    cell and its 4-neighbours' similarities refines the position to a fraction of a cell.
    Returns input pixels (N, 2) and the best cosine similarity (N,).
    """
    _, h, w = fmap.shape
    table = _cell_table(fmap)
    offsets = _window_offsets(max(radius / stride, 1.0), query.device)
    out_pts, out_sim = [], []
    for start in range(0, query.shape[0], chunk):
        q = query[start:start + chunk]
        base = torch.round(pixels_to_cells(centres[start:start + chunk], stride)).long()
        base[:, 0] = base[:, 0].clamp(0, w - 1)
        base[:, 1] = base[:, 1].clamp(0, h - 1)
        cand = base[:, None, :] + offsets[None]                          # (n, K, 2)
        cand[..., 0] = cand[..., 0].clamp(0, w - 1)
        cand[..., 1] = cand[..., 1].clamp(0, h - 1)
        desc = _gather_cells(table, (h, w), cand[..., 0], cand[..., 1])  # (n, K, C)
        sim = torch.einsum('nc,nkc->nk', q, desc)
        best, k = sim.max(dim=1)
        cell = cand[torch.arange(cand.shape[0], device=q.device), k].float()
        if subpixel:
            cell = cell + _parabolic_offset(q, table, (h, w), cell.long(), best)
        out_pts.append(cells_to_pixels(cell, stride))
        out_sim.append(best)
    if not out_pts:
        return query.new_zeros((0, 2)), query.new_zeros(0)
    return torch.cat(out_pts), torch.cat(out_sim)


def _parabolic_offset(q: torch.Tensor, table: torch.Tensor, shape: tuple[int, int],
                      cell: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """Sub-cell offset (n, 2) in [-0.5, 0.5] from a 1D parabola fit per axis."""
    h, w = shape
    out = torch.zeros(cell.shape, dtype=torch.float32, device=cell.device)
    for axis, size in ((0, w), (1, h)):
        lo, hi = cell.clone(), cell.clone()
        lo[:, axis] -= 1
        hi[:, axis] += 1
        s_lo = (q * _gather_cells(table, shape, lo[:, 0], lo[:, 1])).sum(-1)
        s_hi = (q * _gather_cells(table, shape, hi[:, 0], hi[:, 1])).sum(-1)
        curv = s_lo - 2.0 * s0 + s_hi
        inside = (cell[:, axis] > 0) & (cell[:, axis] < size - 1) & (curv < -1e-6)
        off = torch.where(inside, 0.5 * (s_lo - s_hi) / torch.where(inside, curv, -torch.ones_like(curv)),
                          torch.zeros_like(curv))
        out[:, axis] = off.clamp(-0.5, 0.5)
    return out


def hierarchical_match(points: torch.Tensor, shallow_a: torch.Tensor, deep_a: torch.Tensor,
                       shallow_b: torch.Tensor, deep_b: torch.Tensor, shallow_stride: int,
                       deep_stride: int, radius: float, subpixel: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match input pixels ``points`` (N, 2) of image A into image B, coarse to fine.

    Deep nearest neighbour over all of B, then shallow refinement within ``radius`` px.
    Returns (B pixels (N, 2), deep similarity (N,), shallow similarity (N,)).
    """
    q_deep = sample_descriptors(deep_a[None], points[None], deep_stride)[0]
    coarse, deep_sim = nearest_cells(q_deep, deep_b, deep_stride)
    q_shallow = sample_descriptors(shallow_a[None], points[None], shallow_stride)[0]
    fine, shallow_sim = refine_in_window(q_shallow, shallow_b, shallow_stride, coarse, radius,
                                         subpixel=subpixel)
    return fine, deep_sim, shallow_sim
