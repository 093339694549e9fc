"""A watch on the gradients of compressed training: device-side, no host sync per step.

Compression changes only what backward reads, so when it goes wrong it shows in the
gradients first: they become non-finite, or their norm jumps far above its own recent
history (a backward error that grows layer by layer). `check()` runs after a backward:
it computes the global gradient norm on the gradients' device and, when the step is bad,
zeroes the gradients, so the optimizer step that follows changes nothing (no NaN reaches
the weights) — all without reading anything back to the host. `alarm()` is the host's
side: it reports a bad step once a non-blocking copy of the alarm count has landed, so the
owner (a framework's controller) can re-measure and raise its levels.

A step is bad when its norm is not finite, or when, after `warmup` good steps, it exceeds
`factor` times the recent peak: the largest good norm so far, decaying by DECAY per step
(so it follows the norm down over a few hundred steps). Measured against the peak, not
an average, because exact training's norms legitimately jump: a small BERT's went from
0.3 to 13 within four steps as it started to learn, then swung between 1.5 and 30 (an
average-based rule flagged nine of those steps); explosions from compression grow by a
large factor on every step (0.37, 1.5, 7, 83, 6e3, ..., inf in issue 9's trace).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from . import kernels

FACTOR = 10.0       # a jump this many times the recent peak norm is an explosion
WARMUP = 20         # good steps before jumps count (the first steps' norms move fast)
DECAY = 0.99        # of the recent peak, per good step


class GradientGuard:
    """Watches the .grad of `parameters` (on one device) after each backward."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], factor: float = FACTOR,
                 warmup: int = WARMUP) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.factor = float(factor)
        self.warmup = int(warmup)
        self.steps = 0                          # checks made (host count)
        self._state: torch.Tensor | None = None  # (log peak norm, good steps, alarms)
        self._host: torch.Tensor | None = None
        self._copied: "torch.cuda.Event | None" = None
        self._seen = 0

    def check(self) -> None:
        """After a backward: zero the gradients of a bad step (device ops only)."""
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if not grads:
            return
        device = grads[0].device
        if self._state is None:
            self._state = torch.zeros(3, device=device)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        log_norm = torch.log(norm)
        peak, good, alarms = self._state.unbind()
        jumped = (good >= self.warmup) & (log_norm > peak + math.log(self.factor))
        bad = ~torch.isfinite(norm) | jumped
        updated = torch.where(good == 0, log_norm, torch.maximum(peak + math.log(DECAY), log_norm))
        self._state = torch.stack([torch.where(bad, peak, updated),
                                   good + (~bad).float(), alarms + bad.float()])
        _zero_if(bad, grads)
        self.steps += 1
        self._publish()

    def _publish(self) -> None:
        """Start the copy of the alarm count to the host (non-blocking on CUDA)."""
        if self._state.device.type != "cuda":
            self._host = self._state[2:]
            return
        if self._host is None or self._host.device.type != "cpu" or not self._host.is_pinned():
            self._host = torch.empty(1, pin_memory=True)
            self._copied = torch.cuda.Event()
        self._host.copy_(self._state[2:], non_blocking=True)
        self._copied.record()

    def alarm(self) -> bool:
        """Whether a bad step happened since the last alarm (False while the count is
        still on its way to the host: it is looked at again on the next call)."""
        if self._host is None or (self._copied is not None and not self._copied.query()):
            return False
        count = int(self._host.item())
        fired, self._seen = count > self._seen, count
        return fired

    def state_dict(self) -> dict:
        """The running statistics (recent peak norm, good steps, alarms): a resumed run that
        lost them would start its warm-up of unchecked jumps again."""
        statistics = None if self._state is None else self._state.tolist()  # JSON-ready
        return {"steps": self.steps, "state": statistics, "seen": self._seen}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self._seen = int(state["steps"]), int(state["seen"])
        device = self.parameters[0].device if self.parameters else "cpu"
        self._state = None if state["state"] is None else torch.tensor(state["state"], device=device)
        self._host = None  # the alarm count is published again by the next check

    def peak_norm(self) -> float:
        """The recent peak gradient norm (reads the device: for reports, not the loop)."""
        return math.exp(self._state[0].item()) if self._state is not None else math.nan


def _zero_if(flag: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Zero every tensor where the 0-dim bool flag is set: on CUDA the dense ones in a few
    kernel launches (one masked_fill per tensor cost 5% of a ResNet-50 step in host time)."""
    fast = flag.is_cuda and kernels.available()
    by_kernel = [fast and t.is_cuda and t.is_non_overlapping_and_dense() for t in tensors]
    if any(by_kernel):
        kernels.zero_if(flag, [t for t, k in zip(tensors, by_kernel) if k])
    for t, k in zip(tensors, by_kernel):
        if not k:
            t.masked_fill_(flag, 0)
