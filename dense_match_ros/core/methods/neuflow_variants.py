"""The registered variants of :class:`~core.methods.neuflow.NeuFlowMatcher`: the same matcher
with other defaults (and, for ``neuflow-lite``, another network), every option still open."""
from __future__ import annotations

import inspect

from dense_match_ros.core.methods.neuflow import NeuFlowMatcher

FAST_DEFAULTS = {'max_side': 256, 'iterations': 4, 'cascade_side': 0, 'polish': 0,
                 'refine_preset': 'fast', 'prealign_features': 'orb', 'fb_cross': True,
                 'agree_px': 8.0, 'concurrent': 'auto', 'settled_share': 0.05,
                 'dis_cross': True, 'dis_margin_px': 1.0}
"""``neuflow-fast``: the same network and fusion at a time the node can afford per frame.
At 640x480 on one core ``neuflow`` spends most of its time in two network passes and the
polish (README, "`neuflow` against `dis`"); here one pass at 256 px with 4 steps, a DIS
residual of the ``fast`` preset, no polish, and ORB where the pre-alignment needs features.
Without the second pass the network's flow is the less precise candidate, so the fusion
checks it through DIS's backward flow too and defers to DIS where both agree within 8 px
(``fb_cross``, ``agree_px``: Sintel 12.95 -> 12.69 px, PCK@1 0.545 -> 0.548, synthetic
5.80 -> 5.20, pose AUCs unchanged over 20 seeds, +4 ms): 118-125 ms at 640x480 on one
thread, 1.85-1.92x ``dis`` (an AMX machine; 2.14-2.17x without AMX). And DIS goes first
(``settled_share``): a pair whose DIS round trip closes within 3 px on 95 % of the pixels,
the usual pair of a camera stream, gets ``dis``'s result without the network (the TUM
pairs: 1.01-1.04x ``dis``'s time instead of 2.2-2.5x, and its pose exactly). With two
threads DIS's two flows then run side by side before the network (other pairs 2.4-2.6x
``dis``); with ``settled_share=0`` they run beside it (``concurrent``: 2.2x). The fusion
also checks DIS's flow through the network's backward flow and gives DIS a 1 px head start
(``dis_cross``, ``dis_margin_px``; GPU stage: Sintel 12.555 -> 12.525 px, PCK@1 0.54743 ->
0.54775, at last at or above ``dis``'s 0.54773; HPatches full 2.467 -> 2.428; about +2 ms)."""


LITE_DEFAULTS = {**FAST_DEFAULTS, 'iterations': 3}
"""``neuflow-lite``: ``neuflow-fast``'s pipeline around a lighter network (the shipped
network's encoder under a refinement of hidden 32 with narrowed step layers, 3 steps;
``config/train_neuflow_lite_gpu.yaml`` describes it). Its forward pass takes half the
shipped network's time (90 against 177 ms at 256x192 on one thread of a CPU without bf16);
it is still in training, and until it measures level with ``neuflow-fast`` it is the
faster, less accurate choice (README, "A machine without bf16, and a lighter network")."""


def _show_defaults(cls: type, defaults: dict) -> None:
    """The registry checks options against the signature: show the base's, with these
    defaults."""
    base = inspect.signature(NeuFlowMatcher.__init__)
    cls.__init__.__signature__ = base.replace(parameters=[
        p.replace(default=defaults.get(name, p.default)) for name, p in base.parameters.items()])


class NeuFlowFastMatcher(NeuFlowMatcher):
    """:class:`NeuFlowMatcher` with :data:`FAST_DEFAULTS`; every option can still be set."""

    calibration_key = 'neuflow-fast'
    shipped_variant = None

    def __init__(self, device: str = 'cpu', weights: str | None = None, **options) -> None:
        super().__init__(device, weights, **{**FAST_DEFAULTS, **options})


class NeuFlowLiteMatcher(NeuFlowMatcher):
    """:class:`NeuFlowMatcher` with :data:`LITE_DEFAULTS` on the shipped ``lite`` checkpoint."""

    calibration_key = 'neuflow-lite'
    shipped_variant = 'lite'

    def __init__(self, device: str = 'cpu', weights: str | None = None, **options) -> None:
        super().__init__(device, weights, **{**LITE_DEFAULTS, **options})


_show_defaults(NeuFlowFastMatcher, FAST_DEFAULTS)
_show_defaults(NeuFlowLiteMatcher, LITE_DEFAULTS)
