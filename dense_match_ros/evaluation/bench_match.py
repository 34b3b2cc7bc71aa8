"""``dense-match-bench``: time per pair of registered matchers, batch 1, median of N.

Two measurements, printed as a markdown table and written to one JSON file:

1. ``match``: the whole :meth:`Matcher.match` call a node makes per frame pair (resizing,
   the network or the classical pipeline, conversion back to a full-resolution flow and
   matchability), on a real photo pair of each requested size: by default the photo and a
   copy turned by 3 degrees, zoomed 2 % and shifted (part of it leaves the view), ``--pair
   shifted`` the photo and a copy shifted by 1 % (the next frame of a slow camera stream:
   a pair ``dis`` settles, so ``neuflow-fast`` returns DIS's result without its network);
2. ``network`` (``--network``, learned methods with a torch module in ``.net``): the forward
   pass alone at the working size, in fp32 and, on CUDA, in bf16 autocast and with
   ``torch.compile(mode='reduce-overhead')`` (CUDA graphs), so the table shows what each
   trick buys. With ``--raft-small`` torchvision's RAFT-small (random weights, 12 updates)
   is timed on the same inputs for scale, when torchvision is importable.

Timing does not depend on the weights, so ``--random-weights`` times an untrained network
of the architecture of a checkpoint (or of the defaults) where none ships.

Example::

    dense-match-bench --method dgc --method dis --sizes 240x240,640x480 --n 100 --json t.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from dense_match_ros.core.device import resolve_device
from dense_match_ros.core.device import DEFAULT_THREADS, retain_freed_memory, set_threads
from dense_match_ros.core.registry import load_matcher
from dense_match_ros.evaluation.cli import parse_options


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' (width first, as in every size argument of this package) -> (H, W)."""
    w, sep, h = text.lower().partition('x')
    if not sep:
        raise argparse.ArgumentTypeError(f'size wants WIDTHxHEIGHT, got {text!r}')
    return int(h), int(w)


