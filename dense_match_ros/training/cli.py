"""``dense-match-train``: train a registered method, or export a run's shipped weights.

Examples::

    dense-match-train hilm --config config/train_hilm_cpu.yaml --out runs/hilm_cpu
    dense-match-train hilm --steps 20 --set data.image_size=[64,64]      # a smoke run
    torchrun --nproc_per_node 4 -m dense_match_ros.training.cli hilm --config ...  # DDP
    python3 -m dense_match_ros.training.cli dgc --config config/train_dgc_gpu.yaml \\
        --out runs/dgc_gpu --set data.photos=gpu_carry/train_pack --minutes 8   # GPU, no PyYAML
    dense-match-train export runs/hilm_cpu --out dense_match_ros/weights/hilm_cpu.pt \\
        --eval-json runs/eval/hilm_cpu.json
    dense-match-train average --member A.pt --member B.pt --out AB.pt   # parameters averaged

A run resumes from ``OUT/last.pt`` unless ``--fresh`` is given; ``--stop-at`` ends it early
(the schedule still spans ``--steps``), which is how an interruption is reproduced in tests.
``--minutes M`` (config ``minutes``) trains for M minutes of wall time in all, the resumed
sessions included, with the cosine over that budget. A fresh run starts from another run's
or a shipped checkpoint's weights with ``--set model.init_weights=PATH`` (dgc, neuflow).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from dense_match_ros.core.checkpoint import read_record, write_record
from dense_match_ros.training import config as cfgmod
from dense_match_ros.training.tasks import available_tasks


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='dense-match-train', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('method', help=f'one of: {", ".join(available_tasks())}, "export" or "average"')
    p.add_argument('--config', type=Path, default=None,
                   help='YAML training config (JSON plus # lines without PyYAML)')
    p.add_argument('--out', type=Path, default=None, help='run folder (default runs/METHOD)')
    p.add_argument('--steps', type=int, default=None, help='total steps of the schedule')
    p.add_argument('--stop-at', type=int, default=None, help='stop (and save) at this step')
    p.add_argument('--minutes', type=float, default=None,
                   help='wall-clock budget of the whole run (cosine over it; 0: use --steps)')
    p.add_argument('--batch-size', type=int, default=None)
    p.add_argument('--seed', type=int, default=None)
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='override a config entry, e.g. optim.lr=5e-4 (repeatable)')
    p.add_argument('--fresh', action='store_true', help='ignore OUT/last.pt and start over')
    p.add_argument('--device', default='auto', help='auto, cpu or cuda (DDP: one GPU per rank)')
    p.add_argument('--no-progress', action='store_true')
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='dense-match-train export',
                                description='write shipped weights + JSON record from a run')
    p.add_argument('run', type=Path, help='run folder (holding last.pt) or a training state file')
    p.add_argument('--out', type=Path, required=True, help='weights file to write (.pt)')
    p.add_argument('--fp32', action='store_true', help='keep float32 (default: fp16)')
    p.add_argument('--eval-json', type=Path, nargs='*', default=[],
                   help='dense-match-eval --json records to embed (figures of these weights)')
    p.add_argument('--note', default='', help='free text for the record')
    return p


def _command(argv: Sequence[str]) -> str:
    return 'dense-match-train ' + ' '.join(shlex.quote(a) for a in argv)


def train_main(argv: Sequence[str]) -> int:
    args = _train_parser().parse_args(argv)
    values = cfgmod.load_yaml(args.config) if args.config else {}
    values = cfgmod.apply_overrides(values, args.overrides)
    if values.get('method', args.method) != args.method:
        raise SystemExit(f'{args.config} is a {values["method"]} config, not {args.method}')
    values['method'] = args.method
    for key in ('steps', 'minutes', 'batch_size', 'seed'):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    config = cfgmod.from_dict(values)
    from dense_match_ros.training.loop import train
    out = args.out or Path('runs') / args.method
    summary = train(config, out, resume=not args.fresh, stop_at=args.stop_at,
                    device=args.device, progress=not args.no_progress,
                    command=_command(argv))
    if os.environ.get('RANK', '0') == '0':
        print(json.dumps(summary))
    return 0


def _eval_summary(path: Path) -> dict:
    """The per-set summaries of a dense-match-eval record (not the per-pair rows)."""
    record = json.loads(path.read_text())
    sets = {}
    for name, entry in (record.get('sets') or {}).items():
        if isinstance(entry, dict):
            sets[name] = {k: v for k, v in entry.items() if k not in ('rows', 'pairs', 'pck_curve')}
    return {'file': str(path), 'method': record.get('method'), 'weights': record.get('weights'),
            'command': record.get('command'), 'sets': sets}


PARENT_KEYS = ('init_weights', 'affine_weights')
"""Model keys naming the checkpoint a run started from, in order of preference (a
``cnngeo-tps`` run starts from its affine stage's run)."""


def stages_after(init: str | None, this: dict) -> list[dict]:
    """Every training stage behind weights trained from ``init``: the stages of that
    checkpoint, then ``this`` one. A shipped checkpoint lists them in its record; a run's
    training state (a stage that was never exported, such as a ``cnngeo-affine`` run under
    a TPS stage) gives its own summary after the stages of the checkpoint it started from.
    Also used for weights that came back without their training state
    (``scripts/attach_eval.py``)."""
    earlier: list[dict] = []
    before = read_record(init) if init else {}
    if before:
        earlier = before.get('stages') or [{k: before.get(k) for k in
                                            ('command', 'steps', 'wall_time_s', 'evaluation')}]
    elif init:
        from dense_match_ros.training import checkpoint as ckpt
        try:
            state = ckpt.load_training_state(init)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError):
            state = None  # not a training state either: the path alone says where it began
        if state is not None and 'config' in state:
            earlier = _stages(state, ckpt.run_summary(state))
    return earlier + [{**this, 'init_weights': init}]


