"""Matchability calibration: a monotone map from a matcher's raw score to the probability
that the match is right (within a pixel), or for a coarse matcher that the pixel has a visible
match at all (the table's ``truth``), fitted on held-out synthetic pairs.

Why: pose selection keeps pixels above a matchability threshold and prefers the most
confident ones; that only means something if a score of p is right with probability p,
which a product of heuristic terms (visibility head x forward-backward consistency) is not.
The map is stored in the checkpoint's JSON record (``calibration``) and applied by the
matcher; :mod:`dense_match_ros.evaluation.calibrate` fits it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def isotonic_fit(centres: Sequence[float], rates: Sequence[float],
                 weights: Sequence[float]) -> np.ndarray:
    """Non-decreasing fit of ``rates`` (weighted least squares, pool adjacent violators)."""
    blocks: list[list[float]] = []   # [weighted mean, weight, number of bins]
    for rate, weight in zip(rates, weights):
        blocks.append([float(rate), float(weight), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            w = w1 + w2
            blocks.append([(m1 * w1 + m2 * w2) / max(w, 1e-12), w, n1 + n2])
    return np.concatenate([np.full(n, m) for m, _, n in blocks]) if blocks else np.zeros(0)


def fit_table(counts: dict, min_count: int = 50) -> dict[str, list[float]]:
    """A calibration table from reliability counts (per-bin count, matchability sum, right
    count; :func:`evaluation.metrics.reliability_counts`): bins with fewer than
    ``min_count`` pixels are dropped, the rest fitted isotonically."""
    n = np.asarray(counts['count'], np.float64)
    used = n >= min_count
    if not used.any():
        raise ValueError('too few pixels to fit a calibration')
    centres = np.asarray(counts['sum_matchability'])[used] / n[used]
    rates = np.asarray(counts['correct'])[used] / n[used]
    fitted = isotonic_fit(centres, rates, n[used])
    return {'matchability': [float(c) for c in centres], 'probability': [float(p) for p in fitted]}


def apply_table(matchability: np.ndarray, table: dict | None) -> np.ndarray:
    """The calibrated matchability (piecewise linear between the table's points, constant
    beyond them); the input unchanged when there is no table."""
    if not table:
        return matchability
    x = np.asarray(table['matchability'], np.float64)
    y = np.asarray(table['probability'], np.float64)
    return np.interp(matchability, x, y).astype(np.float32)
