"""Synthetic image pairs with exact dense ground truth, for training and a fixed held-out set.

Recipe (following CNNGeo, Rocco et al. 2017, and DGC-Net, Melekhov et al. 2019):

* a photo is cropped (the TARGET, an exact pixel crop of the photo resized so the crop
  window has the output size);
* a random transform T (rendered -> sampled direction, normalised coordinates, see
  :mod:`core.geometry.transforms`) is drawn, and the SOURCE is rendered by sampling the photo at
  T(x) around that crop. So ``source(x) = target(T(x))`` and the ground-truth flow on the
  source grid is exactly ``T(x) - x``, with no inverse of a TPS ever needed;
* outside the photo the sampling reflects it (CNNGeo's symmetric padding: the warp never
  sees a black border, so a network cannot learn to find the image edge instead of
  matching), and ``valid`` marks the source pixels whose T(x) falls inside the target;
* photometric jitter is then applied to each image independently.

Transform families (all parameters uniform in the stated ranges):

* ``affine``: CNNGeo's: rotation +-15 deg, shear angle +-30 deg, anisotropic scales
  0.75-1.25, translation +-0.25 (normalised), A = R(rot) R(shear)^T diag(s1, s2) R(shear).
* ``tps``: CNNGeo's: the 3x3 control points on [-1, 1] each displaced by +-0.4 per axis.

These are the ``default`` ranges of :data:`RANGES`; ``paper`` widens both as the CNNGeo
paper's text states them (scale change up to 2x, drawn log-uniformly in [0.5, 2]; control
points moved up to a quarter of the image, +-0.5 normalised), for training only: the
held-out set keeps the default ranges, so runs on either stay comparable.
* ``similarity``: wide rotation and zoom, which CNNGeo's ranges leave out and real
  viewpoint changes need: rotation +-45 deg, one scale 0.7-1.4, translation +-0.2.
* ``homography``: DGC-Net's: the four corners of the 240x240 output crop displaced by up to
  80 px per axis (uniform integers in [-80, 80] in the homographies of DGC-Net's released
  ``homo_aff_tps_test.csv``), i.e. +-1/3 of the output side, here +-2/3 in normalised units
  for any output size. Draws that fold the image (w <= 0 anywhere on it) are redrawn.

Determinism: everything is drawn from the ``numpy.random.Generator`` passed in (photo,
kind, crop, transform, jitter), so one seed gives one pair, bit-identical across runs on the
same library versions. :func:`heldout_pairs` is the fixed held-out evaluation set.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import cv2
import numpy as np

from dense_match_ros.core.geometry import transforms as tf
from dense_match_ros.data.moving_objects import ObjectMotion, add_moving_objects
from dense_match_ros.data.photos import PhotoSource

KINDS = ('affine', 'tps', 'homography', 'similarity')
DEFAULT_KINDS = ('affine', 'tps', 'homography')


@dataclasses.dataclass
class SyntheticPair:
    """One training/evaluation pair in the package's flow convention."""

    source: np.ndarray
    """RGB uint8 (H, W, 3): rendered through the transform (source(x) = target(T(x)))."""
    target: np.ndarray
    """RGB uint8 (H, W, 3): an exact crop of the (resized) photo."""
    flow: np.ndarray
    """float32 (H, W, 2), source grid, pixels: source (x, y) <-> target (x+u, y+v)."""
    valid: np.ndarray
    """bool (H, W): the correspondence lands inside the target (and, with moving objects,
    is not hidden there by an object in front)."""
    kind: str
    params: dict
    """JSON-serialisable: kind, theta (normalised, rendered -> sampled), photo key, crop, jitter."""


@dataclasses.dataclass
class AffineRanges:
    """CNNGeo's affine sampling ranges (angles in degrees, translation normalised)."""

    rotation_deg: float = 15.0
    shear_deg: float = 30.0
    scale: tuple[float, float] = (0.75, 1.25)
    translation: float = 0.25
    log_scale: bool = False
    """Draw each scale log-uniformly (a zoom of 2x as likely as one of 0.5x), not uniformly."""


@dataclasses.dataclass(frozen=True)
class TransformRanges:
    """The ranges of the two CNNGeo families, as one named choice (``data.ranges``)."""

    affine: AffineRanges
    tps_jitter: float


RANGES = {
    'default': TransformRanges(AffineRanges(), 0.4),
    'paper': TransformRanges(AffineRanges(scale=(0.5, 2.0), log_scale=True), 0.5),
}
"""Named transform ranges (see the module docstring)."""


