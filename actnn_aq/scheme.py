"""Per-sample and per-layer precision (ALGORITHMS.md B.6-B.8 with AQ, D.3-D.4).

A Controller belongs to one converted model and owns everything the schemes learn: one
LayerScheme per compressing layer (gradient statistics, its share of the bit budget), the
sample indices of the batch, the iteration count. Nothing lives on classes, so two
models, or a teacher beside a student, never see each other's state.

The objective is ActNN's with a data-driven error model: a layer's compression adds
sum_n C_n * e_n(level_n) to the gradient variance, e_n the expected squared error of
sample n at a level (aqcore.level_errors, DESIGN.md section 5), C_n its sensitivity
(sensitivity.py; S_n = ||g_n||^2 of the layer's output gradient, ALGORITHMS.md B.6).

- Forward, per layer: the per-sample levels minimising sum_n C_n e_n(l_n) within the
  layer's bits (aqcore's solver; ladder 8, 4, 2, 1, then AQ down to aq_bit).
- End of each backward: one joint allocation over every (layer, sample) of that backward
  at the target bits; each layer's share becomes the mean bits it got (B.8).
- Before any backward: S_n = 1 and every layer at the target, so the error model alone
  decides (never the all-zero sensitivities of the original's first iterations).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

import aqcore
from aqcore import allocate_bits

from .saved import Plan, seed_for
from .sensitivity import InputNoise
from .settings import QuantizationConfig

BUDGET_SLACK = 1e-9  # relative: a layer's share, rounded, must still fit its own allocation


def rows_in_memory_order(x: torch.Tensor) -> torch.Tensor:
    """x as (N, F) rows in memory order, as aqcore groups it (channels_last stays in place)."""
    if not x.is_contiguous():
        perm = sorted(range(x.dim()), key=lambda d: -x.stride(d))
        if perm[0] == 0 and x.permute(perm).is_contiguous():
            x = x.permute(perm)
    return x.reshape(x.shape[0], -1)


class Observation:
    """One training call of a layer: what the allocation needs from its forward and backward."""

    def __init__(self, scheme: "LayerScheme", errors: torch.Tensor, sample_numel: int,
                 indices: torch.Tensor | None):
        self.scheme = scheme
        self.errors = errors  # (N, len(ladder)) float64, CPU
        self.sample_numel = sample_numel
        self.indices = indices  # dataset indices (use_gradient)
        self.coef: float | torch.Tensor = 0.0  # own weight-gradient term, set by the layer
        self.fan = 0.0  # weighted layers: fan_in, mean(x^2) of their input, ||W_c||^2 per output
        self.mean_sq = 0.0
        self.out_sq: torch.Tensor | None = None
        self.source: Observation | None = None  # the weighted layer that produced this input
        self.grad_sq: torch.Tensor | None = None  # (N,) ||g_n||^2, NaN where not finite
        self.noise: InputNoise | None = None

    def backward(self, grad_output: torch.Tensor, noise: InputNoise | None = None) -> None:
        """Record ||g_n||^2, and how the input error reaches the input gradient."""
        g = grad_output.detach()
        sq = g.reshape(g.shape[0], -1).float().square().sum(1).double() if g.dim() > 1 else \
            g.float().square().sum().double().reshape(1)
        self.grad_sq = torch.where(torch.isfinite(sq), sq, torch.nan)  # to the host in update()
        self.noise = noise
        self.scheme.observed.append(self)
        self.scheme.controller.backward_running()

    def propagated(self) -> np.ndarray:
        """What the input-gradient noise adds to the source's weight gradient (sensitivity.py)."""
        if self.source is None or self.noise is None:
            return np.zeros(len(self.errors))
        src = self.source
        return self.noise.propagated(src.fan, src.mean_sq, src.out_sq).numpy()


