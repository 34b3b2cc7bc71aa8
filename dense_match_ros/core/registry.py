"""The one interface every matching method implements, and the name -> method registry.

A method is registered under a name with :func:`register`; :func:`load_matcher` builds it.
The node, the evaluation CLI, the benchmarks and the tests only ever go through
:func:`load_matcher`, so a new method becomes available everywhere by registering it.

Flow convention (the same everywhere in this package): ``flow`` is float32 HxWx2 on the
*source* image grid, in pixels; source pixel (x, y) corresponds to target pixel
(x + flow[y, x, 0], y + flow[y, x, 1]). Matchability is float32 HxW in [0, 1].
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Callable

import numpy as np

from dense_match_ros.core.device import resolve_device


@dataclasses.dataclass
class MatchResult:
    """Dense correspondence from a source image to a target image."""

    flow: np.ndarray
    """float32 (H, W, 2), source grid, pixels: source (x, y) <-> target (x+u, y+v)."""
    matchability: np.ndarray
    """float32 (H, W) in [0, 1]: confidence that the source pixel has a correct match."""

    def __iter__(self):
        # Lets callers write ``flow, matchability = matcher.match(a, b)``.
        yield self.flow
        yield self.matchability


class StagedMatch:
    """A :class:`MatchResult` whose matchability may still be in the making
    (:meth:`Matcher.match_staged`): ``flow`` is ready, :meth:`matchability` finishes the rest
    once and then returns the same array."""

    def __init__(self, flow: np.ndarray, finish: Callable[[], np.ndarray]) -> None:
        self.flow = flow
        self._finish: Callable[[], np.ndarray] | None = finish
        self._matchability: np.ndarray | None = None

    def matchability(self) -> np.ndarray:
        if self._finish is not None:
            self._matchability, self._finish = self._finish(), None
        return self._matchability

    def result(self) -> MatchResult:
        return MatchResult(self.flow, self.matchability())


LEVELS = 'levels'
"""Capability: :meth:`Matcher.level_flows` and :meth:`Matcher.level_labels` (coarse-to-fine
methods; ``dense-match-eval --levels``)."""
HIERARCHICAL_FEATURES = 'hierarchical_features'
"""Capability: ``features(image) -> (shallow, deep)`` descriptor maps, ``search_radius(size)`` and
the network's strides (HiLM's feature analysis, :mod:`evaluation.feature_pck`)."""


class Matcher(abc.ABC):
    """A dense matching method.

    Subclasses implement :meth:`_match` on validated inputs; :meth:`match` does the
    input checks and output contract once for all methods. Optional abilities are declared
    in ``capabilities`` (tools ask :meth:`supports` instead of probing attributes).
    """

    name: str = ''
    device: str = 'cpu'
    capabilities: frozenset[str] = frozenset()

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def level_flows(self, source: np.ndarray, target: np.ndarray) -> list[np.ndarray]:
        """The flow of every pyramid level, coarse to fine, on the source's full grid
        (methods with the :data:`LEVELS` capability)."""
        raise NotImplementedError(f'{self.name or type(self).__name__} has no pyramid levels')

    def level_labels(self, source: np.ndarray) -> list[str]:
        """Names of the :meth:`level_flows` levels for this source image."""
        raise NotImplementedError(f'{self.name or type(self).__name__} has no pyramid levels')

    def match(self, source: np.ndarray, target: np.ndarray) -> MatchResult:
        """Match two RGB uint8 images (any sizes, they may differ).

        Returns flow on the source grid pointing into the target image, and matchability.
        """
        source = _as_rgb_uint8(source, 'source')
        target = _as_rgb_uint8(target, 'target')
        flow, matchability = self._match(source, target)
        return MatchResult(self._checked_flow(flow, source),
                           self._checked_matchability(matchability, source))

    def match_staged(self, source: np.ndarray, target: np.ndarray) -> StagedMatch:
        """:meth:`match` in two steps: the flow now, the matchability when asked for.

        A method whose matchability needs work the flow does not (``dis``: the backward
        flow of its round-trip check) returns as soon as the flow exists, so a caller can
        hand the flow on (the node publishes it) while the rest is computed; the others
        compute both here. The results equal :meth:`match`'s.
        """
        source = _as_rgb_uint8(source, 'source')
        target = _as_rgb_uint8(target, 'target')
        flow, finish = self._match_staged(source, target)
        return StagedMatch(self._checked_flow(flow, source),
                           lambda: self._checked_matchability(finish(), source))

    def _checked_flow(self, flow: np.ndarray, source: np.ndarray) -> np.ndarray:
        flow = np.ascontiguousarray(flow, dtype=np.float32)
        if flow.shape != source.shape[:2] + (2,):
            raise RuntimeError(f'{self.name}: returned flow {flow.shape} for a '
                               f'{source.shape[0]}x{source.shape[1]} source')
        return flow

    def _checked_matchability(self, matchability: np.ndarray, source: np.ndarray) -> np.ndarray:
        matchability = np.clip(np.ascontiguousarray(matchability, dtype=np.float32), 0.0, 1.0)
        if matchability.shape != source.shape[:2]:
            raise RuntimeError(f'{self.name}: returned matchability {matchability.shape} for '
                               f'a {source.shape[0]}x{source.shape[1]} source')
        return matchability

    @abc.abstractmethod
    def _match(self, source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (flow HxWx2, matchability HxW) for RGB uint8 inputs."""

    def _match_staged(self, source: np.ndarray, target: np.ndarray
                      ) -> tuple[np.ndarray, Callable[[], np.ndarray]]:
        """(flow, a call that returns the matchability); override where the flow is ready
        before the matchability."""
        flow, matchability = self._match(source, target)
        return flow, lambda: matchability

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name={self.name!r}, device={self.device!r})'


