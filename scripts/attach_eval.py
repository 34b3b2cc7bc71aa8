#!/usr/bin/env python3
"""Put evaluation figures and a note into the JSON record of exported weights, for weights
that came back without their training state (a GPU snapshot: scripts/gpu_train_dgc.sh).

    python scripts/attach_eval.py WEIGHTS.pt --init INIT.pt --eval-json A.json B.json --note TEXT

The weights are not touched (their sha256 stays valid). The record gets ``evaluation`` (the
per-set summaries of the dense-match-eval records, as ``dense-match-train export
--eval-json`` writes them), ``note``, and ``stages``: INIT's stages (the checkpoint the run
started from) followed by this one, with its command, steps, minutes, pairs and figures.
"""
import argparse
import json
from pathlib import Path

from dense_match_ros.training.cli import _eval_summary, stages_after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('weights', type=Path)
    parser.add_argument('--init', type=Path, required=True, help='weights the run started from')
    parser.add_argument('--eval-json', type=Path, nargs='+', default=[])
    parser.add_argument('--note', default='')
    args = parser.parse_args()
    path = args.weights.with_suffix('.json')
    record = json.loads(path.read_text())
    record['evaluation'] = [_eval_summary(p) for p in args.eval_json]
    record['note'] = args.note
    batch = int(record['config'].get('batch_size', 0))
    record['stages'] = stages_after(str(args.init), {
        'command': record.get('command'), 'steps': int(record['steps']),
        'minutes': round(float(record['wall_time_s']) / 60.0, 1),
        'pairs': int(record['steps']) * batch * int(record.get('world_size', 1) or 1),
        'device': record.get('device'), 'evaluation': record['evaluation']})
    path.write_text(json.dumps(record, indent=2) + '\n')
    print(f'{path}: {len(record["stages"])} stages, {len(record["evaluation"])} evaluations')


if __name__ == '__main__':
    main()
