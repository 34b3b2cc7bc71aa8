"""The training module: schedule, config, exact resume through the CLI, export and loading."""
import json
import math

import numpy as np
import pytest
import torch

from dense_match_ros.training import checkpoint as ckpt
from dense_match_ros.training import config as cfgmod
from dense_match_ros.training.cli import main
from dense_match_ros.training.hilm_task import HilmTask, level_loss
from dense_match_ros.training.loop import lr_factor
from dense_match_ros.training.tasks import get_task

# A CI-sized run: 48x48 pairs, 1/8-width net, 2 pairs a step.
TINY = ['--set', 'data.image_size=[48,48]', '--set', 'batch_size=2', '--set', 'loss.points=32',
        '--set', 'model.width=0.125', '--set', 'model.shallow_dim=8', '--set', 'model.deep_dim=16',
        '--set', 'optim.warmup_steps=5', '--set', 'log_every=1', '--set', 'threads=1',
        '--set', 'checkpoint_every=1000', '--no-progress']


def _losses(run):
    return [(r['step'], r['loss']) for r in map(json.loads, (run / 'log.jsonl').read_text().splitlines())]


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    # A wall-clock schedule: warm-up in steps, then the cosine over the spent budget fraction.
    assert lr_factor(5, 100, 10, 0.1, progress=0.9) == pytest.approx(0.6)
    assert lr_factor(99, 100, 10, 0.1, progress=0.5) == lr_factor(55, 100, 10, 0.1)
    assert lr_factor(20, 100, 10, 0.1, progress=2.0) == pytest.approx(0.1)


def test_config_overrides_and_typos():
    values = cfgmod.apply_overrides({'optim': {'lr': 1.0}}, ['optim.lr=5e-4', 'data.image_size=[32,40]'])
    config = cfgmod.from_dict(values)
    assert config.optim.lr == 5e-4 and config.data.image_size == (32, 40)
    with pytest.raises(ValueError, match='lrr'):
        cfgmod.from_dict({'optim': {'lrr': 1}})
    with pytest.raises(ValueError, match='bogus'):
        get_task('hilm').loss_config({'bogus': 1})
    with pytest.raises(KeyError):
        get_task('no_such_method')


def test_contrastive_loss_prefers_correct_descriptors():
    torch.manual_seed(0)
    tgt = torch.nn.functional.normalize(torch.randn(1, 8, 6, 6), dim=1)
    pts = torch.tensor([[[19.5, 11.5], [27.5, 35.5]]])             # two cell centres, stride 8
    cells = ((pts + 0.5) / 8 - 0.5).long()
    right = tgt[0, :, cells[0, :, 1], cells[0, :, 0]].t()[None]
    wrong = torch.nn.functional.normalize(torch.randn(1, 2, 8), dim=-1)
    w = torch.ones(1, 2)
    good, acc_good = level_loss(right, tgt, pts, 8, 1.0, 12.0, None, w)
    bad, acc_bad = level_loss(wrong, tgt, pts, 8, 1.0, 12.0, None, w)
    assert acc_good == 1.0 and good < bad
    # No negative left (exclusion covers the map): the positive term alone remains (~0).
    alone, _ = level_loss(right, tgt, pts, 8, 1.0, 1e3, None, w)
    assert alone == pytest.approx(0.0, abs=1e-6)


def test_extra_batch_points_land_inside_the_target():
    from dense_match_ros.data.synthetic import SyntheticPairGenerator
    rng = np.random.default_rng(0)
    photo = (np.random.default_rng(1).random((80, 80, 3)) * 255).astype(np.uint8)
    gen = SyntheticPairGenerator([photo], size=(40, 40))
    pairs = [gen.sample(rng) for _ in range(3)]
    task = HilmTask()
    extra = task.extra_batch(pairs, rng, task.loss_config({'points': 50, 'border': 3}))
    for p, pts, w in zip(pairs, extra['points'], extra['point_weight']):
        if w[0] == 0:
            continue
        xi, yi = pts[:, 0].astype(int), pts[:, 1].astype(int)
        assert p.valid[yi, xi].all()
        tgt = pts + p.flow[yi, xi]
        assert (tgt >= 3 - 1e-4).all() and (tgt <= 36 + 1e-4).all()


