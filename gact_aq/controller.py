"""The Controller: compressed saved activations for one model.

    ctl = Controller(model)        # copies gact_aq.config as it is now
    ctl.install_hook()             # or: with Controller(model) as ctl:
    for batch in data:
        loss = model(batch); loss.backward(); optimizer.step()
        ctl.iterate(backprop)      # backprop(): zero_grad, forward, backward on a few samples
    ctl.uninstall_hook()

Everything per model lives here (levels, sensitivities, seeds, iteration), so two
controllers in one process do not interfere. Tensor ids are the save order of compressed
tensors in a forward; a forward that saves something new gets the start level for it.

Levels are re-allocated at iterations 0, 1, 2, 4, 8, ... (doubling) until adapt_interval,
then every adapt_interval: sensitivities change fastest early in training, when the
weights move most. A GradientGuard (aqcore/guard.py) watches every backward's gradients
on the device; after a bad step (non-finite, or a jump far above the running norm: the
guard zeroed its gradients, so the optimizer step did nothing) `iterate` re-measures the
sensitivities and bars the lowest level in use, and says so once.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import aqcore
from aqcore import Level
from aqcore.guard import GradientGuard

from . import settings
from .autoprec import LevelPlan, allocate, rounding_seed
from .packing import EXACT, Packer, Plan, Tracer
from .probing import Gradients, Prober
from .report import Report
from .sensitivity import ESTIMATORS

TRAINING_PASS = 0


class Controller:
    """Saved-tensor hooks plus AutoPrecision for `model` (plain or DistributedDataParallel).

    config: defaults to a copy of gact_aq.config as it is now. seed: mixed into every
    rounding seed (with iteration, pass, tensor id and rank). After an adaptation,
    `levels` / `shapes` / `sensitivity` hold one entry per tensor id and `extra_passes`
    the number of backprop() calls it made.
    """

    def __init__(self, model: nn.Module, config: Optional[settings.QuantizationConfig] = None,
                 seed: int = 0) -> None:
        self.config = replace(config if config is not None else settings.config).validate()
        self.model = model
        self.module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.seed = int(seed)
        self.iteration = 0
        self.levels: list[Level] = []
        self.shapes: list[tuple[int, ...]] = []
        self.sensitivity = np.zeros(0)
        self.extra_passes = 0
        self.floor = 0.0  # levels whose codes take fewer bits per value are barred (guard)
        self.guard_events: list[dict] = []
        cfg = self.config
        self.guard = GradientGuard(self.module.parameters()) if cfg.compress and cfg.guard else None
        self.packer = Packer(cfg.min_numel, cfg.group_size, cfg.compress, cfg.swap)
        self.packer.after_backward = None if self.guard is None else self.guard.check
        self.packer.plan = self._training_plan()
        self._hooks: Optional[torch.autograd.graph.saved_tensors_hooks] = None

    # ------------------------------------------------------------------ hooks

    def install_hook(self) -> None:
        if self._hooks is not None:
            raise RuntimeError("the hooks of this Controller are already installed")
        self._protect_model_state()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.packer.pack, self.packer.unpack)
        self._hooks.__enter__()

    def uninstall_hook(self) -> None:
        if self._hooks is not None:
            hooks, self._hooks = self._hooks, None
            hooks.__exit__(None, None, None)

    @property
    def installed(self) -> bool:
        return self._hooks is not None

    def __enter__(self) -> "Controller":
        self.install_hook()
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall_hook()

    # ------------------------------------------------------------------ training loop

    def iterate(self, backprop: Optional[Callable[[], object]] = None) -> None:
        """Call once per training step, after optimizer.step(). At iterations 0, 1, 2, 4, ...
        and then every adapt_interval, and after a guard alarm, it re-allocates levels,
        running backprop() for the sensitivity passes. Without backprop the levels in force
        stay (the first allocation needs it: auto precision has no levels before)."""
        cfg = self.config
        alarm = self.guard is not None and self.guard.alarm()
        if alarm:
            self._raise_floor()
        if cfg.compress and cfg.auto_prec and (alarm or self._adaptation_due()):
            if backprop is not None:
                self.adapt(backprop)
            elif not self.levels:
                raise ValueError("iterate(backprop) needs backprop (zero_grad + forward + "
                                 "backward) to measure sensitivities with auto precision")
        if alarm:
            self._tell_recovery()
        self.iteration += 1
        self.packer.new_pass()
        self.packer.plan = self._training_plan()
        self._protect_model_state()

    def adapt(self, backprop: Callable[[], object]) -> None:
        """Measure sensitivities with backprop() and allocate levels (AutoPrecision)."""
        prober = Prober(self.model, self.module, backprop)
        ladder = settings.ladder(self.config)
        watch, self.packer.after_backward = self.packer.after_backward, None
        try:
            with self._hooks_installed(), prober.frozen():
                sensitivity, measurement, variance = ESTIMATORS[self.config.sensitivity](
                    self, prober, ladder)
        finally:
            self.packer.after_backward = watch
            self.extra_passes = prober.passes
            self.packer.new_pass()
            self.packer.plan = self._training_plan()
        if not measurement.numels:
            raise ValueError(
                "nothing to compress: backprop() saved no floating activation (a tensor of 2 "
                "or more dims that requires grad and is not a parameter or buffer); does it "
                "run the model's forward and backward?")
        sensitivity, variance = _averaged_over_ranks(sensitivity, variance)
        usable = np.isfinite(measurement.errors)  # inf: a level the tensor may not take
        if not (np.isfinite(sensitivity).all() and np.isfinite(variance[usable]).all()):
            warnings.warn("gact_aq: non-finite gradients in the sensitivity pass; keeping the "
                          "previous levels", stacklevel=2)
            return
        self.sensitivity = sensitivity
        self.shapes = list(measurement.shapes)
        barred = np.array([self._below_floor(level) for level in ladder])
        variance = np.where(barred, np.inf, variance)
        cheapest = np.where(np.isfinite(variance), [l.bits_per_value for l in ladder], np.inf).min(1)
        sizes = np.asarray(measurement.numels, dtype=np.float64)
        # the target counts every saved value, the recomputed ones too (at 0 bits)
        bit = self.config.bit * (sizes.sum() + measurement.derived_numel) / sizes.sum()
        bit = max(bit, float(sizes @ cheapest / sizes.sum()))
        self.levels = allocate(measurement.numels, variance, ladder, bit)
        self.packer.plan = self._training_plan()

    # ------------------------------------------------------------------ guard

    def _adaptation_due(self) -> bool:
        it, interval = self.iteration, self.config.adapt_interval
        return it % interval == 0 or (it < interval and it & (it - 1) == 0)

    def _below_floor(self, level: Level) -> bool:
        return not level.is_raw and level.codes_level.bits_per_value < self.floor

    def _in_use(self) -> list[Level]:
        if self.config.auto_prec and self.levels:
            return list(self.levels)
        return [settings.start_level(self.config, zeros) for zeros in (False, True)]

    def _raise_floor(self) -> None:
        """Bar the lowest level in use: the floor rises to the next precision of the ladder."""
        lowest = min((l.codes_level.bits_per_value for l in self._in_use() if not l.is_raw),
                     default=32.0)
        rungs = sorted({l.codes_level.bits_per_value for l in settings.ladder(self.config)} | {32.0})
        self.floor = next((r for r in rungs if r > max(lowest, self.floor)), 32.0)

    def _tell_recovery(self) -> None:
        sizes = [math.prod(s) for s in self.shapes]
        levels = self._in_use()
        bits = (sum(n * l.bits_per_value for n, l in zip(sizes, levels)) / sum(sizes)
                if self.config.auto_prec and self.levels else self.config.bit)
        event = {"iteration": self.iteration, "floor": self.floor, "bits": bits}
        self.guard_events.append(event)
        floor = "every level (all tensors exact)" if self.floor >= 32 else \
            f"levels under {self.floor:g} bits per stored value"
        warnings.warn(
            f"gact_aq: at step {self.iteration} the gradients became non-finite or jumped far "
            f"above their running norm; that step's gradients were zeroed (the optimizer step "
            f"changed nothing), the sensitivities re-measured and {floor} barred: about "
            f"{bits:.2f} bits per value from now on", stacklevel=3)

    # ------------------------------------------------------------------ passes

    def run_pass(self, prober: Prober, levels: dict[int, Level], pass_id: int,
                 tracer: Optional[Tracer] = None) -> Gradients:
        """One probe pass: listed tensor ids at the given levels, all others kept exact."""
        self.packer.new_pass()
        self.packer.plan = _ProbePlan(levels, lambda tid: self.seed_for(pass_id, tid))
        self.packer.tracer = tracer
        try:
            return prober.run()
        finally:
            self.packer.tracer = None

    def seed_for(self, pass_id: int, tid: int) -> int:
        """The rounding seed of a tensor in a pass of this iteration on this rank."""
        return rounding_seed(self.seed, self.iteration, pass_id, tid, _rank())

    def _protect_model_state(self) -> None:
        """Parameters and buffers (and views of them) are never compressed."""
        self.packer.protected = {StorageWeakRef(t.untyped_storage())
                                 for t in (*self.module.parameters(), *self.module.buffers())}

    def _training_plan(self) -> Plan:
        cfg = self.config
        starts = {zeros: self._lifted(settings.start_level(cfg, zeros)) if cfg.compress else EXACT
                  for zeros in (False, True)}
        levels = [self._lifted(level) for level in self.levels] if cfg.auto_prec else []
        return LevelPlan(levels, self.shapes, starts.__getitem__,
                         lambda tid: self.seed_for(TRAINING_PASS, tid))

    def _lifted(self, level: Level) -> Level:
        """level, or the cheapest ladder level at the floor when it lies below."""
        if not self._below_floor(level):
            return level
        usable = [l for l in (*settings.ladder(self.config), EXACT)
                  if not self._below_floor(l) and settings.may_take(l, level.zeros)]
        return min(usable, key=lambda l: l.bits_per_value)

    @contextlib.contextmanager
    def _hooks_installed(self):
        if self.installed:
            yield
            return
        self.install_hook()
        try:
            yield
        finally:
            self.uninstall_hook()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "levels": [level.name for level in self.levels],
            "shapes": [list(shape) for shape in self.shapes],
            "sensitivity": self.sensitivity.tolist(),
            "floor": self.floor,
            "guard": None if self.guard is None else self.guard.state_dict(),
            "guard_events": list(self.guard_events),
        }

    def load_state_dict(self, state: dict) -> None:
        levels = [aqcore.parse_level(name) for name in state["levels"]]
        if not (len(levels) == len(state["shapes"]) == len(state["sensitivity"])):
            raise ValueError("inconsistent Controller state: levels, shapes and sensitivity "
                             "must have one entry per tensor")
        self.iteration = int(state["iteration"])
        self.levels = levels
        self.shapes = [tuple(int(n) for n in shape) for shape in state["shapes"]]
        self.sensitivity = np.asarray(state["sensitivity"], dtype=np.float64)
        self.floor = float(state.get("floor", 0.0))
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        self.guard_events[:] = state.get("guard_events", [])
        self.packer.new_pass()
        self.packer.plan = self._training_plan()

    def report(self) -> Report:
        """Per compressed tensor alive now: shape, level, bytes held, sensitivity."""
        return Report.build(self.packer, self.sensitivity)


class _ProbePlan(Plan):
    measures = True

    def __init__(self, levels: dict[int, Level], seeds) -> None:
        self.levels = levels
        self.seeds = seeds

    def level(self, tid: int, x: torch.Tensor, zeros: bool) -> Level:
        return self.levels.get(tid, EXACT)

    def seed(self, tid: int) -> int:
        return self.seeds(tid)


def _averaged_over_ranks(sensitivity: np.ndarray, variance: np.ndarray):
    """Means over ranks (one small all-reduce), so every rank allocates the same levels."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sensitivity, variance
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    both = torch.tensor(np.concatenate([sensitivity, variance.ravel()]), dtype=torch.float64,
                        device=device)
    dist.all_reduce(both)
    both = (both / dist.get_world_size()).cpu().numpy()
    return both[:len(sensitivity)], both[len(sensitivity):].reshape(variance.shape)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
