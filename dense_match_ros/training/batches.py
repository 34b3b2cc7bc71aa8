"""Training batches of synthetic pairs made on the CPU, addressed by step number.

Batch ``step`` of process ``rank`` is drawn from ``default_rng([seed, step, rank])`` and
nothing else, so a run resumed at step k sees exactly the batches an uninterrupted run
would have, whatever the number of loader workers, and DDP ranks never see the same pair.

A *batch source* of the loop is a callable ``(start, end) -> iterable of batches`` for the
steps ``start .. end-1``, each batch holding its ``step``: :func:`cpu_batches` here
(``data.sampler: cpu``) or :class:`.gpu_pairs.DeviceBatches` (``data.sampler: device``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from dense_match_ros.data.photos import PhotoSource
from dense_match_ros.data.synthetic import RANGES, SyntheticPair, SyntheticPairGenerator
from dense_match_ros.training.config import DataConfig, TrainConfig
from dense_match_ros.training.tasks import TrainTask

BatchSource = Callable[[int, int], Iterable[dict]]


class CachedPhotos:
    """A PhotoSource that decodes each photo once (per process) and keeps it.

    Decoding a JPEG costs more than rendering a small warped pair, so without this the
    CPU would spend most of a step in libjpeg.
    """

    def __init__(self, photos: PhotoSource) -> None:
        self.photos = photos
        self.keys = photos.keys
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, index: int) -> np.ndarray:
        image = self._cache.get(index)
        if image is None:
            image = self._cache[index] = self.photos[index]
        return image


def make_generator(data: DataConfig) -> SyntheticPairGenerator:
    """The training pair generator: TRAIN split only (the held-out photos stay unseen)."""
    if data.ranges not in RANGES:
        raise ValueError(f'data.ranges must be one of {sorted(RANGES)}, got {data.ranges!r}')
    ranges = RANGES[data.ranges]
    photos = PhotoSource(folders=data.photos, split='train', short_side=data.photo_short_side)
    return SyntheticPairGenerator(CachedPhotos(photos), size=tuple(data.image_size),
                                  kinds=tuple(data.kinds), photometric=data.photometric,
                                  crop_scale=tuple(data.crop_scale),
                                  kind_weights=data.kind_weights, objects=data.objects,
                                  affine=ranges.affine, tps_jitter=ranges.tps_jitter)


def collate(pairs: Sequence[SyntheticPair]) -> dict[str, torch.Tensor]:
    """Stack pairs: images stay uint8 (B, 3, H, W) until the device, flow (B, H, W, 2)."""
    return {
        'source': torch.from_numpy(np.stack([p.source for p in pairs])).permute(0, 3, 1, 2).contiguous(),
        'target': torch.from_numpy(np.stack([p.target for p in pairs])).permute(0, 3, 1, 2).contiguous(),
        'flow': torch.from_numpy(np.stack([p.flow for p in pairs])),
        'valid': torch.from_numpy(np.stack([p.valid for p in pairs])),
    }


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose index is the global step."""

    def __init__(self, generator: SyntheticPairGenerator, task: TrainTask, loss_config: dict,
                 batch_size: int, seed: int, rank: int = 0) -> None:
        self.generator = generator
        self.task = task
        self.loss_config = loss_config
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)

    def __len__(self) -> int:  # addressed by step; the sampler decides which steps
        return 2 ** 62

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(step), self.rank])
        pairs = [self.generator.sample(rng) for _ in range(self.batch_size)]
        batch = collate(pairs)
        for key, value in self.task.extra_batch(pairs, rng, self.loss_config).items():
            batch[key] = torch.as_tensor(value)
        batch['step'] = torch.tensor(int(step))
        return batch


def worker_init(_worker_id: int) -> None:
    # Each loader worker makes whole batches; nested thread pools would only fight.
    import cv2
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def cpu_batches(config: TrainConfig, task: TrainTask, rank: int, device: torch.device) -> BatchSource:
    """The ``cpu`` batch source: a DataLoader over :class:`StepBatches` for the steps asked."""
    dataset = StepBatches(make_generator(config.data), task, config.loss, config.batch_size,
                          config.seed, rank)
    workers = config.data.workers

    def batches(start: int, end: int) -> Iterable[dict]:
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=range(start, end), num_workers=workers,
            worker_init_fn=worker_init if workers else None, pin_memory=device.type == 'cuda',
            prefetch_factor=4 if workers else None, persistent_workers=False)
    return batches
