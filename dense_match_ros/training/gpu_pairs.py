"""Synthetic training pairs made in batches on any torch device (GPU: ~20x the CPU generator).

The same recipe as :mod:`data.synthetic` (CNNGeo / DGC-Net), re-expressed as tensor ops so
that a GPU makes a whole batch in a few kernels instead of a CPU making it pixel by pixel:

* photos are decoded once into one uint8 tensor (N, 3, Hp, Wp) on the device (each photo
  resized to cover ``photo_size`` and centre-cropped);
* the TARGET is a crop window of a photo (scale ``crop_scale`` of the largest window that
  fits, random position) resampled to the output size; the SOURCE samples the same photo
  at the crop mapped through a random transform T, so ``source(x) = target(T(x))`` and the
  ground-truth flow on the source grid is ``T(x) - x`` exactly (no TPS inversion). Outside
  the photo the sampling reflects (no black border to learn), and ``valid`` marks the
  source pixels whose T(x) lands inside the target;
* T is affine, TPS or homography with the ranges of :mod:`data.synthetic`; homographies
  that would fold the image are shrunk towards the identity (halved, up to 4 times)
  instead of redrawn, which keeps the batch shape static;
* independent photometric jitter per image (brightness, contrast, saturation, gamma,
  Gaussian noise; no hue shift or blur, which the CPU generator also applies).

Batches are a pure function of (seed, step) through a device ``torch.Generator``, so a run
resumed at step k draws the batches it would have drawn (on the same device type).
Only torch and numpy are needed at sampling time (OpenCV only to decode photos), so this
runs on a bare GPU machine. :class:`DeviceBatches` is the shared loop's batch source for
``data.sampler: device``.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dense_match_ros.core.geometry import transforms as tf
from dense_match_ros.training import gpu_objects
from dense_match_ros.training.config import TrainConfig
from dense_match_ros.training.tasks import TrainTask, fill

KINDS = ('affine', 'tps', 'homography')


@dataclasses.dataclass
class GpuPairConfig:
    """What :class:`GpuPairSampler` draws; the defaults are :mod:`data.synthetic`'s."""

    size: tuple[int, int] = (240, 240)
    """(H, W) of both output images."""
    kinds: tuple[str, ...] = KINDS
    rotation_deg: float = 15.0
    shear_deg: float = 30.0
    scale: tuple[float, float] = (0.75, 1.25)
    translation: float = 0.25
    tps_jitter: float = 0.4
    homography_jitter: float = 2.0 / 3.0
    crop_scale: tuple[float, float] = (0.5, 0.9)
    photometric: bool = True
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    gamma: float = 0.25
    noise_sigma: float = 5.0
    p_jitter: float = 0.8
    objects: float = 0.0
    """Share of pairs with 2-6 independently moving objects (:mod:`.gpu_objects`, the
    ranges of :class:`data.moving_objects.ObjectMotion`); 0 draws nothing for them, so the
    batches of a run without objects stay what they were."""