def _as_rgb_uint8(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f'{what} image must be uint8, got {image.dtype}')
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'{what} image must be HxWx3 RGB, got shape {image.shape}')
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f'{what} image is too small: {image.shape[1]}x{image.shape[0]}')
    return np.ascontiguousarray(image)


Factory = Callable[..., Matcher]
_REGISTRY: dict[str, Factory | str] = {}

# Built-in methods, imported lazily so that listing methods (e.g. for a ROS parameter
# descriptor) never pays for torch or model construction.
_BUILTIN = {
    'dis': 'dense_match_ros.core.methods.dis:DisMatcher',
    'hilm': 'dense_match_ros.core.methods.hilm:HilmMatcher',
    'dgc': 'dense_match_ros.core.methods.dgc:DgcMatcher',
    'neuflow': 'dense_match_ros.core.methods.neuflow:NeuFlowMatcher',
    'neuflow-fast': 'dense_match_ros.core.methods.neuflow_variants:NeuFlowFastMatcher',
    'neuflow-lite': 'dense_match_ros.core.methods.neuflow_variants:NeuFlowLiteMatcher',
    'cnngeo': 'dense_match_ros.core.methods.cnngeo:CnnGeoMatcher',
    'cnngeo-affine': 'dense_match_ros.core.methods.cnngeo:CnnGeoAffineMatcher',
    'deepmatching': 'dense_match_ros.core.methods.deepmatching:DeepMatchingMatcher',
    'deepmatching-hog': 'dense_match_ros.core.methods.deepmatching:DeepMatchingHogMatcher',
    'dmp': 'dense_match_ros.core.methods.dmp:DmpMatcher',
    'dmp-scratch': 'dense_match_ros.core.methods.dmp:DmpScratchMatcher',
}


DEFAULT_METHOD = 'neuflow-fast'
"""The method the node, its config files and launch files, the demo and the soak use unless
told otherwise: the one that measures best on every shared set (README, "Measured results":
the learned flow fused with DIS, level with ``dis`` or better on each, ``dis``'s own result
on pairs DIS settles, the frames of a steady camera). ``test_launch`` checks the config and
launch files name it."""


def register(name: str, factory: Factory | str) -> None:
    """Register a method under ``name``: a callable or a ``'module:attr'`` path."""
    if not name or not name.replace('_', '').replace('-', '').isalnum():
        raise ValueError(f'invalid method name {name!r}')
    _REGISTRY[name] = factory


for _name, _path in _BUILTIN.items():
    register(_name, _path)


def available_methods() -> list[str]:
    """Names accepted by :func:`load_matcher`, sorted."""
    return sorted(_REGISTRY)


def resolve_lazy(entry):
    """A registry entry: the object itself, or a ``'module:attr'`` path imported now.

    Registries hold paths so that listing names never imports torch or a model.
    """
    if isinstance(entry, str):
        module, _, attr = entry.partition(':')
        return getattr(importlib.import_module(module), attr)
    return entry


class UnknownMethod(KeyError, ValueError):
    """An unregistered method name. A KeyError for callers that look names up, a ValueError
    for those that validate input; its text prints plainly (a KeyError's would be quoted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ''


def _check_options(name: str, factory, options: dict) -> None:
    """Refuse options the method does not take, listing the ones it does."""
    import inspect
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [p for p in params if p not in ('self', 'device', 'weights', 'net')]
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f'{name} has no option {", ".join(map(repr, unknown))}; its options: '
                         f'{", ".join(known) or "none"}')


def load_matcher(name: str, device: str = 'auto', weights: str | None = None,
                 **options) -> Matcher:
    """Build the matcher registered as ``name``.

    ``weights`` is a checkpoint path for learned methods (None: the checkpoint shipped in
    the package); methods without weights reject a non-empty value so that a typo in a
    launch file is not silently ignored. Extra keyword options go to the method.
    """
    if name not in _REGISTRY:
        raise UnknownMethod(f'unknown method {name!r}; available: {", ".join(available_methods())}')
    factory = resolve_lazy(_REGISTRY[name])
    _check_options(name, factory, options)
    matcher = factory(device=resolve_device(device), weights=weights or None, **options)
    matcher.name = name
    return matcher
