"""Reading the package's checkpoints: what a matcher needs at run time, with no training code.

Two formats, written by :mod:`dense_match_ros.training.checkpoint`:

* the *training state* (``<run>/last.pt``): model, optimiser, schedule, step, RNG states
  and the resolved config of a run;
* the *shipped weights* (``<name>.pt`` + ``<name>.json``): model weights (fp16 by default),
  the model config, and beside it a JSON record whose ``sha256`` is checked on every load.

Both load with ``torch.load(weights_only=True)``: only tensors and plain containers, never
pickled code.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

TRAIN_FORMAT = 'dense_match_ros.train_state/1'
WEIGHTS_FORMAT = 'dense_match_ros.weights/1'


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint of this package; the text names the file, what
    is wrong with it and which formats are expected."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def read_record(weights: str | Path) -> dict:
    """The JSON record beside a checkpoint file (``W.pt`` -> ``W.json``); empty when it has
    none yet."""
    path = Path(weights).with_suffix('.json')
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(weights: str | Path, record: dict) -> Path:
    """Write ``record`` as the JSON beside a checkpoint file; returns its path."""
    path = Path(weights).with_suffix('.json')
    path.write_text(json.dumps(record, indent=2) + '\n')
    return path


def checkpoint_method(path: str | Path) -> str | None:
    """The ``method`` a checkpoint file (shipped weights or a run's ``last.pt``) says it holds,
    read without checking it (None: unreadable or not ours; :func:`load_weights` then gives
    the proper error)."""
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:
        return None
    method = obj.get('method') if isinstance(obj, dict) else None
    return method if isinstance(method, str) else None


def load_weights(path: str | Path, method: str, verify: bool = True) -> tuple[dict, dict, dict]:
    """(model_config, float32 state_dict, record) of a shipped checkpoint or training state.

    A shipped checkpoint is checked against the sha256 in the JSON beside it (a mismatch
    or a missing record raises, so a truncated download is never used silently); a
    training state (``last.pt`` of a run) carries no record and is accepted as is.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint at {path}')
    expected = (f'expected a {method} checkpoint of this package: shipped weights '
                f'({WEIGHTS_FORMAT}, e.g. dense_match_ros/weights/{method}_cpu.pt) or a '
                f"training run's last.pt ({TRAIN_FORMAT})")
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # pickle, zip and EOF errors alike: the file is not ours
        # torch's own message may advise weights_only=False, which must never be followed
        # for a file of unknown origin, so it is not passed on.
        raise CheckpointError(f'{path} is not a dense_match_ros checkpoint ({type(exc).__name__} '
                              f'while reading it); {expected}') from None
    fmt = obj.get('format') if isinstance(obj, dict) else None
    try:
        if fmt == TRAIN_FORMAT:
            state, model_config = obj['model'], obj['config']['model']
            record, found = {'steps': obj['step']}, obj['method']
        elif fmt == WEIGHTS_FORMAT:
            state, model_config, found = obj['state_dict'], obj['model_config'], obj['method']
            record = read_record(path)
            if verify:
                if 'sha256' not in record:
                    raise CheckpointError(f'{path}: no JSON record with a sha256 beside it '
                                          f"({path.with_suffix('.json')})")
                actual = sha256_of(path)
                if actual != record['sha256']:
                    raise CheckpointError(f'{path}: sha256 {actual} does not match its record '
                                          f'{record["sha256"]}; the file is damaged or was replaced')
        else:
            raise CheckpointError(f'{path} is not a dense_match_ros checkpoint (format {fmt!r}); '
                                  f'{expected}')
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f'{path} is a {fmt} file without its {exc} entry; {expected}') from None
    if found != method:
        raise CheckpointError(f'{path} holds weights for {found!r}, not {method!r}')
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    return model_config, state, record


def load_trunk(backbone: torch.nn.Module, path: str | Path, what: str = '') -> None:
    """Load the ``backbone.*`` weights of any checkpoint (a trained ``hilm`` of the same width)
    into ``backbone``: without ImageNet weights, the project's own trained trunk is the only
    meaningful start for a network that builds on a frozen one. ValueError when the file holds
    no trunk or one of another shape."""
    obj = torch.load(path, map_location='cpu', weights_only=True)
    state = obj.get('state_dict') or obj.get('model') or obj
    trunk = {k[len('backbone.'):]: v.float() if v.is_floating_point() else v
             for k, v in state.items() if k.startswith('backbone.')}
    if not trunk:
        raise ValueError(f'{path} holds no backbone.* weights')
    try:
        backbone.load_state_dict(trunk)
    except RuntimeError as exc:
        raise ValueError(f'{path}: its trunk does not fit {what or "this network"}: '
                         f'{str(exc)[:300]}') from None
