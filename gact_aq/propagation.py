"""The default sensitivity estimator: local noise propagation through the autograd graph.

Why it is right to first order. Noise d in a saved tensor x changes the backward only
inside the nodes that saved x (its consumers). For a consumer c that receives the
gradient gy, the change of each of its outputs k,

    D_ck = c(gy; x + d)_k - c(gy; x)_k,

is computed exactly by calling the node once more with a compressed copy of x (the real
error of a level). An output that feeds a parameter (AccumulateGrad) is gradient error as
it is; one that feeds a node n travels upstream, where it adds about ||D_ck||^2 a(n), with
a(n) the gain of gradient noise from n to all parameter gradients:

    a(AccumulateGrad) = 1,   a(n) = sum_k g_nk a(next_k),   g_nk = ||n(v)_k||^2 / ||v||^2

for a random v (one extra call per node; isotropic noise, independent across paths). So
storing x at level l adds about V_x(l) = sum_c sum_k ||D_ck(l)||^2 a(next_k) to the
gradient variance, and r_x(l) = V_x(l) / ||d(l)||^2 is its sensitivity at that level.

This is ActNN's insight (the error a layer's weight gradient gets is the noise times the
gradient at its output) generalized to any node, plus the indirect terms ActNN drops
(ReLU masks, normalization statistics, attention). Each level at or below 2 bits is
measured on its own, as the error there is not small independent noise: ReLU masks flip
at 1 bit, and AQ's averaging is a deterministic error, often coherent across the samples
of a batch, which a weight gradient then sums up (sensitivity.propagate prices it).

Cost: the exact reference pass, and in its backward one extra call of every node plus,
for each node that saved float tensors, one call and one per tensor and measured level:
a few backward passes in total, whatever the number of tensors, where the published
probe needs three passes per tensor.

Nodes are called under no_grad with fresh copies of their inputs; noise comes from a
private generator (global random state untouched). A node that saved a tensor but was not
seen before backward reached it (it lies downstream of the model output and of every
other save) cannot be measured: its tensors get the largest measured sensitivities.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

import aqcore
from aqcore import Level

from .autoprec import Measurement
from .packing import Unit

Grads = tuple[Optional[torch.Tensor], ...]


def _sq(t: Optional[torch.Tensor]) -> torch.Tensor:
    """||t||^2 as a float64 scalar on t's device."""
    if t is None:
        return torch.zeros((), dtype=torch.float64)
    return t.detach().double().square().sum()


def _as_tuple(out) -> Grads:
    return out if isinstance(out, tuple) else (out,)


def _is_leaf(node) -> bool:
    return type(node).__name__ == "AccumulateGrad"


