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
"""
from __future__ import annotations

import contextlib
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
        cfg = self.config
        self.packer = Packer(cfg.min_numel, cfg.group_size, cfg.compress, cfg.swap)
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
        """Call once per training step, after optimizer.step(). Every adapt_interval
        iterations (the first right away) it re-allocates levels, running backprop()
        for the sensitivity passes."""
        cfg = self.config
        if cfg.compress and cfg.auto_prec and self.iteration % cfg.adapt_interval == 0:
            if backprop is None:
                raise ValueError("iterate(backprop) needs backprop (zero_grad + forward + "
                                 "backward) to measure sensitivities with auto precision")
            self.adapt(backprop)
        self.iteration += 1
        self.packer.new_pass()
        self.packer.plan = self._training_plan()
        self._protect_model_state()

    def adapt(self, backprop: Callable[[], object]) -> None:
        """Measure sensitivities with backprop() and allocate levels (AutoPrecision)."""
        prober = Prober(self.model, self.module, backprop)
        ladder = settings.ladder(self.config)
        try:
            with self._hooks_installed(), prober.frozen():
                sensitivity, measurement, variance = ESTIMATORS[self.config.sensitivity](
                    self, prober, ladder)
        finally:
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
        self.levels = allocate(measurement.numels, variance, ladder, self.config.bit)
        self.packer.plan = self._training_plan()

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
        starts = {zeros: settings.start_level(cfg, zeros) if cfg.compress else EXACT
                  for zeros in (False, True)}
        levels = self.levels if cfg.auto_prec else []
        return LevelPlan(levels, self.shapes, starts.__getitem__,
                         lambda tid: self.seed_for(TRAINING_PASS, tid))

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
