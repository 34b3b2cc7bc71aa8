"""``dense-match-make-pairs``: write synthetic pairs to disk (PNG + .npz + index.json).

Writing pairs out makes a data set inspectable (look at the PNGs), shareable with tools that
know nothing of this package, and fixed: ``--split heldout`` with the default seed writes
exactly :func:`heldout_pairs`, pair for pair.

Layout of OUT::

    index.json            settings + one entry per pair (file names, kind, params)
    000000_source.png     RGB
    000000_target.png     RGB
    000000_flow.npz       flow float32 HxWx2 (source grid, pixels), valid bool HxW

:func:`load_pairs` reads such a folder back into :class:`SyntheticPair` objects.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from dense_match_ros.data.photos import PhotoSource
from dense_match_ros.data.synthetic import (DEFAULT_KINDS, HELDOUT_SEED, KINDS, SyntheticPair,
                                            SyntheticPairGenerator)

INDEX = 'index.json'
FORMAT_VERSION = 1


def _write_png(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f'could not write {path}')


def write_pairs(out: str | Path, n: int, size: tuple[int, int], seed: int,
                kinds: Sequence[str] = DEFAULT_KINDS, split: str = 'train',
                photos: str | Path | None = None, photometric: bool = True,
                progress: bool = True) -> Path:
    """Generate and write ``n`` pairs; returns the path of the index file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = PhotoSource(photos, split=split)
    gen = SyntheticPairGenerator(source, size=size, kinds=kinds, photometric=photometric)
    entries = []
    indices = range(n)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc=f'pairs -> {out}', unit='pair')
    for i in indices:
        pair = gen.pair(seed, i)
        stem = f'{i:06d}'
        _write_png(out / f'{stem}_source.png', pair.source)
        _write_png(out / f'{stem}_target.png', pair.target)
        np.savez_compressed(out / f'{stem}_flow.npz', flow=pair.flow, valid=pair.valid)
        entries.append({'source': f'{stem}_source.png', 'target': f'{stem}_target.png',
                        'flow': f'{stem}_flow.npz', 'kind': pair.kind,
                        'valid_fraction': float(pair.valid.mean()), 'params': pair.params})
    index = {'format_version': FORMAT_VERSION, 'n': n, 'size_hw': list(size), 'seed': seed,
             'kinds': list(kinds), 'split': split, 'photometric': bool(photometric),
             'photo_root': str(getattr(source, 'root', None)), 'num_photos': len(source),
             'flow_convention': 'flow on the source grid in pixels: source (x, y) <-> '
                                'target (x + u, y + v); valid = lands inside the target',
             'pairs': entries}
    path = out / INDEX
    path.write_text(json.dumps(index, indent=1))
    return path


def load_pairs(folder: str | Path) -> list[SyntheticPair]:
    """Read a folder written by :func:`write_pairs` back into memory."""
    folder = Path(folder)
    index = json.loads((folder / INDEX).read_text())
    pairs = []
    for e in index['pairs']:
        src = cv2.cvtColor(cv2.imread(str(folder / e['source']), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        tgt = cv2.cvtColor(cv2.imread(str(folder / e['target']), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        with np.load(folder / e['flow']) as data:
            flow, valid = data['flow'], data['valid']
        pairs.append(SyntheticPair(source=src, target=tgt, flow=flow, valid=valid,
                                   kind=e['kind'], params=e['params']))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='dense-match-make-pairs', description=__doc__.split('\n')[0])
    p.add_argument('out', type=Path, help='output folder (created)')
    p.add_argument('--n', type=int, default=50, help='number of pairs (default: 50)')
    p.add_argument('--size', type=int, nargs=2, default=(240, 240), metavar=('H', 'W'),
                   help='output image size, height then width (default: 240 240)')
    p.add_argument('--seed', type=int, default=None,
                   help=f'seed (default: {HELDOUT_SEED} for --split heldout, 0 for train)')
    p.add_argument('--kinds', nargs='+', choices=KINDS, default=list(DEFAULT_KINDS),
                   help=f'transform families to draw from (default: {" ".join(DEFAULT_KINDS)})')
    p.add_argument('--split', choices=('train', 'heldout'), default='train',
                   help='which photos to use (default: train)')
    p.add_argument('--photos', type=Path, default=None,
                   help='photo folder (default: ../shared/train_images, then fallbacks)')
    p.add_argument('--no-photometric', action='store_true', help='disable photometric jitter')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 0:
        raise SystemExit('--n must be >= 0')
    seed = args.seed if args.seed is not None else (HELDOUT_SEED if args.split == 'heldout' else 0)
    path = write_pairs(args.out, args.n, tuple(args.size), seed, kinds=args.kinds,
                       split=args.split, photos=args.photos,
                       photometric=not args.no_photometric, progress=not args.quiet)
    print(f'wrote {args.n} pairs and {path}')
    return 0


if __name__ == '__main__':  # pragma: no cover
    raise SystemExit(main())