def test_cli_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    assert main(['hilm', '--steps', '20', '--out', str(whole), *TINY]) == 0
    assert main(['hilm', '--steps', '20', '--stop-at', '10', '--out', str(split), *TINY]) == 0
    assert [s for s, _ in _losses(split)] == list(range(1, 11))
    # A killed run may have logged past its last save; the resume must cut that back.
    with open(split / 'log.jsonl', 'a') as f:
        f.write(json.dumps({'step': 11, 'loss': 123.0}) + '\n')
    assert main(['hilm', '--steps', '20', '--out', str(split), *TINY]) == 0
    a, b = _losses(whole), _losses(split)
    assert [s for s, _ in a] == list(range(1, 21)) and [s for s, _ in b] == list(range(1, 21))
    np.testing.assert_array_equal([l for _, l in a], [l for _, l in b])
    assert a[-1][1] < a[0][1]  # and it is learning something, even in 20 tiny steps
    # Export: fp16 weights + record; the loader verifies the checksum.
    out = tmp_path / 'w' / 'hilm_test.pt'
    assert main(['export', str(whole), '--out', str(out)]) == 0
    record = json.loads(out.with_suffix('.json').read_text())
    assert record['steps'] == 20 and record['dtype'] == 'float16'
    assert record['command'].startswith('dense-match-train hilm --steps 20')
    assert record['sha256'] == ckpt.sha256_of(out)
    assert [(st['steps'], st['pairs'], st['init_weights']) for st in record['stages']] == [(20, 20 * record['config']['batch_size'], None)]
    # Re-exporting the same weights keeps a fitted calibration.
    out.with_suffix('.json').write_text(json.dumps({**record, 'calibration': {'matchability': [0, 1],
                                                                              'probability': [0, 1]}}))
    assert main(['export', str(whole), '--out', str(out)]) == 0
    assert json.loads(out.with_suffix('.json').read_text())['calibration']['probability'] == [0, 1]
    # A later stage started from these weights lists the earlier stage first.
    from dense_match_ros.training.cli import _stages
    later = _stages({'config': {'model': {'init_weights': str(out)}}}, {'steps': 5})
    assert [st['steps'] for st in later] == [20, 5] and later[1]['init_weights'] == str(out)
    model_config, state, _ = ckpt.load_weights(out, 'hilm')
    full = ckpt.load_training_state(whole / 'last.pt')
    assert out.stat().st_size < 0.6 * (whole / 'last.pt').stat().st_size
    for k, v in full['model'].items():
        assert torch.allclose(state[k].float(), v.float(), rtol=1e-2, atol=1e-3), k
    with pytest.raises(ValueError, match='not'):
        ckpt.load_weights(out, 'dgcnet')
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(ValueError, match='sha256'):
        ckpt.load_weights(out, 'hilm')