def photos_to_tensor(photos: Sequence[np.ndarray], photo_size: tuple[int, int] = (256, 256),
                     device: str | torch.device = 'cpu') -> torch.Tensor:
    """Stack RGB uint8 photos of any sizes into (N, 3, H, W) uint8 on ``device``.

    Each photo is resized to cover ``photo_size`` = (H, W) (area filter when shrinking)
    and centre-cropped, so one tensor holds them all and sampling needs no Python loop.
    """
    import cv2
    ph, pw = photo_size
    out = np.empty((len(photos), ph, pw, 3), dtype=np.uint8)
    for i, photo in enumerate(photos):
        h, w = photo.shape[:2]
        s = max(ph / h, pw / w)
        rw, rh = max(pw, round(w * s)), max(ph, round(h * s))
        if (rw, rh) != (w, h):
            photo = cv2.resize(photo, (rw, rh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
        y0, x0 = (rh - ph) // 2, (rw - pw) // 2
        out[i] = photo[y0:y0 + ph, x0:x0 + pw]
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(device)


def load_photo_tensor(folder: str | Sequence[str] | None, photo_size: tuple[int, int] = (256, 256),
                      split: str = 'train', device: str | torch.device = 'cpu',
                      limit: int | None = None) -> torch.Tensor:
    """Decode the ``split`` photos of ``folder`` once (split as in :mod:`data.photos`).

    ``train_pack/`` and ``train_images/`` hold out the same photos (``data.photos``
    splits on the original path). ``folder``: one, several or None (the default search of
    :mod:`data.photos`).
    """
    from dense_match_ros.data.photos import PhotoSource
    source = PhotoSource(folder, split=split, short_side=max(photo_size))
    if not len(source):
        raise FileNotFoundError(f'no {split} photos in {folder}')
    keep = range(len(source)) if limit is None else range(min(limit, len(source)))
    return photos_to_tensor([source[i] for i in keep], photo_size, device)


class GpuPairSampler:
    """Batches of (source, target, flow, valid) from a photo tensor, on its device."""

    def __init__(self, photos: torch.Tensor, config: GpuPairConfig | None = None) -> None:
        if photos.dtype != torch.uint8 or photos.dim() != 4 or photos.shape[1] != 3:
            raise ValueError(f'photos must be uint8 (N, 3, H, W), got {tuple(photos.shape)} {photos.dtype}')
        self.photos = photos
        self.config = c = config or GpuPairConfig()
        if set(c.kinds) - set(KINDS) or not c.kinds:
            raise ValueError(f'kinds must be a non-empty subset of {KINDS}, got {c.kinds}')
        self.device = photos.device

    # ------------------------------------------------------------------ random draws

    def _uniform(self, gen: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=gen, device=self.device) * (hi - lo) + lo

    def _affine(self, gen: torch.Generator, n: int) -> torch.Tensor:
        """(n, 2, 3) CNNGeo affines: A = R(rot) R(shear)^T diag(s1, s2) R(shear), t."""
        c = self.config
        rot = math.radians(c.rotation_deg) * self._uniform(gen, n, -1, 1)
        shear = math.radians(c.shear_deg) * self._uniform(gen, n, -1, 1)
        s = self._uniform(gen, (n, 2), *c.scale)
        t = c.translation * self._uniform(gen, (n, 2), -1, 1)

        def rotation(a: torch.Tensor) -> torch.Tensor:
            ca, sa = torch.cos(a), torch.sin(a)
            return torch.stack([torch.stack([ca, -sa], -1), torch.stack([sa, ca], -1)], -2)

        r_sh = rotation(shear)
        a = rotation(rot) @ r_sh.transpose(1, 2) @ torch.diag_embed(s) @ r_sh
        return torch.cat([a, t[:, :, None]], dim=2)

    def _tps(self, gen: torch.Generator, n: int) -> torch.Tensor:
        ident = torch.as_tensor(tf.tps_identity(), dtype=torch.float32, device=self.device)
        j = self.config.tps_jitter
        return ident + self._uniform(gen, (n, 18), -j, j)

    def _homography(self, gen: torch.Generator, n: int) -> torch.Tensor:
        """(n, 3, 3) homographies moving the image corners by U(+-jitter); folds shrunk."""
        corners = torch.as_tensor(tf.CORNERS, dtype=torch.float32, device=self.device)
        offsets = self._uniform(gen, (n, 4, 2), -1, 1) * self.config.homography_jitter
        for _ in range(5):
            H = _homography_from_corners(corners.expand(n, 4, 2), corners + offsets)
            _, w = tf.apply_homography_torch(H, corners.expand(n, 4, 2))
            bad = ~(w > 0.05).all(dim=1)
            if not bool(bad.any()):
                break
            offsets = torch.where(bad[:, None, None], offsets * 0.5, offsets)
        else:
            H = torch.where(bad[:, None, None], torch.eye(3, device=self.device).expand(n, 3, 3), H)
        return H

    def _crop_window(self, gen: torch.Generator, n: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(photo index, centre, half extent) of ``n`` random crop windows, in each photo's
        normalised coordinates: ``crop_scale`` of the largest window of the output's aspect."""
        c = self.config
        h, w = c.size
        n_photos, _, ph, pw = self.photos.shape
        idx = torch.randint(n_photos, (n,), generator=gen, device=self.device)
        fit = min(pw / w, ph / h)                                # photo px per output px, largest window
        scale = self._uniform(gen, n, *c.crop_scale) * fit
        half = torch.stack([scale * w / pw, scale * h / ph], dim=1)  # half extent, normalised
        centre = (self._uniform(gen, (n, 2), -1, 1)) * (1.0 - half)
        return idx, centre, half

    def _crops(self, gen: torch.Generator, n: int) -> torch.Tensor:
        """(n, 3, H, W) float crops of random photos at the output size (moving objects'
        textures), drawn as the pairs' own windows are."""
        h, w = self.config.size
        idx, centre, half = self._crop_window(gen, n)
        grid = centre[:, None, None] + half[:, None, None] * tf.base_grid_torch(
            h, w, n, device=self.device)
        return F.grid_sample(self.photos[idx].float(), grid, mode='bilinear',
                             padding_mode='reflection', align_corners=False)

    # ------------------------------------------------------------------ one batch

    def sample(self, batch: int, seed: int = 0, step: int = 0) -> dict[str, torch.Tensor]:
        """A batch: ``source``/``target`` uint8 (B, 3, H, W), ``flow`` float32 (B, H, W, 2)
        pixels on the source grid, ``valid`` bool (B, H, W). Same (seed, step), same batch."""
        c = self.config
        gen = torch.Generator(device=self.device)
        gen.manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 63))
        h, w = c.size
        dev = self.device
        idx, centre, half = self._crop_window(gen, batch)

        # The transform T per pair, in the target's normalised frame.
        kind_id = torch.randint(len(c.kinds), (batch,), generator=gen, device=dev)
        mapped = torch.empty(batch, h, w, 2, device=dev)
        for k, kind in enumerate(c.kinds):
            sel = (kind_id == k).nonzero(as_tuple=True)[0]
            draw = {'affine': self._affine, 'tps': self._tps, 'homography': self._homography}[kind]
            theta = draw(gen, batch)  # draw for all, keep the selected: fixed RNG consumption
            if sel.numel():
                mapped[sel] = tf.sampling_grid_torch(kind, theta[sel], (h, w), dtype=torch.float32, device=dev)

        base = tf.base_grid_torch(h, w, batch, device=dev)
        photos = self.photos[idx].float()
        target_grid = centre[:, None, None] + half[:, None, None] * base
        source_grid = centre[:, None, None] + half[:, None, None] * mapped
        target = F.grid_sample(photos, target_grid, mode='bilinear', padding_mode='reflection',
                               align_corners=False)
        source = F.grid_sample(photos, source_grid, mode='bilinear', padding_mode='reflection',
                               align_corners=False)

        size = torch.tensor([w, h], dtype=torch.float32, device=dev)
        mapped_px = ((mapped + 1.0) * size - 1.0) / 2.0
        pix = ((base + 1.0) * size - 1.0) / 2.0
        flow = mapped_px - pix
        valid = (mapped.abs() <= 1.0).all(dim=-1)  # |x_n| <= 1: inside the target's outer edges
        flow = torch.where(valid[..., None], flow, torch.zeros_like(flow))

        if c.objects > 0:
            count = gpu_objects.ObjectMotion().count[1]
            textures = self._crops(gen, batch * count).view(batch, count, 3, h, w)
            source, target, flow, valid = gpu_objects.add_moving_objects(
                source, target, flow, valid, textures, gen, c.objects)
        if c.photometric:
            source = self._jitter(source / 255.0, gen) * 255.0
            target = self._jitter(target / 255.0, gen) * 255.0
        to_u8 = lambda im: im.round().clamp(0, 255).to(torch.uint8)  # noqa: E731
        return {'source': to_u8(source), 'target': to_u8(target), 'flow': flow, 'valid': valid}

    def _jitter(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Photometric changes per image, each firing with probability ``p_jitter``."""
        c = self.config
        b = img.shape[0]

        def factor(spread: float) -> torch.Tensor:
            f = self._uniform(gen, b, 1 - spread, 1 + spread)
            on = torch.rand(b, generator=gen, device=self.device) < c.p_jitter
            return torch.where(on, f, torch.ones_like(f)).view(b, 1, 1, 1)

        img = img * factor(c.brightness)
        mean = img.mean(dim=(1, 2, 3), keepdim=True)
        img = (img - mean) * factor(c.contrast) + mean
        grey = (img * torch.tensor([0.299, 0.587, 0.114], device=self.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        img = (img - grey) * factor(c.saturation) + grey
        lg = -math.log(1 - c.gamma) if c.gamma > 0 else 0.0
        g = torch.exp(self._uniform(gen, b, -lg, lg))
        on = torch.rand(b, generator=gen, device=self.device) < c.p_jitter
        g = torch.where(on, g, torch.ones_like(g)).view(b, 1, 1, 1)
        img = img.clamp(0, 1) ** g
        sigma = self._uniform(gen, b, 0, c.noise_sigma / 255.0).view(b, 1, 1, 1)
        on = (torch.rand(b, generator=gen, device=self.device) < c.p_jitter).view(b, 1, 1, 1)
        noise = torch.randn(img.shape, generator=gen, device=self.device) * sigma
        return (img + torch.where(on, noise, torch.zeros_like(noise))).clamp(0, 1)


class DeviceBatches:
    """The loop's batch source for ``data.sampler: device``: batch ``step`` of rank ``rank``
    is ``sampler.sample(batch_size, seed + 100003 * rank, step)`` with its ``step``."""

    def __init__(self, sampler: GpuPairSampler, batch_size: int, seed: int, rank: int = 0) -> None:
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.seed = int(seed) + 100_003 * int(rank)

    @classmethod
    def from_config(cls, config: TrainConfig, task: TrainTask, rank: int,
                    device: torch.device) -> 'DeviceBatches':
        """Photos of ``data.photos`` (train split) decoded once onto ``device``; the pair
        ranges of ``data`` (``image_size``, ``kinds``, ``crop_scale``, ``photometric``) and
        ``data.gpu_pairs`` (any other :class:`GpuPairConfig` field)."""
        data = config.data
        if type(task).extra_batch is not TrainTask.extra_batch:
            raise ValueError(f'{task.name} draws per-pair inputs on the CPU (extra_batch); '
                             'train it with data.sampler: cpu')
        if data.kind_weights:
            raise ValueError('data.kind_weights needs data.sampler: cpu')
        if data.ranges != 'default':
            raise ValueError('data.ranges needs data.sampler: cpu (the device sampler takes '
                             'its ranges from data.gpu_pairs)')
        t0 = time.monotonic()
        side = int(data.photo_short_side)
        photos = load_photo_tensor(data.photos, (side, side), 'train', device)
        pairs = fill(GpuPairConfig, {'size': list(data.image_size), 'kinds': list(data.kinds),
                                     'crop_scale': list(data.crop_scale),
                                     'photometric': data.photometric,
                                     'objects': data.objects, **data.gpu_pairs},
                     'data.gpu_pairs')
        if rank == 0:
            print(f'device pairs: {photos.shape[0]} photos on {device} in '
                  f'{time.monotonic() - t0:.1f} s', file=sys.stderr, flush=True)
        return cls(GpuPairSampler(photos, pairs), config.batch_size, config.seed, rank)

    def __call__(self, start: int, end: int) -> Iterator[dict[str, torch.Tensor]]:
        for step in range(start, end):
            yield {**self.sampler.sample(self.batch_size, self.seed, step),
                   'step': torch.tensor(step)}


def _homography_from_corners(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) H with dst_i ~ H src_i for 4 point pairs per batch item (exact DLT)."""
    n = src.shape[0]
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], dim=-1)
    a = torch.stack([rows_u, rows_v], dim=2).reshape(n, 8, 8)
    b = torch.stack([u, v], dim=2).reshape(n, 8)
    h = torch.linalg.solve(a, b)
    return torch.cat([h, torch.ones(n, 1, dtype=h.dtype, device=h.device)], dim=1).view(n, 3, 3)