def timed(fn: Callable[[], Any], n: int, warmup: int = 5,
          sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median, 10th and 90th percentile wall time of ``fn`` in ms after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    q = np.percentile(times, [10, 90])
    return {'median_ms': float(statistics.median(times)), 'p10_ms': float(q[0]),
            'p90_ms': float(q[1]), 'n': n}


PAIRS = ('turned', 'shifted')
"""The photo pairs :func:`photo_pair` makes (``--pair``)."""


def photo_pair(size: tuple[int, int], kind: str = 'turned') -> tuple[np.ndarray, np.ndarray]:
    """A real image and a copy at (H, W): turned by 3 degrees, zoomed 2 % and shifted by
    (2 %, 1 %) of the size (``turned``), or only shifted by (1 %, 0.5 %) (``shifted``).
    A real photo, not noise: classical methods take data-dependent time."""
    if kind not in PAIRS:
        raise ValueError(f'pair must be one of {PAIRS}, got {kind!r}')
    h, w = size
    try:
        from skimage import data as skdata
        image = np.ascontiguousarray(skdata.astronaut())
    except Exception:  # pragma: no cover - scikit-image is a dependency
        image = (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)
    source = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    if kind == 'turned':
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 3.0, 1.02)
        m[:, 2] += (0.02 * w, 0.01 * h)
    else:
        m = np.float64([[1, 0, 0.01 * w], [0, 1, 0.005 * h]])
    target = cv2.warpAffine(source, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    return source, target


def _sync_for(device: str) -> Callable[[], None]:
    if str(device).startswith('cuda'):
        import torch
        return torch.cuda.synchronize
    return lambda: None


def bench_match(matcher, sizes: Sequence[tuple[int, int]], n: int,
                pair: str = 'turned') -> dict[str, Any]:
    out = {}
    for size in sizes:
        source, target = photo_pair(size, pair)
        out[f'{size[1]}x{size[0]}'] = timed(lambda: matcher.match(source, target), n,
                                            sync=_sync_for(matcher.device))
    return out


def bench_network(net, device: str, sizes: Sequence[tuple[int, int]], n: int,
                  compile_graphs: bool = True) -> dict[str, Any]:
    """Forward pass alone: fp32, and on CUDA bf16 autocast and bf16 + CUDA graphs.

    A network that runs at one size only (``fixed_input``, e.g. CNNGeo's regressors) is timed
    once, at that size, whatever ``sizes`` asks: the matcher resizes every frame to it.
    """
    import torch
    if getattr(net, 'fixed_input', False):
        sizes = [tuple(net.config.input_size)]
    net = net.float().to(device).eval()
    sync = _sync_for(device)
    cuda = str(device).startswith('cuda')
    out: dict[str, Any] = {}
    for h, w in sizes:
        a = torch.rand(1, 3, h, w, device=device)
        b = torch.rand(1, 3, h, w, device=device)
        key = f'{w}x{h}'
        with torch.no_grad():
            out[f'{key} fp32'] = timed(lambda: net(a, b), n, sync=sync)
            if cuda:
                with torch.autocast('cuda', dtype=torch.bfloat16):
                    out[f'{key} bf16'] = timed(lambda: net(a, b), n, sync=sync)
                    if compile_graphs:
                        try:
                            comp = torch.compile(net, mode='reduce-overhead')
                            out[f'{key} bf16+cudagraphs'] = timed(lambda: comp(a, b), n,
                                                                  warmup=10, sync=sync)
                        except Exception as exc:  # an inductor failure is a finding, not a crash
                            out[f'{key} bf16+cudagraphs'] = {'error': str(exc)[:300]}
    return out


def bench_raft_small(device: str, sizes: Sequence[tuple[int, int]], n: int) -> dict[str, Any]:
    """torchvision RAFT-small, random weights, 12 flow updates: speed only."""
    try:
        import torch
        from torchvision.models.optical_flow import raft_small
    except ImportError as exc:
        return {'error': f'not timed: {exc}'}
    net = raft_small(weights=None).to(device).eval()
    sync = _sync_for(device)
    out = {}
    for h, w in sizes:
        hh, ww = (h + 7) // 8 * 8, (w + 7) // 8 * 8  # RAFT wants multiples of 8
        a = torch.rand(1, 3, hh, ww, device=device) * 2 - 1
        b = torch.rand(1, 3, hh, ww, device=device) * 2 - 1
        with torch.no_grad():
            out[f'{w}x{h} fp32'] = timed(lambda: net(a, b, num_flow_updates=12), n, sync=sync)
    return out


RANDOM_WEIGHT_METHODS = ('dgc',)


def _random_network(method: str, weights: str | None):
    """An untrained network with the architecture of ``weights`` (or the defaults)."""
    from dense_match_ros.core.networks.dgc import DgcNet, config_from_dict
    cfg: dict = {}
    if weights:
        from dense_match_ros.core.checkpoint import load_weights
        cfg = load_weights(weights, 'dgc')[0]
    return DgcNet(config_from_dict(cfg))


def weights_per_method(items: Sequence[str], methods: Sequence[str]) -> dict[str, str]:
    """``--weights`` values as {method: path}; a bare path needs a single method."""
    out = {}
    for item in items:
        method, sep, path = item.partition('=')
        if sep and method in methods:
            out[method] = path
        elif len(methods) == 1:
            out[methods[0]] = item
        else:
            raise SystemExit(f'dense-match-bench: --weights {item!r}: say which method '
                             f'(METHOD=PATH) when timing several')
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='dense-match-bench', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', action='append', required=True,
                   help='registered method (repeatable)')
    p.add_argument('--weights', action='append', default=[], metavar='[METHOD=]PATH',
                   help='checkpoint of a learned method; METHOD= is needed with several methods')
    p.add_argument('--random-weights', action='store_true',
                   help='time an untrained network of the same architecture (dgc; others as they are)')
    p.add_argument('--device', default='cpu', help='cpu, cuda or auto')
    p.add_argument('--sizes', default='240x240,640x480',
                   type=lambda s: [parse_size(x) for x in s.split(',') if x.strip()],
                   help='comma list of WIDTHxHEIGHT (default 240x240,640x480)')
    p.add_argument('--n', type=int, default=100, help='timed calls per entry (default 100)')
    p.add_argument('--pair', choices=PAIRS, default='turned',
                   help='the photo pair timed: turned by 3 degrees, zoomed and shifted '
                        '(default), or only shifted by 1 %% (a pair DIS settles)')
    p.add_argument('--busy', type=int, default=0, metavar='N',
                   help='also time match() while N competing busy processes run (BLAS on every '
                        'core) and report the slow-down')
    p.add_argument('--retain-memory', action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed memory for the next call, as the node does by default "
                        "(its retain_memory parameter; glibc)")
    p.add_argument('--threads', type=int, default=DEFAULT_THREADS,
                   help=f'torch and OpenCV CPU threads (default {DEFAULT_THREADS}; 0: library defaults)')
    p.add_argument('--network', action='store_true', help='also the forward pass alone')
    p.add_argument('--no-compile', action='store_true', help='skip torch.compile on CUDA')
    p.add_argument('--raft-small', action='store_true', help='also torchvision RAFT-small')
    p.add_argument('--option', dest='options', action='append', default=[], metavar='KEY=VALUE',
                   help='matcher option passed to load_matcher for every --method, e.g. '
                        'refine=dis (repeatable)')
    p.add_argument('--json', default=None, help='write the record here')
    return p


BUSY_CODE = ('import numpy as np\n'
             'a = np.random.default_rng(0).random((700, 700))\n'
             'while True:\n    a = (a @ a) / 700.0\n')
"""A competing busy process: BLAS matrix products on every core, as a second perception or
planning process would load a small robot computer."""


class BusyProcesses:
    """``count`` competing busy processes while the context is open."""

    def __init__(self, count: int) -> None:
        self.count = int(count)
        self._procs: list = []

    def __enter__(self) -> 'BusyProcesses':
        import subprocess
        self._procs = [subprocess.Popen([sys.executable, '-c', BUSY_CODE])
                       for _ in range(self.count)]
        time.sleep(1.0 if self.count else 0.0)   # let them reach full load
        return self

    def __exit__(self, *exc) -> None:
        for proc in self._procs:
            proc.kill()
            proc.wait()


def _table(rows: list[tuple[str, str, dict]]) -> str:
    lines = ['| method | entry | median ms | p10 ms | p90 ms |', '|---|---|---|---|---|']
    for method, entry, r in rows:
        if 'error' in r:
            lines.append(f'| {method} | {entry} | {r["error"][:60]} | | |')
        else:
            lines.append(f'| {method} | {entry} | {r["median_ms"]:.1f} | {r["p10_ms"]:.1f} '
                         f'| {r["p90_ms"]:.1f} |')
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.device = resolve_device(args.device)  # the one device choice (registry, training, here)
    import torch
    set_threads(args.threads)
    retained = retain_freed_memory(args.retain_memory)
    record: dict[str, Any] = {
        'command': 'dense-match-bench ' + ' '.join(sys.argv[1:] if argv is None else argv),
        'device': args.device, 'batch': 1, 'n': args.n, 'pair': args.pair,
        'torch_threads': torch.get_num_threads(), 'retain_memory': retained,
        'platform': platform.platform(), 'processor': platform.processor(),
        'torch': torch.__version__, 'results': {}}
    if str(args.device).startswith('cuda'):
        record['gpu'] = torch.cuda.get_device_name()
    weights = weights_per_method(args.weights, args.method)
    options = parse_options(args.options)
    record['options'] = options
    rows: list[tuple[str, str, dict]] = []
    for method in args.method:
        kwargs: dict[str, Any] = {'device': args.device, **options}
        if method in weights:
            kwargs['weights'] = weights[method]
        if args.random_weights and method in RANDOM_WEIGHT_METHODS:
            kwargs['net'] = _random_network(method, weights.get(method))
            kwargs.pop('weights', None)
        matcher = load_matcher(method, **kwargs)
        res = {'match': bench_match(matcher, args.sizes, args.n, args.pair)}
        if args.busy > 0:
            with BusyProcesses(args.busy):
                busy = bench_match(matcher, args.sizes, args.n, args.pair)
            res[f'match_busy{args.busy}'] = busy
            res['slowdown_busy'] = {k: busy[k]['median_ms'] / res['match'][k]['median_ms']
                                    for k in busy}
            rows += [(method, f'match {k} with {args.busy} busy processes', v)
                     for k, v in busy.items()]
            print(f'{method}: slow-down with {args.busy} busy processes: ' + ', '.join(
                f'{k} {v:.2f}x' for k, v in res['slowdown_busy'].items()))
        net = getattr(matcher, 'net', None)
        if args.network and isinstance(net, torch.nn.Module):
            res['network'] = bench_network(net, matcher.device, args.sizes, args.n,
                                           compile_graphs=not args.no_compile)
        record['results'][method] = res
        rows += [(method, f'match {k}', v) for k, v in res['match'].items()]
        rows += [(method, f'net {k}', v) for k, v in res.get('network', {}).items()]
    if args.raft_small:
        raft = bench_raft_small(args.device, args.sizes, args.n)
        record['results']['raft_small'] = raft
        rows += [('raft_small', k, v) for k, v in raft.items()] if 'error' not in raft else [
            ('raft_small', '-', raft)]
    print(_table(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(record, f, indent=1)
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
