"""AutoPrecision: one level per saved tensor, least predicted gradient variance for the
budget (docs/frameworks.md; levels: docs/levels.md, error model: docs/errors.md).

V[i, l], the gradient variance tensor i adds at level l, is about C_i * e_i(l): C_i its
sensitivity (gradient variance per unit of squared activation error) and e_i(l) the
expected squared error of storing it at l, measured on the data by aqcore.level_errors
(0 at 32 bits: stored as is); sensitivity.py says how each estimator predicts V. aqcore's
solver minimises sum_i V[i, l_i] under sum_i numel_i bits(l_i) <= bit * sum_i numel_i.
"""
from __future__ import annotations

import hashlib
import math
import struct
from typing import Optional, Sequence

import numpy as np
import torch

import aqcore
from aqcore import Level
from aqcore.errors import error_terms
from aqcore.solver import allocate_bits

from .packing import ZEROS, Plan, Tracer, Unit, channel_major

# Rounding noise is fresh every step, and the optimizer's momentum (m = 0.9 in SGD and Adam
# alike) averages it over about (1 + m) / (1 - m) = 19 steps; AQ's averaging error is the
# same every step, a bias that no averaging removes: the allocation prices it that much
# dearer than noise of the same energy.
BIAS_WEIGHT = 19.0


def rounding_seed(*parts: int) -> int:
    """A 63-bit seed from (controller salt, iteration, pass, tensor id, rank): hashed, so
    seeds of neighbouring tensors and iterations are unrelated (GACT used seed_iter + tid,
    so tensor t at iteration i reused the noise of tensor t + 1 at iteration i - 1)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def allowed(level: Level, zeros: bool) -> bool:
    """Whether a tensor may be stored at level: one whose zeros must stay exact (a ReLU
    output) takes only levels that keep them, any other takes every level but those."""
    return aqcore.zero_safe(level) is level if zeros else not level.zeros


def tensor_errors(x: torch.Tensor, levels: Sequence[Level], group_size: int,
                  zeros: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(expected squared error, its deterministic part) of storing x at each level: 0 for
    levels kept as is, inf for levels it may not take (allowed). Plain levels group x in
    its memory order, AQ levels in packing.channel_major order, as the packer stores them."""
    x = x.detach()
    measured = {}
    for aq, rows in ((False, aqcore.sample_rows(x).reshape(1, -1)), (True, channel_major(x).reshape(1, -1))):
        quantized = tuple(l for l in levels if allowed(l, zeros) and not l.is_raw and l.is_aq == aq)
        deviation, rounding = error_terms(rows, group_size, quantized)
        measured.update(zip(quantized, zip((deviation + rounding)[0].tolist(), deviation[0].tolist())))
    return tuple(np.array([0.0 if level.is_raw else measured.get(level, (np.inf, np.inf))[part]
                           for level in levels]) for part in (0, 1))


def priced(errors: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The error the allocation weighs: rounding noise as it is, the deterministic part of
    AQ (averaging) BIAS_WEIGHT times."""
    with np.errstate(invalid="ignore"):  # inf - inf: a level the tensor may not take
        return np.where(np.isfinite(errors), errors + (BIAS_WEIGHT - 1) * bias, errors)


def same_but_batch(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and a[1:] == b[1:]


def allocate(sizes: Sequence[int], variance: np.ndarray, levels: Sequence[Level],
             bit: float) -> list[Level]:
    """The solver's levels for tensors of these sizes at an average of `bit` bits per
    value, minimising the predicted added gradient variance sum_i variance[i, l_i]."""
    sizes = np.asarray(sizes, dtype=np.float64)
    level_bits = np.array([level.bits_per_value for level in levels])
    choice = allocate_bits(sizes, np.ones(len(sizes)), variance, level_bits,
                           bit * sizes.sum(), method="exact")
    return [levels[i] for i in choice]


class Measurement(Tracer):
    """Sizes, kinds and per-level errors of the float tensors of a pass, by tensor id."""

    def __init__(self, ladder: Sequence[Level], group_size: int) -> None:
        self.ladder = tuple(ladder)
        self.group_size = group_size
        self.shapes: list[tuple[int, ...]] = []
        self.zeros = np.zeros(0, dtype=bool)
        self.derived_numel = 0
        self.errors = np.zeros((0, len(self.ladder)))   # expected squared error
        self.priced = np.zeros((0, len(self.ladder)))   # what the allocation weighs (priced)
        self._errors: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def on_pack(self, x: torch.Tensor, unit: Optional[Unit], new: bool) -> None:
        if new and unit.tid is not None:
            self._errors[unit.tid] = tensor_errors(x, self.ladder, self.group_size,
                                                   unit.kind == ZEROS)

    def finish(self, seen: Sequence[torch.Size], kinds: Sequence[str], derived_numel: int = 0) -> None:
        """seen, kinds: the pass's float-unit shapes and kinds by tensor id; derived_numel:
        the values it recomputes instead of storing (Packer)."""
        self.shapes = [tuple(shape) for shape in seen]
        self.derived_numel = derived_numel
        self.zeros = np.array([kind == ZEROS for kind in kinds], dtype=bool)
        if seen:
            errors, bias = (np.stack(part) for part in zip(*(self._errors[tid] for tid in range(len(seen)))))
            self.errors, self.priced = errors, priced(errors, bias)

    @property
    def numels(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    def error_at(self, level: Level) -> np.ndarray:
        return self.errors[:, self.ladder.index(level)]

    def priced_at(self, level: Level) -> np.ndarray:
        return self.priced[:, self.ladder.index(level)]


class LevelPlan(Plan):
    """Levels by tensor id from the last allocation. A tensor counts as the one allocated
    under its id if its shape matches but for dim 0 (batch sizes may differ from the
    backprop() closure's); anything else (a new id, a changed graph) gets the fallback of
    its kind, fallback(zeros)."""

    def __init__(self, levels: Sequence[Level], shapes: Sequence[tuple[int, ...]],
                 fallback, seeds) -> None:
        self.levels = list(levels)
        self.shapes = [tuple(s) for s in shapes]
        self.fallback = fallback
        self.seeds = seeds

    def level(self, tid: int, x: torch.Tensor, zeros: bool) -> Level:
        if tid < len(self.levels) and same_but_batch(self.shapes[tid], tuple(x.shape)):
            return self.levels[tid]
        return self.fallback(zeros)

    def seed(self, tid: int) -> int:
        return self.seeds(tid)
