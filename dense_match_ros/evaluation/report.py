"""PNG figures for an evaluation run, so a result can be checked by eye, not only by number.

Per flow pair: source, target, ground-truth and estimated flow in the Middlebury colour
code *on one common scale* (so colours compare), the end-point-error map and the
matchability. Per run: PCK curves of every flow set and cumulative pose-error curves.
matplotlib is imported lazily with the Agg backend: evaluation runs headless.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dense_match_ros.core import flowviz
from dense_match_ros.evaluation import metrics

ERROR_MAP_MAX_PX = 10.0
"""End-point error shown at full brightness: the coarsest PCK threshold reported."""


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported on first use: it is slow)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def save_flow_figure(path: str | Path, title: str, source: np.ndarray, target: np.ndarray,
                     gt_flow: np.ndarray, valid: np.ndarray, flow: np.ndarray,
                     matchability: np.ndarray) -> Path:
    """2x3 panel figure of one flow pair; returns the path written."""
    plt = pyplot()
    gt_mag = np.linalg.norm(gt_flow[valid], axis=-1) if valid.any() else np.zeros(1)
    scale = max(float(np.percentile(gt_mag, 99)), 1.0)
    epe = metrics.end_point_error(flow, gt_flow)
    panels = [
        ('source', source),
        ('target', target),
        (f'ground-truth flow (max {scale:.0f} px)', flowviz.flow_to_color(gt_flow, scale, valid)),
        ('estimated flow, same scale', flowviz.flow_to_color(flow, scale)),
        (f'end-point error (0..{ERROR_MAP_MAX_PX:g} px, AEPE '
         f'{metrics.aepe(flow, gt_flow, valid):.2f})',
         flowviz.error_map_color(epe, ERROR_MAP_MAX_PX, valid)),
        ('matchability (0..1)', matchability),
    ]
    h, w = source.shape[:2]
    fig, axes = plt.subplots(2, 3, figsize=(12, 2 * 4 * h / w + 0.8))
    for ax, (label, img) in zip(axes.ravel(), panels):
        if img.ndim == 2:
            ax.imshow(img, cmap='gray', vmin=0.0, vmax=1.0)
        else:
            ax.imshow(img)
        ax.set_title(label, fontsize=9)
        ax.axis('off')
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path, dpi=90)


def _wheel_legend(ax, max_flow: float) -> None:
    """An inset colour wheel: the direction and the magnitude (rim = ``max_flow`` px) each
    colour stands for, in the flow panel it annotates."""
    n = 65
    ys, xs = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    field = np.stack((xs, ys), -1).astype(np.float32) * max_flow
    inside = np.hypot(xs, ys) <= 1.0
    wheel = flowviz.flow_to_color(field, max_flow, inside)
    wheel[~inside] = 255
    inset = ax.inset_axes([0.78, 0.02, 0.2, 0.2 * ax.bbox.width / max(ax.bbox.height, 1)])
    inset.imshow(wheel)
    inset.set_title(f'{max_flow:.1f} px', fontsize=7, pad=1)
    inset.axis('off')


def save_match_figure(path: str | Path, title: str, source: np.ndarray, target: np.ndarray,
                      flow: np.ndarray, matchability: np.ndarray | None = None) -> Path:
    """One match without ground truth (the demo's and replay's pairs): source, target, the
    flow in the Middlebury colour code with a colour-wheel legend and its scale, and the
    matchability. Images are shown on the flow's grid."""
    import cv2
    plt = pyplot()
    h, w = flow.shape[:2]
    source, target = (img if img.shape[:2] == (h, w) else
                      cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
                      for img in (source, target))
    mag = np.linalg.norm(flow, axis=-1)
    scale = max(float(np.percentile(mag[np.isfinite(mag)], 99)) if np.isfinite(mag).any() else 1.0,
                1.0)
    panels = [('source', source), ('target', target),
              (f'flow (saturated at {scale:.1f} px)', flowviz.flow_to_color(flow, scale))]
    if matchability is not None:
        panels.append((f'matchability (0..1, mean {float(np.mean(matchability)):.2f})',
                       matchability))
    cols = 2
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, cols, figsize=(9, rows * 4.5 * h / w + 0.8))
    for ax, (label, img) in zip(axes.ravel(), panels):
        ax.imshow(img, cmap='gray', vmin=0.0, vmax=1.0) if img.ndim == 2 else ax.imshow(img)
        ax.set_title(label, fontsize=9)
        ax.axis('off')
        if label.startswith('flow'):
            _wheel_legend(ax, scale)
    for ax in axes.ravel()[len(panels):]:
        ax.axis('off')
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path, dpi=90)


def _finish_plot(fig, ax, path: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Labels, a [0, 1] y axis, grid, legend and title; then save (one look for every plot)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path, dpi=100)


def save_pck_curves(path: str | Path, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                    title: str = '') -> Path:
    """PCK against threshold, one line per set: {set: (thresholds px, fractions)}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (ts, vals) in curves.items():
        ax.plot(ts, vals, label=name)
    return _finish_plot(fig, ax, path, 'end-point error threshold [px]',
                        'PCK (fraction of valid pixels)', title or 'PCK curves')


def save_reliability(path: str | Path, counts: Mapping[str, Mapping[str, Sequence[float]]],
                     title: str = '') -> Path:
    """Reliability diagram: fraction of right matches against mean matchability per bin,
    one line per set (the diagonal is perfect calibration)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color='grey', lw=1, ls='--', label='calibrated')
    for name, c in counts.items():
        n = np.asarray(c['count'], float)
        used = n > 0
        ax.plot(np.asarray(c['sum_matchability'])[used] / n[used],
                np.asarray(c['correct'])[used] / n[used], marker='o', ms=3, label=name)
    ax.set_xlim(0, 1)
    return _finish_plot(fig, ax, path, 'mean matchability in bin', 'fraction of right matches',
                        title or 'reliability')


def save_pose_error_curves(path: str | Path, errors: Mapping[str, Sequence[float]],
                           max_deg: float = 30.0, title: str = '') -> Path:
    """Cumulative fraction of pairs with pose error (max of R, t) below x, per set."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = np.linspace(0.0, max_deg, 301)
    for name, errs in errors.items():
        e = np.array([np.inf if v is None or not np.isfinite(v) else v for v in errs], float)
        if e.size:
            ax.plot(xs, [(e <= x).mean() for x in xs], label=f'{name} ({e.size} pairs)')
    return _finish_plot(fig, ax, path, 'pose error max(rotation, translation) [deg]',
                        'fraction of pairs', title or 'pose error')


def save_level_aepe(path: str | Path, levels: Mapping[str, tuple[Sequence[str], Sequence[float]]],
                    title: str = '') -> Path:
    """AEPE of each pyramid level, coarse to fine, one line per set: {set: (labels, AEPE)}.

    A coarse-to-fine network should fall from left to right (DGC-Net's supplementary
    Table 2); a level that does not improve on the one before it is wasted computation.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (labels, values) in levels.items():
        xs = np.arange(len(values))
        ax.plot(xs, values, marker='o', label=name)
        for x, v in zip(xs, values):
            ax.annotate(f'{v:.2f}', (x, v), textcoords='offset points', xytext=(0, 5),
                        ha='center', fontsize=7)
        ax.set_xticks(xs, labels, fontsize=8)
    ax.set_xlabel('pyramid level (coarse to fine), flow brought to full resolution')
    ax.set_ylabel('AEPE [px]')
    ax.set_yscale('log')
    ax.grid(True, alpha=0.3, which='both')
    ax.legend(fontsize=8)
    ax.set_title(title or 'AEPE per level', fontsize=10)
    return save_figure(fig, path, dpi=100)