def test_sigint_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    """Ctrl-C (or the SIGTERM of a scheduler) must not lose the steps since the last save."""
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'dense_match_ros.training.cli', 'hilm', '--steps', '500',
           '--out', str(run), *TINY]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    log = run / 'log.jsonl'
    end = time.monotonic() + 120
    while time.monotonic() < end and (not log.is_file() or len(log.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert 'SIGINT: stopping at step' in err
    steps = [s for s, _ in _losses(run)]
    state = ckpt.load_training_state(run / 'last.pt')
    assert 3 <= state['step'] < 500 and steps == list(range(1, state['step'] + 1))
    # The same command goes on from there (checkpoint_every=1000: only the stop saved it).
    assert main(['hilm', '--steps', '500', '--stop-at', str(state['step'] + 2), '--out', str(run),
                 *TINY]) == 0
    assert [s for s, _ in _losses(run)] == list(range(1, state['step'] + 3))


def test_torchrun_data_parallel_with_the_same_command(tmp_path):
    """DDP through torchrun (gloo on CPU, NCCL on GPUs): two ranks, one log, one checkpoint."""
    import subprocess
    import sys
    run = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
           '--standalone', '-m', 'dense_match_ros.training.cli', 'hilm',
           '--steps', '4', '--out', str(run), *TINY]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [s for s, _ in _losses(run)] == [1, 2, 3, 4]
    state = ckpt.load_training_state(run / 'last.pt')
    assert state['step'] == 4 and state['extra']['world_size'] == 2


@pytest.mark.parametrize('content', [b'root:x:0:0:root:/root:/bin/bash\n', b'', b'# README\n\ntext',
                                     None, 'state'])
def test_a_file_that_is_not_a_checkpoint_gets_one_clear_error(tmp_path, content):
    from dense_match_ros.core.checkpoint import CheckpointError
    from dense_match_ros.core import load_matcher
    path = tmp_path / 'weights.pt'
    if content is None:        # a pickle of something else
        torch.save({'hello': 1}, path)
    elif content == 'state':   # a training state with keys missing
        torch.save({'format': ckpt.TRAIN_FORMAT, 'method': 'dgc'}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_matcher('dgc', device='cpu', weights=str(path))
    text = str(info.value)
    assert str(path) in text and 'checkpoint' in text and 'weights_only' not in text
    assert 'expected a dgc checkpoint' in text or 'without its' in text


def test_averaged_weights_are_the_weighted_mean_of_their_members(tmp_path):
    """``dense-match-train average``: float tensors are the normalised weighted mean, the
    result loads through the registry, the record names each member with its weight, and
    members of another shape are refused."""
    import dataclasses
    from dense_match_ros.core.networks.dmp import DmpConfig, DmpNet
    from dense_match_ros.core.registry import load_matcher
    config = DmpConfig(width=0.125, input_size=(32, 32), finest='conv3', radius=2, hidden=8)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = DmpNet(config)
        for p in net.parameters():           # the zero-initialised outer layers differ too
            p.data.normal_()
        path = tmp_path / f'm{seed}.pt'
        ckpt.export_weights({'model': net.state_dict(), 'method': 'dmp', 'step': 0,
                             'config': {'model': dataclasses.asdict(config)}}, path, {'command': 't'})
        paths.append(path)
    out = tmp_path / 'avg.pt'
    assert main(['average', '--member', str(paths[0]), '--member', str(paths[1]),
                 '--weight', '1', '--weight', '3', '--out', str(out)]) == 0
    a, b, mean = (torch.load(p, weights_only=True)['state_dict'] for p in (*paths, out))
    floats = [k for k, v in a.items() if v.is_floating_point()]
    assert floats and a.keys() == mean.keys()
    for k in floats:
        want = (0.25 * a[k].float() + 0.75 * b[k].float()).half()
        torch.testing.assert_close(mean[k], want, atol=2e-3, rtol=2e-3)
    assert any(not torch.equal(mean[k], a[k]) and not torch.equal(mean[k], b[k]) for k in floats)
    record = json.loads(out.with_suffix('.json').read_text())
    assert [m['weight'] for m in record['average']] == [0.25, 0.75]
    assert record['average'][0]['weights'] == str(paths[0]) and record['method'] == 'dmp'
    src = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    flow, _ = load_matcher('dmp', device='cpu', weights=str(out), iterations=1, time_budget_s=0,
                           refine='none', polish=0).match(src, src)
    assert np.isfinite(flow).all()
    other = DmpConfig(width=0.125, input_size=(32, 32), finest='conv3', radius=2, hidden=4)
    ckpt.export_weights({'model': DmpNet(other).state_dict(), 'method': 'dmp', 'step': 0,
                         'config': {'model': dataclasses.asdict(other)}}, tmp_path / 'o.pt', {})
    with pytest.raises(ValueError, match='shape'):
        main(['average', '--member', str(paths[0]), '--member', str(tmp_path / 'o.pt'),
              '--out', str(tmp_path / 'bad.pt')])
