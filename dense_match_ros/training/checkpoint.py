"""Writing the resumable training state and exporting the small shipped checkpoint.

The reader of both formats, which a matcher needs at run time, is
:mod:`dense_match_ros.core.checkpoint` (re-exported here for training code).

Two formats:

* the *training state* (``<run>/last.pt``): model, optimiser, schedule, step, torch RNG
  states and the resolved config -- everything an exact resume needs (batches are addressed
  by step, see :mod:`.batches`, so no data-loader state is needed);
* the *shipped weights* (``<name>.pt`` + ``<name>.json``): model weights only (fp16 by
  default), the model config, and beside it a JSON record whose ``sha256`` is checked on
  every load.

Both are written atomically (temp file + rename), so a run killed mid-save leaves the
previous checkpoint intact, and both load with ``torch.load(weights_only=True)``: only
tensors and plain containers, never pickled code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dense_match_ros.core.checkpoint import (TRAIN_FORMAT, WEIGHTS_FORMAT, load_weights,  # noqa: F401
                                             sha256_of, write_record)



def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, 'module') else model


def save_training_state(path: str | Path, *, method: str, step: int, config: dict,
                        model: torch.nn.Module, optimizer, scheduler, wall_time_s: float,
                        extra: dict | None = None) -> None:
    state = {
        'format': TRAIN_FORMAT,
        'method': method,
        'step': int(step),
        'config': config,
        'model': unwrap(model).state_dict(),
        'optimizer': optimizer.state_dict(),
        'scheduler': scheduler.state_dict(),
        'torch_rng': torch.get_rng_state(),
        'cuda_rng': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'wall_time_s': float(wall_time_s),
        'extra': extra or {},
    }
    _atomic_save(state, Path(path))


def load_training_state(path: str | Path, map_location: str | torch.device = 'cpu') -> dict:
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get('format') != TRAIN_FORMAT:
        raise ValueError(f'{path} is not a training state ({state.get("format")!r})')
    return state


def run_summary(state: dict) -> dict:
    """A training state's command, steps and wall-clock minutes: what a record's stage chain
    says of the run that made a checkpoint."""
    return {'command': (state.get('extra') or {}).get('command'), 'steps': int(state['step']),
            'minutes': round(float(state['wall_time_s']) / 60.0, 1)}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state['torch_rng'].cpu())
    if state.get('cuda_rng') and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda_rng']])


def export_weights(state: dict, out_path: str | Path, record: dict, half: bool = True) -> dict:
    """Write shipped weights from a training state, and the JSON record beside them.

    Floating tensors become fp16 when ``half`` (integer buffers such as BatchNorm's counter
    stay as they are). Returns the record as written (with ``sha256`` and ``bytes``).
    """
    out_path = Path(out_path)
    weights = {}
    for key, tensor in state['model'].items():
        tensor = tensor.detach().cpu()
        weights[key] = tensor.half() if half and tensor.is_floating_point() else tensor
    _atomic_save({'format': WEIGHTS_FORMAT, 'method': state['method'],
                  'model_config': state['config']['model'], 'step': state['step'],
                  'dtype': 'float16' if half else 'float32', 'state_dict': weights}, out_path)
    record = dict(record)
    record.update({'file': out_path.name, 'method': state['method'], 'steps': state['step'],
                   'dtype': 'float16' if half else 'float32',
                   'sha256': sha256_of(out_path), 'bytes': out_path.stat().st_size})
    write_record(out_path, record)
    return record
