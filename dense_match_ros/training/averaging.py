"""``dense-match-train average``: one checkpoint whose parameters are a weighted mean of several.

Runs fine-tuned from one checkpoint on different data mixtures each win on some sets and lose
on others (the dmp stages of README, "Weight averaging"). Their parameters still lie in one
basin, so a point between them is itself a working network, and often keeps what each run
gained: weight-space averaging, as in model soups (Wortsman et al. 2022) and WiSE-FT. It costs
no training, so it is measured before another run is started.

Members must hold the same method and the same tensors (names and shapes); integer buffers
(BatchNorm's counter) are taken from the first member. The result is written in the shipped
format (fp16) with a record naming every member and its weight; a calibration table is not
carried over, since the averaged network's confidence is a new one to fit.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from dense_match_ros.core.checkpoint import (CheckpointError, checkpoint_method, load_weights,
                                             read_record)

PROG = 'dense-match-train average'


def average_states(states: Sequence[dict], weights: Sequence[float]) -> dict:
    """The weighted mean of float tensors across ``states`` (weights normalised to sum 1);
    other tensors from the first state. Every state must hold the same names and shapes."""
    if len(states) != len(weights) or not states:
        raise ValueError('one weight per member, and at least one member')
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f'member weights must be non-negative with a positive sum, got {list(weights)}')
    first = states[0]
    for i, state in enumerate(states[1:], start=1):
        if state.keys() != first.keys():
            missing = sorted(set(first) ^ set(state))[:4]
            raise ValueError(f'member {i} holds other tensors than member 0 (e.g. {missing})')
        for key, tensor in state.items():
            if tensor.shape != first[key].shape:
                raise ValueError(f'member {i}: {key} has shape {tuple(tensor.shape)}, '
                                 f'expected {tuple(first[key].shape)} (member 0)')
    out = {}
    for key, tensor in first.items():
        if tensor.is_floating_point():
            out[key] = sum((w / total) * s[key].double() for s, w in zip(states, weights)).float()
        else:
            out[key] = tensor.clone()
    return out


def _provenance(path: str, record: dict) -> dict:
    """How a member was made: its training stages' commands (their figures stay in the
    member's own record, which its sha256 names)."""
    shipped = read_record(path)
    if shipped:
        stages = [{k: st.get(k) for k in ('command', 'steps', 'wall_time_s', 'init_weights')}
                  for st in shipped.get('stages') or []]
        return {'weights': path, 'sha256': shipped.get('sha256'), 'command': shipped.get('command'),
                'stages': stages}
    return {'weights': path, 'steps': record.get('steps')}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--member', action='append', required=True,
                   help='a checkpoint to average (shipped weights or a run\'s last.pt); twice or more')
    p.add_argument('--weight', action='append', type=float, default=None,
                   help='one per --member, in order (normalised to sum 1); default: equal')
    p.add_argument('--out', required=True, type=Path, help='shipped-format weights to write (fp16)')
    p.add_argument('--fp32', action='store_true', help='keep float32 instead of fp16')
    p.add_argument('--note', default='')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dense_match_ros.training import checkpoint as ckpt
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if len(args.member) < 2:
        raise SystemExit(f'{PROG}: give at least two --member checkpoints')
    weights = args.weight or [1.0] * len(args.member)
    if len(weights) != len(args.member):
        raise SystemExit(f'{PROG}: {len(args.member)} members but {len(weights)} weights')
    method = checkpoint_method(args.member[0])
    if method is None:
        if not Path(args.member[0]).is_file():
            raise FileNotFoundError(f'no checkpoint at {args.member[0]}')
        raise CheckpointError(f'{args.member[0]} is not a dense_match_ros checkpoint '
                              '(unreadable, or it names no method)')
    loaded = [load_weights(m, method) for m in args.member]
    state = average_states([s for _, s, _ in loaded], weights)
    total = float(sum(weights))
    record = {
        'command': 'dense-match-train average ' + ' '.join(argv),
        'note': args.note,
        'average': [{**_provenance(m, rec), 'weight': w / total}
                    for m, (_, _, rec), w in zip(args.member, loaded, weights)],
    }
    out = ckpt.export_weights({'model': state, 'method': method,
                               'config': {'model': loaded[0][0]}, 'step': 0},
                              args.out, record, half=not args.fp32)
    print(json.dumps({k: out[k] for k in ('file', 'method', 'dtype', 'sha256', 'bytes')}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