class LayerScheme:
    """Per-layer state: gradient statistics and this layer's bits per value."""

    def __init__(self, controller: "Controller", index: int, name: str):
        self.controller = controller
        self.index = index
        self.name = name
        self.calls = 0
        self.bits: float | None = None  # per-layer share; None: the config's target
        self.grad_scale: float | None = None  # mean ||g_n||^2 of the last backward
        self.sample_grad = torch.empty(0, dtype=torch.float64)  # use_gradient memory, NaN = unseen
        self.observed: list[Observation] = []

    def plan(self, x: torch.Tensor, fan: float | None = None,
             weight: torch.Tensor | None = None) -> tuple[Plan, Observation | None]:
        """How to store this call's input x, and the observation its backward fills in.
        Weighted layers (conv/linear) give their fan_in and weight (see sensitivity.py)."""
        cfg = self.controller.config
        self.calls += 1
        if not cfg.compress or x.numel() == 0:
            return Plan(swap=cfg.swap), None
        seed = self.controller.seed(self.index, self.calls)
        if not cfg.adaptive:
            return Plan(cfg.fixed_level, seed, cfg.group_size, cfg.swap), None
        rows = (x.reshape(1, -1) if x.dim() < 2 else rows_in_memory_order(x)).detach()
        ladder = self.controller.ladder
        errors, mean_sq, out_sq = _to_host(
            aqcore.level_errors(rows, cfg.group_size, ladder),
            rows.float().square().mean() if fan is not None else None,
            weight.detach().flatten(1).float().square().sum(1) if weight is not None else None)
        obs = Observation(self, errors, rows.shape[1], self.controller.batch_indices(rows.shape[0]))
        if fan is not None:
            obs.fan, obs.mean_sq, obs.out_sq = fan, mean_sq.item(), out_sq
            self.controller.last_weighted = obs
        else:
            obs.source = self.controller.last_weighted
        sizes = np.full(rows.shape[0], float(rows.shape[1]))
        bits = self.bits if self.bits is not None else cfg.bit
        choice = allocate_bits(sizes, self.sample_scale(obs), _finite(errors), self.controller.level_bits,
                               bits * sizes.sum() * (1 + BUDGET_SLACK), method="lp")
        levels = [ladder[i] for i in choice]
        level = levels[0] if x.dim() < 2 or len(set(levels)) == 1 else levels
        return Plan(level, seed, cfg.group_size, cfg.swap), obs

    def sample_scale(self, obs: Observation) -> np.ndarray:
        """S_n: each sample's gradient memory (use_gradient), else the layer's mean from
        the last backward, else 1 (no backward yet)."""
        n = obs.errors.shape[0]
        fallback = self.grad_scale if self.grad_scale is not None else 1.0
        if obs.indices is None:
            return np.full(n, fallback)
        known = torch.full((n,), torch.nan, dtype=torch.float64)
        inside = obs.indices < len(self.sample_grad)
        known[inside] = self.sample_grad[obs.indices[inside]]
        seen = ~torch.isnan(known)
        fill = known[seen].mean().item() if seen.any() else fallback
        return torch.where(seen, known, fill).numpy()

    def sensitivity(self, obs: Observation) -> np.ndarray:
        """C_n = coef * S_n + the propagated term (sensitivity.py); 0 where not finite
        (statistics of non-finite activations)."""
        c = float(obs.coef) * self.sample_scale(obs) + obs.propagated()
        return np.nan_to_num(c, nan=0.0, posinf=0.0)

    def update(self) -> None:
        """Fold this backward's observations into the gradient statistics."""
        for obs in self.observed:  # after the backward: no pipeline stall
            obs.grad_sq = obs.grad_sq.cpu()
        grads = torch.cat([o.grad_sq for o in self.observed])
        finite = grads[~torch.isnan(grads)]
        if len(finite):
            self.grad_scale = finite.mean().item()
        for obs in self.observed:
            if obs.indices is not None:
                self._remember(obs.indices, obs.grad_sq)

    def _remember(self, indices: torch.Tensor, grad_sq: torch.Tensor) -> None:
        """S[idx] <- 0.5 S[idx] + 0.5 ||g||^2, a first sighting taken as is (ALGORITHMS.md B.6)."""
        size = int(indices.max()) + 1
        if size > len(self.sample_grad):
            grown = torch.full((max(size, 2 * len(self.sample_grad)),), torch.nan, dtype=torch.float64)
            grown[: len(self.sample_grad)] = self.sample_grad
            self.sample_grad = grown
        old = self.sample_grad[indices]
        new = torch.where(torch.isnan(old), grad_sq, 0.5 * old + 0.5 * grad_sq)
        self.sample_grad[indices] = torch.where(torch.isnan(grad_sq), old, new)