@dataclasses.dataclass
class PhotometricJitter:
    """Appearance changes applied to each image independently (0 / 1 disables an effect).

    Each effect fires with probability ``p``; ranges are symmetric factors around 1 for
    brightness/contrast/saturation/gamma, a hue shift in turns, additive Gaussian noise
    sigma in grey levels, and a Gaussian blur sigma in pixels (blur fires with ``p_blur``).
    """

    p: float = 0.8
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05
    gamma: float = 0.25
    noise_sigma: float = 5.0
    blur_sigma: float = 1.2
    p_blur: float = 0.3

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """Jittered copy of an RGB uint8 image and what was done (for the pair's params)."""
        img = image.astype(np.float32) / 255.0
        done: dict = {}

        def fire() -> bool:
            return bool(rng.random() < self.p)

        if fire() and self.brightness > 0:
            f = float(rng.uniform(1 - self.brightness, 1 + self.brightness))
            img = img * f
            done['brightness'] = f
        if fire() and self.contrast > 0:
            f = float(rng.uniform(1 - self.contrast, 1 + self.contrast))
            mean = float(img.mean())
            img = (img - mean) * f + mean
            done['contrast'] = f
        if fire() and (self.saturation > 0 or self.hue > 0):
            s = float(rng.uniform(1 - self.saturation, 1 + self.saturation))
            h = float(rng.uniform(-self.hue, self.hue))
            hsv = cv2.cvtColor(np.clip(img, 0, 1), cv2.COLOR_RGB2HSV)  # H in degrees
            hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * h, 360.0)
            hsv[..., 1] = np.clip(hsv[..., 1] * s, 0, 1)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
            done['saturation'], done['hue'] = s, h
        if fire() and self.gamma > 0:
            g = float(math.exp(rng.uniform(math.log(1 - self.gamma), -math.log(1 - self.gamma))))
            img = np.power(np.clip(img, 0, 1), g)
            done['gamma'] = g
        if rng.random() < self.p_blur and self.blur_sigma > 0:
            sigma = float(rng.uniform(0.3, self.blur_sigma))
            img = cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
            done['blur_sigma'] = sigma
        if fire() and self.noise_sigma > 0:
            sigma = float(rng.uniform(0, self.noise_sigma))
            img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma / 255.0)
            done['noise_sigma'] = sigma
        out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
        return out, done


def random_affine(rng: np.random.Generator, ranges: AffineRanges = AffineRanges()) -> np.ndarray:
    """CNNGeo-style random affine theta (6,)."""
    rot = math.radians(ranges.rotation_deg) * rng.uniform(-1, 1)
    shear = math.radians(ranges.shear_deg) * rng.uniform(-1, 1)
    if ranges.log_scale:
        s1, s2 = np.exp(rng.uniform(*np.log(ranges.scale), size=2))
    else:
        s1, s2 = rng.uniform(*ranges.scale, size=2)
    tx, ty = ranges.translation * rng.uniform(-1, 1, size=2)
    return tf.affine_theta(rot, shear, s1, s2, tx, ty)


def random_tps(rng: np.random.Generator, jitter: float = 0.4) -> np.ndarray:
    """CNNGeo-style random TPS theta (18,): control points displaced by U(-jitter, jitter)."""
    return tf.tps_identity() + rng.uniform(-jitter, jitter, size=18)


def random_similarity(rng: np.random.Generator, rotation_deg: float = 45.0,
                      scale: tuple[float, float] = (0.7, 1.4), translation: float = 0.2) -> np.ndarray:
    """Rotation + isotropic zoom + translation theta (6,), for viewpoint robustness."""
    rot = math.radians(rotation_deg) * rng.uniform(-1, 1)
    s = float(math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1]))))
    tx, ty = translation * rng.uniform(-1, 1, size=2)
    return tf.affine_theta(rot, 0.0, s, s, tx, ty)


def random_homography(rng: np.random.Generator, corner_jitter: float = 2.0 / 3.0,
                      max_tries: int = 50) -> np.ndarray:
    """DGC-Net-style random homography (3x3, normalised): image corners moved by U(+-jitter).

    Redrawn until w > 0 on the whole image (checking the four corners suffices: w is affine
    in x and the image is convex), so the rendered source never shows the far side of the
    line at infinity. The last draw is shrunk towards the identity if all tries fail.
    """
    for attempt in range(max_tries):
        offsets = rng.uniform(-corner_jitter, corner_jitter, size=(4, 2))
        if attempt == max_tries - 1:
            offsets *= 0.5
        H = tf.homography_from_points(tf.CORNERS, tf.CORNERS + offsets)
        _, w = tf.apply_homography(H, tf.CORNERS)
        if np.all(w > 0.05):
            return H
    return np.eye(3)


