"""The one training loop: AdamW, warm-up + cosine over steps or over a wall-clock budget,
AMP (bf16 on capable CPUs too; the only GradScaler), clipping, exact resume, JSON-lines
logs, a tqdm bar and DistributedDataParallel under ``torchrun``.

Batches come from a *batch source* (:mod:`.batches`): pairs made on the CPU by loader
workers (``data.sampler: cpu``) or on the training device (``data.sampler: device``,
:class:`.gpu_pairs.DeviceBatches`, the GPU path). With ``minutes`` > 0 the run ends when
that much wall time is spent, the time of earlier sessions of the run included, and the
rate follows a cosine over it, so a short run still ends annealed.

Exactness of a resume rests on three things: batches are a pure function of
(seed, step, rank); the checkpoint holds model, optimiser, schedule and torch RNG states;
and the log is cut back to the checkpoint's step on resume, so the curve on disk is the
curve of one uninterrupted run (with a ``minutes`` schedule the rate depends on wall time,
so only the batches repeat).
"""
from __future__ import annotations

import json
import math
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from dense_match_ros.core.device import autocast_dtype, resolve_device
from dense_match_ros.training import checkpoint as ckpt
from dense_match_ros.training.config import TrainConfig
from dense_match_ros.training.tasks import TrainTask, get_task

LAST = 'last.pt'
LOG = 'log.jsonl'


def lr_factor(step: int, total: int, warmup: int, min_ratio: float,
              progress: float | None = None) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``,
    or, given ``progress`` (the spent fraction of a wall-clock budget), at ``progress`` = 1."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process otherwise)."""
    return (int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)),
            int(os.environ.get('LOCAL_RANK', 0)))


def batch_source(config: TrainConfig, task: TrainTask, rank: int, device: torch.device):
    """The batch source ``data.sampler`` names (imported lazily: the device one needs
    neither data.synthetic nor the CPU loader)."""
    if config.data.sampler == 'device':
        from dense_match_ros.training.gpu_pairs import DeviceBatches
        return DeviceBatches.from_config(config, task, rank, device)
    if config.data.sampler == 'cpu':
        from dense_match_ros.training.batches import cpu_batches
        return cpu_batches(config, task, rank, device)
    raise ValueError(f"data.sampler must be 'cpu' or 'device', got {config.data.sampler!r}")


