"""Independently moving objects over a batch of synthetic pairs, as tensor ops on any device.

The device sampler's counterpart of :mod:`data.moving_objects` (same idea, same ranges:
:class:`ObjectMotion`): each object is a random shape cut from a crop of another photo,
placed in the SOURCE and moved to the TARGET by its own affine map on top of the
background's motion at its centre; later objects lie in front in both images. Without it the
device sampler could not make the pairs that ``neuflow`` trains on, and a lent GPU waited on
13 CPU loader processes (565-700 pairs/s on the H200, README "A GPU stage").

What differs from the CPU version, and why: shapes are ellipses or star shapes whose radius
is a sum of three harmonics of the angle, tested analytically per pixel (no polygon
rasteriser on a GPU); the target's mask is the same test at the inverse-mapped position, so
it is exact rather than a nearest-neighbour warp of a raster mask. The ground truth follows
the same rules:

* flow of a source pixel = the map of the frontmost layer covering it there;
* ``visible`` = it lands inside the target, the frontmost layer there is its own layer, and
  it was valid to begin with (background) or belongs to an object.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dense_match_ros.data.moving_objects import ObjectMotion

ELLIPSE_SHARE = 0.4
"""Share of ellipses among the shapes (the rest are star shapes), as in the CPU version."""


def _uniform(gen: torch.Generator, shape, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=device) * (hi - lo) + lo


def _inside(shape: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Whether points (x, y) (B, K, H, W pixels) lie in each object's shape (B, K, H, W)."""
    dx = x - shape['cx'][..., None, None]
    dy = y - shape['cy'][..., None, None]
    ca, sa = torch.cos(shape['angle'])[..., None, None], torch.sin(shape['angle'])[..., None, None]
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    ellipse = (u / shape['a'][..., None, None]) ** 2 + (v / shape['b'][..., None, None]) ** 2 < 1.0
    theta = torch.atan2(v, u)
    k = torch.arange(1, 4, device=x.device, dtype=x.dtype)
    wave = (shape['amp'][..., None, None, :] *
            torch.cos(k * theta[..., None] + shape['phase'][..., None, None, :])).sum(-1)
    radius = shape['r'][..., None, None] * (0.75 + wave).clamp(0.5, 1.0)
    star = dx * dx + dy * dy < radius * radius
    return torch.where(shape['ellipse'][..., None, None], ellipse, star)


def add_moving_objects(source: torch.Tensor, target: torch.Tensor, flow: torch.Tensor,
                       valid: torch.Tensor, textures: torch.Tensor, gen: torch.Generator,
                       probability: float, motion: ObjectMotion = ObjectMotion()
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source, target, flow, visible) with objects on a ``probability`` share of the pairs.

    ``source``, ``target``: float (B, 3, H, W); ``flow`` (B, H, W, 2) pixels; ``valid`` bool
    (B, H, W), the background's in-frame mask; ``textures``: float (B, K, 3, H, W) crops of
    other photos, K = ``motion.count[1]`` (the sampler's ``_crops``). Every pair draws the
    same random numbers whether it gets objects or not, so a batch is a pure function of the
    generator's state.
    """
    b, _, h, w = source.shape
    dev = source.device
    k_max = int(motion.count[1])
    if textures.shape[:2] != (b, k_max):
        raise ValueError(f'textures must be (B, {k_max}, 3, H, W), got {tuple(textures.shape)}')
    with_objects = torch.rand(b, generator=gen, device=dev) < probability
    count = torch.randint(int(motion.count[0]), k_max + 1, (b,), generator=gen, device=dev)
    active = with_objects[:, None] & (torch.arange(1, k_max + 1, device=dev)[None] <= count[:, None])

    side = float(min(h, w))
    r = _uniform(gen, (b, k_max), *motion.radius, dev) * side
    shape = {'cx': _uniform(gen, (b, k_max), 0, w, dev), 'cy': _uniform(gen, (b, k_max), 0, h, dev),
             'r': r, 'ellipse': torch.rand((b, k_max), generator=gen, device=dev) < ELLIPSE_SHARE,
             'a': r * _uniform(gen, (b, k_max), 0.6, 1.0, dev),
             'b': r * _uniform(gen, (b, k_max), 0.3, 1.0, dev),
             'angle': _uniform(gen, (b, k_max), 0, math.pi, dev),
             'amp': _uniform(gen, (b, k_max, 3), -0.12, 0.12, dev),
             'phase': _uniform(gen, (b, k_max, 3), 0, 2 * math.pi, dev)}

    # Each object's map, source pixels -> target pixels: the background's motion at its
    # centre, then its own rotation and scale about the centre and a translation.
    ix = shape['cx'].round().clamp(0, w - 1).long()
    iy = shape['cy'].round().clamp(0, h - 1).long()
    bg = flow[torch.arange(b, device=dev)[:, None], iy, ix]                  # (B, K, 2)
    angle = math.radians(motion.rotation_deg) * _uniform(gen, (b, k_max), -1, 1, dev)
    s = _uniform(gen, (b, k_max), *motion.scale, dev)
    shift = bg + motion.translation * _uniform(gen, (b, k_max, 2), -1, 1, dev) * \
        torch.tensor([w, h], dtype=torch.float32, device=dev)
    cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
    centre = torch.stack([shape['cx'], shape['cy']], -1)

    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                            torch.arange(w, device=dev, dtype=torch.float32), indexing='ij')
    x, y = xs.expand(b, k_max, h, w), ys.expand(b, k_max, h, w)
    # Forward map of every source pixel (B, K, H, W) and the inverse of every target pixel.
    cxv, cyv = centre[..., 0, None, None], centre[..., 1, None, None]
    c_, s_ = cos[..., None, None], sin[..., None, None]
    tx, ty = shift[..., 0, None, None], shift[..., 1, None, None]
    fx = cxv + tx + c_ * (x - cxv) - s_ * (y - cyv)
    fy = cyv + ty + s_ * (x - cxv) + c_ * (y - cyv)
    det = c_ * c_ + s_ * s_
    qx, qy = x - cxv - tx, y - cyv - ty
    bx = cxv + (c_ * qx + s_ * qy) / det
    by = cyv + (-s_ * qx + c_ * qy) / det

    in_source = _inside(shape, x, y) & active[..., None, None]
    in_target = _inside(shape, bx, by) & active[..., None, None]
    norm = torch.tensor([w, h], dtype=torch.float32, device=dev)
    back = (torch.stack([bx, by], -1) + 0.5) / norm * 2 - 1                  # (B, K, H, W, 2)
    warped = F.grid_sample(textures.flatten(0, 1), back.flatten(0, 1), mode='bilinear',
                           padding_mode='reflection', align_corners=False).view(b, k_max, 3, h, w)
    moved = torch.stack([fx - x, fy - y], -1)                                # (B, K, H, W, 2)

    source, target, flow = source.clone(), target.clone(), flow.clone()
    src_layer = torch.zeros(b, h, w, dtype=torch.long, device=dev)
    tgt_layer = torch.zeros(b, h, w, dtype=torch.long, device=dev)
    for k in range(k_max):                       # later objects in front, in both images
        on, onto = in_source[:, k], in_target[:, k]
        source = torch.where(on[:, None], textures[:, k], source)
        flow = torch.where(on[..., None], moved[:, k], flow)
        src_layer = torch.where(on, k + 1, src_layer)
        target = torch.where(onto[:, None], warped[:, k], target)
        tgt_layer = torch.where(onto, k + 1, tgt_layer)

    px = xs + flow[..., 0]
    py = ys + flow[..., 1]
    inside = (px >= -0.5) & (px <= w - 0.5) & (py >= -0.5) & (py <= h - 0.5)
    jx = px.round().clamp(0, w - 1).long()
    jy = py.round().clamp(0, h - 1).long()
    landed = tgt_layer[torch.arange(b, device=dev)[:, None, None], jy, jx]
    visible = inside & (landed == src_layer) & (valid | (src_layer > 0))
    return source, target, flow, visible