class Propagation(Measurement):
    """A tracer for the reference pass that also measures local noise propagation at
    each of `levels`."""

    def __init__(self, ladder: Sequence[Level], group_size: int, levels: Sequence[Level],
                 seed: Callable[[int], int]) -> None:
        super().__init__(ladder, group_size)
        self.levels = tuple(levels)
        self.seed = seed
        self._nodes: dict = {}                      # node -> index, every node seen
        self._node_list: list = []                  # index -> node (hooks hold indices)
        self._order: list = []                      # nodes in the order backward ran them
        self._gains: dict = {}                      # node -> g_nk per output k
        self._effects: list = []                    # (tid, level index, node, [||D_k||^2], ||d||^2)
        self._units: "weakref.WeakValueDictionary[int, Unit]" = weakref.WeakValueDictionary()
        self._unmeasured: set[int] = set()
        self._recording: Optional[set] = None
        self._perturbed: Optional[tuple[Unit, torch.Tensor]] = None
        self._manual = False
        self._generators: dict = {}

    # ------------------------------------------------------------------ tracer

    def on_pack(self, x: torch.Tensor, unit: Optional[Unit], new: bool) -> None:
        super().on_pack(x, unit, new)
        if new and unit.tid is not None:
            self._units[unit.tid] = unit
        if x.grad_fn is not None:
            self._walk(x.grad_fn)

    def on_unpack(self, unit: Unit) -> Optional[torch.Tensor]:
        if unit.tid is None:
            return None
        if self._recording is not None:
            self._recording.add(unit.tid)
        if self._perturbed is not None and self._perturbed[0] is unit:
            return self._perturbed[1]
        if not self._manual and torch._C._current_autograd_node() not in self._gains:
            self._unmeasured.add(unit.tid)
        return None

    @contextlib.contextmanager
    def watching(self, module: nn.Module):
        """Also walk the graph from the model's outputs (nodes after the last save)."""
        handle = module.register_forward_hook(self._walk_outputs)
        try:
            yield self
        finally:
            handle.remove()

    # ------------------------------------------------------------------ graph

    def _walk_outputs(self, module, args, output) -> None:
        for t in _tensors(output):
            if t.grad_fn is not None:
                self._walk(t.grad_fn)

    def _walk(self, root) -> None:
        stack = [root]
        while stack:
            node = stack.pop()
            if node is None or node in self._nodes or _is_leaf(node):
                continue
            self._nodes[node] = len(self._node_list)
            self._node_list.append(node)
            node.register_prehook(_prehook(weakref.ref(self), self._nodes[node]))
            stack.extend(fn for fn, _ in node.next_functions)

    def _measure(self, node, grad_outputs: Grads) -> None:
        """Gains of node, and the effect of each float tensor it saved (see module doc)."""
        self._order.append(node)
        self._manual = True
        try:
            with torch.no_grad():
                noise = tuple(None if g is None else self._randn_like(g) for g in grad_outputs)
                self._recording = set()
                response = _as_tuple(node(*noise))
                held, self._recording = self._recording, None
                den = sum(float(_sq(v)) for v in noise)
                self._gains[node] = [float(_sq(r)) / den if den > 0 else 0.0 for r in response]
                if held:
                    self._effects_of(node, grad_outputs, sorted(held))
        except Exception as error:  # a node that cannot be called again: pass noise through
            warnings.warn(f"gact_aq: sensitivity propagation cannot re-run {type(node).__name__} "
                          f"({error}); treating it as neutral", stacklevel=2)
            self._gains[node] = [1.0] * len(node.next_functions)
        finally:
            self._manual, self._recording, self._perturbed = False, None, None

    def _effects_of(self, node, grad_outputs: Grads, tids: list[int]) -> None:
        base = _as_tuple(node(*_copies(grad_outputs)))
        for tid in tids:
            unit = self._units.get(tid)
            if unit is None:
                continue
            exact = unit.restore()
            for j, level in enumerate(self.levels):
                noisy = aqcore.decompress(aqcore.compress(exact, level, seed=self.seed(tid),
                                                          group_size=self.group_size))
                self._perturbed = (unit, noisy)
                changed = _as_tuple(node(*_copies(grad_outputs)))
                self._perturbed = None
                deltas = [_sq(None if a is None or b is None else a - b)
                          for a, b in zip(changed, base)]
                self._effects.append((tid, j, node, deltas, _sq(noisy - exact)))

    def _randn_like(self, g: torch.Tensor) -> torch.Tensor:
        gen = self._generators.get(g.device)
        if gen is None:
            gen = self._generators[g.device] = torch.Generator(g.device).manual_seed(self.seed(-1))
        return torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype)

    # ------------------------------------------------------------------ result

    def sensitivities(self) -> np.ndarray:
        """r_x(l): (tensors, levels) gradient variance per unit of squared error, then
        drops every reference to the graph."""
        try:
            gain = self._upstream_gains()
            result = np.zeros((len(self.shapes), len(self.levels)))
            for tid, j, node, deltas, noise in self._effects:
                if tid >= len(result) or float(noise) <= 0:
                    continue
                reach = [_reach(fn, gain) for fn, _ in node.next_functions]
                result[tid, j] += sum(float(d) * r for d, r in zip(deltas, reach)) / float(noise)
            missing = [t for t in self._unmeasured if t < len(result)]
            if missing and len(missing) < len(result):
                result[missing] = result.max(axis=0)
            return result
        finally:
            self._nodes.clear()
            self._node_list.clear()
            self._order.clear()
            self._gains.clear()
            self._effects.clear()

    def _upstream_gains(self) -> dict:
        """a(n) for every node backward ran, from the inputs side (reverse run order)."""
        gain: dict = {}
        for node in reversed(self._order):
            gain[node] = sum(g * _reach(fn, gain)
                             for (fn, _), g in zip(node.next_functions, self._gains[node]))
        return gain


def _prehook(tracer_ref, index: int):
    """A node pre-hook that holds no reference to the node or the tracer (no cycles
    through the graph, which Python's collector cannot see)."""
    def prehook(grad_outputs):
        tracer = tracer_ref()
        if tracer is not None and index < len(tracer._node_list):
            tracer._measure(tracer._node_list[index], grad_outputs)
    return prehook


def _reach(fn, gain: dict) -> float:
    """How much of the noise entering fn ends up in parameter gradients."""
    if fn is None:
        return 0.0
    return 1.0 if _is_leaf(fn) else gain.get(fn, 0.0)


def _copies(grads: Grads) -> Grads:
    return tuple(None if g is None else g.clone() for g in grads)


def _tensors(output):
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _tensors(item)