class _Clock:
    """Wall time of the run: earlier sessions (from the checkpoint) plus this one's.

    ``shared`` is rank 0's reading at the last :meth:`sync`: the rate and the end of a
    ``minutes`` run follow it, so DDP ranks agree on both.
    """

    def __init__(self, before: float = 0.0) -> None:
        self.restart(before)

    def restart(self, before: float) -> None:
        self.before, self.start, self.shared = before, time.monotonic(), before

    def __call__(self) -> float:
        return self.before + time.monotonic() - self.start

    def sync(self, world: int, dev: torch.device) -> float:
        self.shared = self()
        if world > 1:
            reading = torch.tensor([self.shared], dtype=torch.float64, device=dev)
            dist.broadcast(reading, 0)
            self.shared = float(reading.item())
        return self.shared


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on biases and norm scales: decaying them only fights the normalisation.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def _truncate_log(path: Path, step: int) -> None:
    """Keep only log records up to ``step`` (a killed run may have logged past its save)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get('step', -1) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text(''.join(k + '\n' for k in kept))


class _StopRequest:
    """SIGINT/SIGTERM end the run at the next step boundary, with a checkpoint.

    Between steps the model, optimizer, scheduler and RNG states agree, so a state saved
    there resumes exactly; one saved from inside a step would not. A second signal
    interrupts at once (the previous handler), for a run that is stuck.
    """

    def __init__(self) -> None:
        self.requested = ''
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def train(config: TrainConfig, out_dir: str | Path, *, resume: bool = True,
          stop_at: int | None = None, device: str = 'auto', progress: bool = True,
          command: str | None = None,
          batches: Callable[[int, int], Iterable[dict]] | None = None) -> dict:
    """Train ``config.method`` into ``out_dir`` (``last.pt``, ``log.jsonl``, ``config.json``).

    ``stop_at`` ends the run early at that step with a checkpoint, as an interruption
    would (the schedule still spans ``config.steps``); ``config.minutes`` > 0 ends it when
    the wall-time budget is spent. ``batches`` is a batch source (``(start, end) ->
    batches``, see :mod:`.batches`); None: the one ``config.data.sampler`` names.
    Returns a summary dict.
    """
    out_dir = Path(out_dir)
    rank, world, local_rank = _dist_env()
    dev = torch.device(resolve_device(device))
    if dev.type == 'cuda' and dev.index is None:
        dev = torch.device('cuda', local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.threads > 0 and dev.type == 'cpu':
        torch.set_num_threads(config.threads)
    is_main = rank == 0

    task = get_task(config.method)
    config.model = task.model_config(config.model)
    config.loss = task.loss_config(config.loss)
    resolved = config.to_dict()

    torch.manual_seed(config.seed * 1000 + rank)
    model = task.build_model(config.model).to(dev)
    optimizer = torch.optim.AdamW(_param_groups(model, config.optim.weight_decay),
                                  lr=config.optim.lr, betas=tuple(config.optim.betas))
    total, budget_s = int(config.steps), 60.0 * float(config.minutes)
    clock = _Clock()
    o = config.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, total, o.warmup_steps, o.min_lr_ratio, clock.shared / budget_s if budget_s > 0 else None))

    start_step, wall_before = 0, 0.0
    last_path, log_path = out_dir / LAST, out_dir / LOG
    if resume and last_path.is_file():
        state = ckpt.load_training_state(last_path, map_location=dev)
        if state['method'] != config.method:
            raise ValueError(f'{last_path} is a {state["method"]} run, not {config.method}')
        ckpt.unwrap(model).load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        ckpt.restore_rng(state)
        start_step, wall_before = int(state['step']), float(state['wall_time_s'])
        if is_main:
            _truncate_log(log_path, start_step)
    elif is_main and log_path.is_file():
        log_path.unlink()
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / 'config.json').write_text(json.dumps(resolved, indent=2) + '\n')

    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == 'cuda' else None)

    amp_dtype = autocast_dtype(dev.type, bool(config.amp))
    use_amp = amp_dtype is not None
    # Loss scaling only for fp16 (bf16 has fp32's exponent range).
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if config.compile else model

    end = total if stop_at is None else min(total, int(stop_at))
    if budget_s > 0 and wall_before >= budget_s:
        end = min(end, start_step)  # the budget is spent: save and report, no step
    source = batches if batches is not None else batch_source(config, task, rank, dev)

    bar = None
    if progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=None if budget_s > 0 else end, initial=start_step, desc=config.method,
                   dynamic_ncols=True)
    log_file = open(log_path, 'a') if is_main else None
    clock.restart(wall_before)
    last_save = time.monotonic()
    step, ended = start_step, ''
    window_pairs, window_t = 0, time.monotonic()

    def save(at_step: int) -> None:
        if is_main:
            ckpt.save_training_state(last_path, method=config.method, step=at_step,
                                     config=resolved, model=model, optimizer=optimizer,
                                     scheduler=scheduler, wall_time_s=clock(),
                                     extra={'command': command, 'world_size': world,
                                            'device': str(dev)})

    stop = _StopRequest()
    try:
        for batch in source(start_step, end):
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            assert int(batch['step']) == step, (int(batch['step']), step)
            if config.channels_last:
                batch.update({k: batch[k].contiguous(memory_format=torch.channels_last)
                              for k in ('source', 'target') if k in batch and batch[k].dim() == 4})
            model.train()
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                loss, metrics = task.loss(forward, batch, config.loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            grad_norm = None
            if config.optim.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                 config.optim.grad_clip))
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]['lr']
            out_of_time = budget_s > 0 and clock.sync(world, dev) >= budget_s
            scheduler.step()
            step += 1
            window_pairs += config.batch_size * world
            if is_main and (step % config.log_every == 0 or step == end or out_of_time):
                now = time.monotonic()
                record = {'step': step, 'loss': float(loss.detach()), 'lr': lr, 'grad_norm': grad_norm,
                          **metrics, 'pairs_per_s': window_pairs / max(1e-9, now - window_t),
                          'wall_time_s': clock()}
                log_file.write(json.dumps(record) + '\n')
                log_file.flush()
                window_pairs, window_t = 0, now
                if bar is not None:
                    bar.set_postfix(loss=f'{record["loss"]:.4f}', min=f'{record["wall_time_s"] / 60:.1f}')
            if bar is not None:
                bar.update(1)
            due = (step % config.checkpoint_every == 0
                   or time.monotonic() - last_save > 60.0 * config.checkpoint_minutes)
            if due and step < end and not out_of_time:
                save(step)
                last_save = time.monotonic()
            if out_of_time:
                ended = 'minutes'
                break
            if stop.requested:
                ended = stop.requested
                if is_main:
                    print(f'{stop.requested}: stopping at step {step} with a checkpoint; '
                          f'the same command resumes', file=sys.stderr, flush=True)
                break
        if not ended:
            ended = ('steps' if step >= total else
                     'minutes' if budget_s > 0 and wall_before >= budget_s else 'stop_at')
        save(step)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    summary = {'method': config.method, 'step': step, 'steps': total, 'ended': ended,
               'minutes': config.minutes, 'out_dir': str(out_dir), 'wall_time_s': clock(),
               'world_size': world, 'device': str(dev), 'python': sys.version.split()[0],
               'torch': torch.__version__, 'host': platform.node()}
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary

