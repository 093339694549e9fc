"""Extra forward/backward passes for sensitivity estimation, with nothing left behind.

A probe pass runs the user's backprop() closure (zero_grad, forward, backward) with a
given plan of levels and returns the parameter gradients. Around all passes of one
adaptation, `frozen` keeps the training state as it was (docs/frameworks.md lists what
the published probes disturbed):

* buffers (BatchNorm / SyncBatchNorm / InstanceNorm running statistics, counters, and any
  other buffer a forward updates) are restored after every pass;
* Python, NumPy, torch CPU and CUDA random states are restored; every pass starts from the
  same state, so all passes see the same dropout masks and only quantization differs;
* the parameters' .grad are set aside and put back (the closure may zero them in place);
* under DistributedDataParallel the passes run in no_sync(): no gradient all-reduce.
The optimizer is never touched.
"""
from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

Gradients = list[Optional[torch.Tensor]]


class RandomState:
    """Every global random generator a training step may draw from."""

    def __init__(self) -> None:
        self.python = random.getstate()
        self.numpy = np.random.get_state()
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class Prober:
    """Runs probe passes of one model inside `frozen`."""

    def __init__(self, model: nn.Module, module: nn.Module, backprop: Callable[[], object]) -> None:
        self.model = model          # what the closure calls (maybe DDP-wrapped)
        self.module = module        # the wrapped module: parameters and buffers
        self.backprop = backprop
        self._rng: Optional[RandomState] = None
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.passes = 0

    @contextlib.contextmanager
    def frozen(self) -> Iterator["Prober"]:
        params = [p for p in self.module.parameters()]
        grads = [p.grad for p in params]
        self._rng = RandomState()
        self._buffers = [(b, b.detach().clone()) for b in self.module.buffers()]
        no_sync = getattr(self.model, "no_sync", contextlib.nullcontext)
        try:
            with no_sync():
                yield self
        finally:
            self._restore_buffers()
            self._rng.restore()
            for p, g in zip(params, grads):
                p.grad = g

    def run(self) -> Gradients:
        """One pass; returns each parameter's gradient (None where it got none)."""
        params = list(self.module.parameters())
        for p in params:
            p.grad = None
        self._rng.restore()
        self.backprop()
        self.passes += 1
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        self._restore_buffers()
        return grads

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            for buffer, saved in self._buffers:
                buffer.copy_(saved)


def sq_distance(a: Gradients, b: Gradients) -> float:
    """||a - b||^2 over all parameters (a missing gradient counts as zero)."""
    total = 0.0
    for x, y in zip(a, b):
        if x is None and y is None:
            continue
        diff = x if y is None else (-y if x is None else x - y)
        total += float(diff.double().square().sum())
    return total