class SyntheticPairGenerator:
    """Draw :class:`SyntheticPair` s from a photo source.

    ``size = (H, W)`` of both output images. ``kinds`` picks the transform family uniformly
    (or by ``kind_weights``). ``crop_scale`` is the crop window as a fraction of the largest
    window of the output's aspect ratio that fits in the photo; smaller windows leave real
    photo content around the crop for the warp to bring in. ``photometric`` True uses
    :class:`PhotometricJitter` defaults, False none, or pass an instance.
    """

    def __init__(self, photos: PhotoSource | Sequence[np.ndarray] | None = None,
                 size: tuple[int, int] = (240, 240),
                 kinds: Sequence[str] = DEFAULT_KINDS,
                 photometric: bool | PhotometricJitter = True,
                 kind_weights: Sequence[float] | None = None,
                 affine: AffineRanges = AffineRanges(),
                 tps_jitter: float = 0.4,
                 homography_jitter: float = 2.0 / 3.0,
                 crop_scale: tuple[float, float] = (0.5, 0.9),
                 objects: float = 0.0,
                 object_motion: ObjectMotion = ObjectMotion()) -> None:
        self.photos = PhotoSource(split='train') if photos is None else photos
        if len(self.photos) == 0:
            raise ValueError('photo source is empty')
        self.size = (int(size[0]), int(size[1]))
        if min(self.size) < 2:
            raise ValueError(f'size must be at least 2x2, got {size}')
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f'kinds must be a non-empty subset of {KINDS}, got {kinds}')
        self.kinds = tuple(kinds)
        if kind_weights is not None:
            w = np.asarray(kind_weights, dtype=np.float64)
            if w.shape != (len(self.kinds),) or (w < 0).any() or w.sum() <= 0:
                raise ValueError('kind_weights needs one non-negative weight per kind')
            self.kind_weights = w / w.sum()
        else:
            self.kind_weights = None
        if photometric is True:
            photometric = PhotometricJitter()
        self.photometric = photometric or None
        self.affine = affine
        self.tps_jitter = float(tps_jitter)
        self.homography_jitter = float(homography_jitter)
        lo, hi = crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f'crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}')
        self.crop_scale = (float(lo), float(hi))
        if not 0.0 <= objects <= 1.0:
            raise ValueError(f'objects is a probability in [0, 1], got {objects}')
        self.objects = float(objects)
        self.object_motion = object_motion

    # -- transforms ------------------------------------------------------------------

    def random_transform(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        if kind == 'affine':
            return random_affine(rng, self.affine)
        if kind == 'tps':
            return random_tps(rng, self.tps_jitter)
        if kind == 'similarity':
            return random_similarity(rng)
        return random_homography(rng, self.homography_jitter)

    # -- sampling --------------------------------------------------------------------

    def _photo(self, index: int) -> tuple[np.ndarray, str]:
        photo = self.photos[index]
        keys = getattr(self.photos, 'keys', None)
        return photo, (keys[index] if keys is not None else str(index))

    def sample(self, rng: np.random.Generator) -> SyntheticPair:
        """Draw one pair; all randomness comes from ``rng``."""
        out_h, out_w = self.size
        index = int(rng.integers(len(self.photos)))
        kind = str(self.kinds[int(rng.choice(len(self.kinds), p=self.kind_weights))])
        photo, key = self._photo(index)
        ph, pw = photo.shape[:2]

        # Crop window in the photo, then resize the photo so that window is out_w x out_h
        # exactly: the target is a plain pixel crop, no resampling of its own.
        fit = min(pw / out_w, ph / out_h)
        scale = float(rng.uniform(*self.crop_scale)) * fit          # photo px per output px
        rw, rh = max(out_w, round(pw / scale)), max(out_h, round(ph / scale))
        resized = photo if (rw, rh) == (pw, ph) else cv2.resize(
            photo, (rw, rh), interpolation=cv2.INTER_AREA if scale > 1 else cv2.INTER_CUBIC)
        ox = int(rng.integers(0, rw - out_w + 1))
        oy = int(rng.integers(0, rh - out_h + 1))
        target = np.ascontiguousarray(resized[oy:oy + out_h, ox:ox + out_w])

        theta = self.random_transform(kind, rng)
        src_px = np.stack(np.meshgrid(np.arange(out_w, dtype=np.float64),
                                      np.arange(out_h, dtype=np.float64)), axis=-1)
        mapped_n = tf.apply_transform(kind, theta, tf.to_normalized(src_px, (out_w, out_h)))
        mapped = tf.to_pixels(mapped_n, (out_w, out_h))               # target pixels
        finite = np.all(np.isfinite(mapped), axis=-1)
        mapped = np.where(finite[..., None], mapped, -1e4)
        # Render the source from the resized photo around the crop, reflecting at its edges.
        map_x = (mapped[..., 0] + ox).astype(np.float32)
        map_y = (mapped[..., 1] + oy).astype(np.float32)
        source = cv2.remap(resized, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

        flow = (mapped - src_px).astype(np.float32)
        valid = finite & (mapped[..., 0] >= -0.5) & (mapped[..., 0] <= out_w - 0.5) \
            & (mapped[..., 1] >= -0.5) & (mapped[..., 1] <= out_h - 0.5)
        flow[~finite] = 0.0

        params = {'kind': kind, 'theta': np.asarray(theta, dtype=np.float64).ravel().tolist(),
                  'photo': key, 'photo_index': index, 'photo_size': [pw, ph],
                  'crop': {'x': ox, 'y': oy, 'photo_px_per_pixel': scale,
                           'resized_size': [rw, rh]}}
        # No draw at all without objects: the held-out set and older streams stay bit-identical.
        with_objects = self.objects > 0 and rng.random() < self.objects
        if with_objects:
            count = int(rng.integers(self.object_motion.count[0], self.object_motion.count[1] + 1))
            textures = [self._texture(rng) for _ in range(count)]
            source, target, flow, valid = add_moving_objects(source, target, flow, valid,
                                                             textures, rng, self.object_motion)
            params['objects'] = count
        if self.photometric is not None:
            source, jit_s = self.photometric.apply(source, rng)
            target, jit_t = self.photometric.apply(target, rng)
            params['photometric'] = {'source': jit_s, 'target': jit_t}
        return SyntheticPair(source=source, target=target, flow=flow, valid=valid,
                             kind=kind, params=params)

    def _texture(self, rng: np.random.Generator) -> np.ndarray:
        """A random crop of a random photo, at the output size (an object's texture)."""
        out_h, out_w = self.size
        photo, _ = self._photo(int(rng.integers(len(self.photos))))
        ph, pw = photo.shape[:2]
        cw = max(2, int(pw * rng.uniform(0.3, 1.0)))
        ch = max(2, min(ph, int(cw * out_h / out_w)))
        x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
        return cv2.resize(photo[y0:y0 + ch, x0:x0 + cw], (out_w, out_h), interpolation=cv2.INTER_AREA)

    def pair(self, seed: int, index: int) -> SyntheticPair:
        """The pair number ``index`` of the stream seeded by ``seed`` (order-independent)."""
        return self.sample(np.random.default_rng([int(seed), int(index)]))


class SyntheticPairDataset:
    """A torch-free dataset over a generator: map-style (``ds[i]``) and iterable.

    Pair ``i`` is drawn from ``default_rng([seed, i])``, so it does not depend on which
    worker draws it or in what order; a training loop wanting fresh pairs every epoch can
    use ``seed + epoch``. ``length`` None makes iteration endless (len() then raises).
    """

    def __init__(self, generator: SyntheticPairGenerator, length: int | None = None,
                 seed: int = 0) -> None:
        self.generator = generator
        self.length = length
        self.seed = int(seed)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError('endless dataset has no length')
        return self.length

    def __getitem__(self, index: int) -> SyntheticPair:
        if self.length is not None and not -self.length <= index < self.length:
            raise IndexError(index)
        if index < 0:
            index += self.length
        return self.generator.pair(self.seed, index)

    def __iter__(self) -> Iterator[SyntheticPair]:
        i = 0
        while self.length is None or i < self.length:
            yield self.generator.pair(self.seed, i)
            i += 1


HELDOUT_SEED = 2026


def heldout_pairs(n: int = 50, size: tuple[int, int] = (240, 240), seed: int = HELDOUT_SEED,
                  photos: PhotoSource | Sequence[np.ndarray] | None = None) -> list[SyntheticPair]:
    """THE fixed held-out evaluation set: held-out photos, fixed seed, default recipe.

    Uses every transform kind and photometric jitter, so a score on it reflects matching
    under the appearance changes training sees; pair i is the same whatever ``n`` is.
    """
    photos = PhotoSource(split='heldout') if photos is None else photos
    gen = SyntheticPairGenerator(photos, size=size)
    return [gen.pair(seed, i) for i in range(n)]
