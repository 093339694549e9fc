"""The default sensitivity estimator: local noise propagation through the autograd graph.

Why it is right to first order. Error d in a saved tensor x changes the backward only
inside the nodes that saved x (its consumers). For a consumer c that receives the
gradient gy, the change of each of its outputs k,

    D_ck = c(gy; x + d)_k - c(gy; x)_k,

is computed exactly: just before backward runs c, c is called once more with a compressed
copy of x (the real error of a level), and the result is compared with what backward then
computes. An output that feeds a parameter (AccumulateGrad) is gradient error as it is;
one that feeds a node n travels upstream, where it adds about ||D_ck||^2 a(n), with a(n)
the gain from n to all parameter gradients:

    a(AccumulateGrad) = 1,   a(n) = sum_k g_nk a(next_k),   g_nk = ||out_k||^2 / ||in||^2

with g_nk the squared-norm gain of node n on the gradient backward passes through it
(free: read in a post-hook). Errors on different paths are taken as independent. So
storing x at level l adds about V_x(l) = sum_c sum_k ||D_ck(l)||^2 a(next_k) to the
gradient variance, and r_x(l) = V_x(l) / ||d(l)||^2 is its sensitivity at that level.

This is ActNN's insight (the error a layer's weight gradient gets is the noise times the
gradient at its output) generalized to any node, plus the indirect terms ActNN drops
(normalization statistics, attention). The measured level (1 bit; 2 bits for a tensor
that keeps exact zeros, whose 1-bit form does not exist) is compressed for real, so
nonlinear effects are in the measurement.

Cost: the exact reference pass, plus one call of each node that saved float tensors per
tensor and measured level, i.e. about one more backward computation of those nodes, and
the compressions they need, whatever the number of tensors; the published probe needs
three full passes per tensor. Gains cost
nothing extra. The test models rank tensors like the probe (Spearman >= 0.8,
tests/test_gact_sensitivity.py; benchmark/gact_sensitivity.py has the numbers).

Nodes are called under no_grad with fresh copies of their inputs, and only nodes whose
saved tensors all went through our hooks (so recomputing checkpointed regions or other
hooks' single-use tensors is never triggered); saves made during those calls are left
alone. A node that saved a tensor but was not seen before backward reached it (it lies
downstream of the model output and of every other save) cannot be measured: its tensors
get the largest measured sensitivities.
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
from aqcore.nested import tensors

from .autoprec import Measurement
from .packing import ZEROS, Unit, held_units

Grads = tuple[Optional[torch.Tensor], ...]


def _sq(t: Optional[torch.Tensor]) -> float:
    if t is None:
        return 0.0
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2


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
        self._pending: dict = {}                    # node -> [(tid, level index, outputs, ||d||^2)]
        self._effects: list = []                    # (tid, level index, node, [||D_k||^2], ||d||^2)
        self._units: "weakref.WeakValueDictionary[int, Unit]" = weakref.WeakValueDictionary()
        self._unmeasured: set[int] = set()
        self._saved_names: dict[type, list[str]] = {}
        self._failed: set[type] = set()
        self._perturbed: Optional[tuple[Unit, torch.Tensor]] = None
        self._manual = False

    # ------------------------------------------------------------------ tracer

    def on_pack(self, x: torch.Tensor, unit: Optional[Unit], new: bool) -> None:
        super().on_pack(x, unit, new)
        if new and unit.tid is not None:
            self._units[unit.tid] = unit
        if x.grad_fn is not None:
            self._walk(x.grad_fn)

    @property
    def bypass(self) -> bool:
        return self._manual

    def on_unpack(self, unit: Unit) -> Optional[torch.Tensor]:
        if unit.tid is None:
            return None
        if self._perturbed is not None and self._perturbed[0] is unit:
            return self._perturbed[1]
        if not self._manual and torch._C._current_autograd_node() not in self._pending:
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
        for t in tensors(output):
            if t.grad_fn is not None:
                self._walk(t.grad_fn)

    def _walk(self, root) -> None:
        stack = [root]
        while stack:
            node = stack.pop()
            if node is None or node in self._nodes or _is_leaf(node):
                continue
            index = self._nodes[node] = len(self._node_list)
            self._node_list.append(node)
            node.register_prehook(_hook(weakref.ref(self), index, Propagation._before))
            node.register_hook(_hook(weakref.ref(self), index, Propagation._after))
            stack.extend(fn for fn, _ in node.next_functions)

    def _before(self, node, grad_outputs: Grads) -> None:
        """Before backward runs node: its outputs with each saved float tensor compressed."""
        self._order.append(node)
        pending = self._pending[node] = []
        self._manual = True
        try:
            with torch.no_grad():
                for tid in self._held(node):
                    unit = self._units.get(tid)
                    if unit is None:
                        continue
                    exact = unit.restore()
                    for j, level in enumerate(self.levels):
                        level = aqcore.zero_safe(level) if unit.kind == ZEROS else level
                        noisy = aqcore.decompress(aqcore.compress(
                            exact, level, seed=self.seed(tid), group_size=self.group_size))
                        self._perturbed = (unit, noisy)
                        outputs = _as_tuple(_call(node, _copies(grad_outputs)))
                        pending.append((tid, j, outputs, _sq(noisy - exact)))
        except Exception as error:  # a node that cannot be read or called again
            if type(node) not in self._failed:
                self._failed.add(type(node))
                warnings.warn(f"gact_aq: sensitivity propagation cannot re-run "
                              f"{type(node).__name__} ({error}); its tensors get the largest "
                              "sensitivity", stacklevel=2)
            del self._pending[node]  # so backward's own unpacks mark its tensors unmeasured
        finally:
            self._manual, self._perturbed = False, None

    def _after(self, node, grad_inputs: Grads, grad_outputs: Grads) -> None:
        """After backward ran node: its gains, and the changes D_ck against its outputs."""
        incoming = sum(_sq(g) for g in grad_outputs)
        self._gains[node] = [_sq(g) / incoming if incoming > 0 else 0.0 for g in grad_inputs]
        for tid, j, outputs, noise in self._pending.get(node, ()):
            deltas = [_sq(None if a is None or b is None else _like(a, b) - b)
                      for a, b in zip(outputs, grad_inputs)]
            self._effects.append((tid, j, node, deltas, noise))
        self._pending[node] = []

    def _held(self, node) -> set[int]:
        """Tensor ids of the float units node saved, read from its saved slots without
        unpacking anything (other hooks, e.g. checkpoint's, allow a single unpack)."""
        names = self._saved_names.get(type(node))
        if names is None:
            names = self._saved_names[type(node)] = [
                a for a in dir(node) if a.startswith("_raw_saved_")]
        held = set()
        for name in names:
            slots = getattr(node, name)
            for slot in slots if isinstance(slots, (tuple, list)) else (slots,):
                held.update(unit.tid for unit in held_units(slot.data) if unit.tid is not None)
        return held

    # ------------------------------------------------------------------ result

    @property
    def measured_nothing(self) -> bool:
        """Whether no tensor could be measured (e.g. a torch without SavedTensor.data)."""
        return bool(self.shapes) and len(self._unmeasured) >= len(self.shapes)

    def sensitivities(self) -> np.ndarray:
        """r_x(l): (tensors, levels) gradient variance per unit of squared error, then
        drops every reference to the graph."""
        try:
            gain = self._upstream_gains()
            result = np.zeros((len(self.shapes), len(self.levels)))
            for tid, j, node, deltas, noise in self._effects:
                if tid >= len(result) or noise <= 0:
                    continue
                reach = [_reach(fn, gain) for fn, _ in node.next_functions]
                result[tid, j] += sum(d * r for d, r in zip(deltas, reach)) / noise
            missing = [t for t in self._unmeasured if t < len(result)]
            if missing and len(missing) < len(result):
                result[missing] = result.max(axis=0)
            return result
        finally:
            self._nodes.clear()
            self._node_list.clear()
            self._order.clear()
            self._gains.clear()
            self._pending.clear()
            self._effects.clear()

    def _upstream_gains(self) -> dict:
        """a(n) for every node backward ran, from the inputs side (reverse run order)."""
        gain: dict = {}
        for node in reversed(self._order):
            gain[node] = sum(g * _reach(fn, gain)
                             for (fn, _), g in zip(node.next_functions, self._gains.get(node, ())))
        return gain


def _hook(tracer_ref, index: int, method):
    """A node hook that holds no reference to the node or the tracer (no cycles through
    the graph, which Python's collector cannot see)."""
    def hook(*grads):
        tracer = tracer_ref()
        if tracer is not None and index < len(tracer._node_list):
            method(tracer, tracer._node_list[index], *grads)
    return hook


def _call(node, grads: Grads):
    """Run a backward node by hand: C++ nodes are callable, a custom autograd.Function's
    node runs its backward through apply."""
    return node(*grads) if callable(node) else node.apply(*grads)


def _reach(fn, gain: dict) -> float:
    """How much of the error entering fn ends up in parameter gradients."""
    if fn is None:
        return 0.0
    return 1.0 if _is_leaf(fn) else gain.get(fn, 0.0)


def _like(computed: torch.Tensor, engine: torch.Tensor) -> torch.Tensor:
    """A node's raw output as backward passes it on (summed to the input's shape and cast
    to its dtype, as autograd does for broadcast or cast inputs)."""
    if computed.shape != engine.shape:
        computed = computed.sum_to_size(engine.shape)
    return computed.to(engine.dtype)


def _copies(grads: Grads) -> Grads:
    return tuple(None if g is None else g.clone() for g in grads)

