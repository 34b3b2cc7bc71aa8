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


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights(path: str | Path, method: str, verify: bool = True) -> tuple[dict, dict, dict]:
    """(model_config, float32 state_dict, record) of a shipped checkpoint or training state.

    A shipped checkpoint is checked against the sha256 in the JSON beside it (a mismatch
    or a missing record raises, so a truncated download is never used silently); a
    training state (``last.pt`` of a run) carries no record and is accepted as is.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint at {path}')
    obj = torch.load(path, map_location='cpu', weights_only=True)
    fmt = obj.get('format') if isinstance(obj, dict) else None
    if fmt == TRAIN_FORMAT:
        state, model_config, record = obj['model'], obj['config']['model'], {'steps': obj['step']}
        found = obj['method']
    elif fmt == WEIGHTS_FORMAT:
        record_path = path.with_suffix('.json')
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if verify:
            if 'sha256' not in record:
                raise ValueError(f'{path}: no JSON record with a sha256 beside it ({record_path})')
            actual = sha256_of(path)
            if actual != record['sha256']:
                raise ValueError(f'{path}: sha256 {actual} does not match its record '
                                 f'{record["sha256"]}; the file is damaged or was replaced')
        state, model_config, found = obj['state_dict'], obj['model_config'], obj['method']
    else:
        raise ValueError(f'{path} is not a dense_match_ros checkpoint (format {fmt!r})')
    if found != method:
        raise ValueError(f'{path} holds weights for {found!r}, not {method!r}')
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    return model_config, state, record
