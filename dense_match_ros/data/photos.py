"""Photos to warp into synthetic training pairs, with a fixed train / held-out split.

Synthetic pairs are only as varied as the photos behind them, so the source looks in
``../shared/train_images/`` first (1500 real photos; ``DENSE_MATCH_TRAIN_IMAGES`` points
elsewhere), then OpenCV's sample pictures, and finally scikit-image's bundled photos, which
ship with a dependency and therefore always exist: the pipeline runs everywhere, even if the
photos it trains on are then few.

The evaluation sets (``../shared/data``: Sintel, TUM, Middlebury, HPatches) are never photos:
training on them would leak into every real-data number. Folders that contain them are
refused, and the scikit-image fallback skips its Middlebury 'motorcycle' stereo pair.

The split is a hash of each file's path relative to its folder (not of its position in a
listing), so adding or removing photos never moves another photo across the split, and
every machine draws the same held-out set.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from dense_match_ros import paths

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp')
SPLITS = ('all', 'train', 'heldout')
ENV_VAR = 'DENSE_MATCH_TRAIN_IMAGES'
OPENCV_SAMPLES = Path('/usr/share/doc/opencv-doc/examples/data')
# scikit-image's bundled natural photos (the rest are drawings, charts, micrographs, or
# the Middlebury 'motorcycle' pair that is evaluation data).
SKIMAGE_PHOTOS = ('astronaut.png', 'brick.png', 'camera.png', 'chelsea.png', 'coffee.png',
                  'coins.png', 'grass.png', 'gravel.png', 'rocket.jpg')
# Names of evaluation data that must never be used as training photos.
_RESERVED_PARTS = ('sintel', 'tum_fr3', 'middlebury', 'hpatches', 'motorcycle_')
# OpenCV's samples hold Middlebury (aloe, rubberwhale, basketball, tsukuba) and Oxford-affine
# (graf, leuven, the HPatches ancestors) frames, and calibration chessboards: not photos here.
_OPENCV_EXCLUDED_PREFIXES = ('aloe', 'rubberwhale', 'basketball', 'tsukuba', 'graf', 'leuven',
                             'chessboard', 'left0', 'left1', 'right0', 'right1')


def default_folders() -> list[Path]:
    """Candidate photo folders in priority order (existing or not)."""
    first = Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else \
        paths.shared_root() / 'train_images'
    folders = [first, OPENCV_SAMPLES]
    try:
        import skimage
        folders.append(Path(skimage.__file__).parent / 'data')
    except ImportError:  # pragma: no cover - scikit-image is in the venv
        pass
    return folders


def original_key(key: str) -> str:
    """The relative path a ``train_pack/`` file stands for (its name spells '/' as '__').

    The pack is ``train_images/`` flattened for the GPU machine; splitting on the original
    path keeps every photo on the same side of the split in both layouts, whichever sampler
    reads them, so the held-out synthetic set stays unseen by training on either.
    """
    return key.replace('__', '/')


def heldout_score(key: str) -> float:
    """Deterministic value in [0, 1) from a file key (read through :func:`original_key`);
    keys under the fraction are held out."""
    digest = hashlib.sha256(original_key(key).encode('utf-8')).digest()
    return int.from_bytes(digest[:8], 'big') / 2.0 ** 64


def _is_reserved(path: Path) -> bool:
    lowered = str(path).lower()
    if any(part in lowered for part in _RESERVED_PARTS):
        return True
    shared_data = paths.data_root().resolve()
    try:
        path.resolve().relative_to(shared_data)
        return True
    except ValueError:
        return False


def _scan(folder: Path) -> list[tuple[str, Path]]:
    """(key, path) of every photo under ``folder``, recursively, sorted by key."""
    if not folder.is_dir():
        return []
    is_skimage = folder.name == 'data' and folder.parent.name == 'skimage'
    is_opencv = folder.resolve() == OPENCV_SAMPLES.resolve()
    found = []
    for path in folder.rglob('*'):
        if path.suffix.lower() not in EXTENSIONS or not path.is_file():
            continue
        if is_skimage and path.name not in SKIMAGE_PHOTOS:
            continue
        if is_opencv and path.name.lower().startswith(_OPENCV_EXCLUDED_PREFIXES):
            continue
        key = path.relative_to(folder).as_posix()
        if _is_reserved(Path(key)):
            continue
        found.append((key, path))
    return sorted(found)


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode any image OpenCV reads into HxWx3 RGB uint8 (grey replicated, alpha dropped)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise OSError(f'cannot decode image {path}')
    if image.dtype != np.uint8:  # 16-bit PNG/PPM
        image = (image.astype(np.float32) * (255.0 / np.iinfo(image.dtype).max)).round().astype(np.uint8)
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_short_side(image: np.ndarray, short_side: int | None, upscale: bool = False) -> np.ndarray:
    """Resize so the shorter side is ``short_side`` (anti-aliased); None keeps the size."""
    if not short_side:
        return image
    h, w = image.shape[:2]
    scale = short_side / min(h, w)
    if scale >= 1.0 and not upscale or abs(scale - 1.0) < 1e-9:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
    return cv2.resize(image, size, interpolation=interp)


class PhotoSource:
    """An indexable, deterministic list of photos from one folder tree.

    ``folders`` None: the first of :func:`default_folders` that holds any photo. An explicit
    list uses all of them (keys are prefixed by the folder name to stay unique).
    ``split`` is 'all', 'train' or 'heldout'; ``heldout_fraction`` of the keys (by hash) are
    held out, and at least one whenever the tree has two photos or more, so that a tiny
    fallback folder still yields a non-empty held-out set.
    """

    def __init__(self, folders: str | Path | Sequence[str | Path] | None = None,
                 split: str = 'all', short_side: int | None = 480,
                 heldout_fraction: float = 0.1, upscale: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        self.split = split
        self.short_side = short_side
        self.upscale = upscale
        self.heldout_fraction = float(heldout_fraction)
        entries = self._collect(folders)
        if not entries:
            raise FileNotFoundError(f'no photos ({", ".join(EXTENSIONS)}) found in '
                                    f'{folders if folders is not None else default_folders()}')
        heldout = self._heldout_keys([k for k, _ in entries])
        if split == 'train':
            entries = [e for e in entries if e[0] not in heldout]
        elif split == 'heldout':
            entries = [e for e in entries if e[0] in heldout]
        self.keys = [k for k, _ in entries]
        self.paths = [p for _, p in entries]

    def _collect(self, folders) -> list[tuple[str, Path]]:
        if folders is None:
            for folder in default_folders():
                if _is_reserved(folder):
                    continue
                entries = _scan(folder)
                if entries:
                    self.root = folder
                    return entries
            return []
        if isinstance(folders, (str, Path)):
            folders = [folders]
        folders = [Path(f) for f in folders]
        for folder in folders:
            if _is_reserved(folder):
                raise ValueError(f'{folder} holds evaluation data; it cannot be a photo source')
        self.root = folders[0] if len(folders) == 1 else None
        if len(folders) == 1:
            return _scan(folders[0])
        merged = []
        for folder in folders:
            merged += [(f'{folder.name}/{k}', p) for k, p in _scan(folder)]
        return sorted(merged)

    def _heldout_keys(self, keys: Iterable[str]) -> set[str]:
        keys = list(keys)
        scores = {k: heldout_score(k) for k in keys}
        held = {k for k, s in scores.items() if s < self.heldout_fraction}
        if not held and len(keys) >= 2 and self.heldout_fraction > 0:
            held = {min(keys, key=scores.__getitem__)}
        if len(held) == len(keys) and len(keys) >= 2:
            held.discard(max(held, key=scores.__getitem__))
        return held

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        """The photo as RGB uint8, resized to ``short_side`` (never enlarged unless asked)."""
        return resize_short_side(read_rgb(self.paths[index]), self.short_side, self.upscale)

    def __repr__(self) -> str:
        return (f'PhotoSource({len(self)} photos, split={self.split!r}, '
                f'root={str(getattr(self, "root", None))!r})')