def _stages(state: dict, this: dict) -> list[dict]:
    """:func:`stages_after` the checkpoint the run started from (:data:`PARENT_KEYS`)."""
    model = state['config'].get('model') or {}
    return stages_after(next((model[k] for k in PARENT_KEYS if model.get(k)), None), this)


def export_main(argv: Sequence[str]) -> int:
    args = _export_parser().parse_args(argv)
    from dense_match_ros.training import checkpoint as ckpt
    from dense_match_ros.training.loop import LAST
    state_path = args.run / LAST if args.run.is_dir() else args.run
    state = ckpt.load_training_state(state_path)
    extra = state.get('extra') or {}
    data = state['config']['data']
    try:
        from dense_match_ros.training.batches import make_generator
        from dense_match_ros.training.config import DataConfig
        photos = make_generator(DataConfig(**{k: tuple(v) if isinstance(v, list) and k != 'photos'
                                              else v for k, v in data.items()})).photos.photos
        data_desc = {**data, 'photos_root': str(getattr(photos, 'root', None)),
                     'photo_count': len(photos), 'split': 'train (held-out photos excluded)'}
    except Exception as exc:  # the record is still useful without the photo count
        data_desc = {**data, 'photos_error': str(exc)}
    record = {
        'command': extra.get('command'),
        'export_command': _command(['export', *argv]),
        'config': state['config'],
        'data': data_desc,
        'wall_time_s': state['wall_time_s'],
        'device': extra.get('device'),
        'world_size': extra.get('world_size', 1),
        'exported_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
        'evaluation': [_eval_summary(p) for p in args.eval_json],
        'note': args.note,
    }
    world = int(extra.get('world_size', 1) or 1)
    record['stages'] = _stages(state, {
        **ckpt.run_summary(state),
        'pairs': int(state['step']) * int(state['config'].get('batch_size', 0)) * world,
        'evaluation': record['evaluation']})
    previous = read_record(args.out)
    record = ckpt.export_weights(state, args.out, record, half=not args.fp32)
    if previous.get('calibration') and previous.get('sha256') == record['sha256']:
        # Re-exporting the same weights (to embed figures) keeps their fitted calibration.
        record['calibration'] = previous['calibration']
        write_record(args.out, record)
    print(json.dumps({k: record[k] for k in ('file', 'steps', 'dtype', 'bytes', 'sha256')}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == 'export':
        return export_main(argv[1:])
    if argv and argv[0] == 'average':
        from dense_match_ros.training.averaging import main as average_main
        return average_main(argv[1:])
    return train_main(argv)


if __name__ == '__main__':
    sys.exit(main())