def _to_host(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """float64 CPU copies of a forward's statistics, in one device sync instead of one each."""
    present = [t for t in tensors if t is not None]
    flat = torch.cat([t.reshape(-1).double() for t in present]).cpu()
    parts = iter(flat.split([t.numel() for t in present]))
    return [next(parts).view(t.shape) if t is not None else None for t in tensors]


def _finite(errors: torch.Tensor) -> np.ndarray:
    """Errors as numpy; a sample with a non-finite estimate (NaN/Inf data) prices every
    level alike, so it takes the cheapest one instead of stalling the solver."""
    e = errors.numpy()
    bad = ~np.isfinite(e).all(1)
    if bad.any():
        e = e.copy()
        e[bad] = 0.0
    return e


class Controller:
    """The per-model policy state behind a QModule (see the module docstring)."""

    def __init__(self, config: QuantizationConfig):
        self.config = config
        self.ladder = config.ladder
        self.level_bits = np.array([level.bits_per_value for level in self.ladder])
        self.layers: list[LayerScheme] = []
        self.iteration = 0  # completed backward passes
        self.last_weighted: Observation | None = None  # the last conv/linear forward
        self._indices: torch.Tensor | None = None
        self._queued_for: int | None = None  # the backward pass finish_backward is queued on

    def add_layer(self, name: str) -> LayerScheme:
        scheme = LayerScheme(self, len(self.layers), name)
        self.layers.append(scheme)
        return scheme

    def seed(self, layer: int, call: int) -> int:
        """Rounding seed of a layer's call-th forward: hash of (call, layer, rank)."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return seed_for(call, layer, rank)

    def set_sample_indices(self, indices: torch.Tensor | None) -> None:
        """Dataset indices of the next batch's samples (use_gradient); cleared after backward."""
        self._indices = None if indices is None else torch.as_tensor(indices).reshape(-1).long().cpu()

    def batch_indices(self, n: int) -> torch.Tensor | None:
        if not self.config.use_gradient:
            return None
        if self._indices is None:
            raise ValueError("use_gradient needs the batch's dataset indices: call "
                             "model.set_sample_indices(indices) before each forward, with the "
                             "indices that actnn_aq.DataLoader yields")
        if len(self._indices) != n:
            raise ValueError(f"set_sample_indices got {len(self._indices)} indices but a layer "
                             f"sees a batch of {n} samples")
        return self._indices

    def backward_running(self) -> None:
        """Called from each observed backward: finish_backward runs once the pass ends."""
        task = torch._C._current_graph_task_id()
        if task != self._queued_for:
            self._queued_for = task
            torch.autograd.Variable._execution_engine.queue_callback(self.finish_backward)

    def finish_backward(self) -> None:
        """End of a backward pass: update statistics, re-split the budget across layers."""
        self._queued_for = None
        observed = [s for s in self.layers if s.observed]
        for scheme in observed:
            scheme.update()
        if self.config.per_layer and observed:
            self.reallocate([o for s in observed for o in s.observed])
        for scheme in observed:
            scheme.observed.clear()
        self._indices = None
        self.last_weighted = None
        self.iteration += 1

    def reallocate(self, observations: list[Observation]) -> None:
        """One joint allocation over all (layer, sample) units of this backward at the
        target bits; each layer's share = the mean bits per value it got (ALGORITHMS.md
        B.8, with AQ priced by its real bits and error instead of D.4's 1-bit pricing)."""
        sizes = np.concatenate([np.full(len(o.errors), float(o.sample_numel)) for o in observations])
        sens = np.concatenate([o.scheme.sensitivity(o) for o in observations])
        errors = np.concatenate([_finite(o.errors) for o in observations])
        budget = self.config.bit * sizes.sum() * (1 + BUDGET_SLACK)
        spent = sizes * self.level_bits[allocate_bits(sizes, sens, errors, self.level_bits, budget)]
        totals: dict[LayerScheme, list[float]] = {}
        start = 0
        for obs in observations:
            end = start + len(obs.errors)
            acc = totals.setdefault(obs.scheme, [0.0, 0.0])
            acc[0] += spent[start:end].sum()
            acc[1] += sizes[start:end].sum()
            start = end
        for scheme, (bits, values) in totals.items():
            scheme.bits = bits / values

    def state(self) -> dict[str, float | None]:
        """Each layer's bits per value (None: the config's target), by layer name."""
        return {s.name: s.bits for s in self.layers}
