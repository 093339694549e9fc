"""Per-sample and per-layer precision with AQ (docs/frameworks.md, "actnn_aq: layer replacement").

A Controller belongs to one converted model and owns everything the schemes learn: one
LayerScheme per compressing layer (gradient statistics, its share of the bit budget), the
sample indices of the batch, the iteration count. Nothing lives on classes, so two
models, or a teacher beside a student, never see each other's state.

The objective is ActNN's with a data-driven error model: a layer's compression adds
sum_n C_n * e_n(level_n) to the gradient variance, e_n the expected squared error of
sample n at a level (aqcore.level_errors, docs/errors.md), C_n its sensitivity
(sensitivity.py; S_n = ||g_n||^2 of the layer's output gradient).

- Forward, per layer: the per-sample levels minimising sum_n C_n e_n(l_n) within the
  layer's bits (ladder 8, 4, 2, 1, then AQ down to aq_bit), chosen on the activation's
  device by aqcore.compress_allocated: no host synchronization anywhere in the step.
- End of every REALLOCATE_EVERY-th backward: one joint allocation over every (layer,
  sample) of that backward at the target bits (aqcore.allocate_rows, on the device); each
  layer's share becomes the bytes per sample it got (B.8). The shares reach the host
  through a non-blocking copy and apply from the first forward that finds the copy done.
- Before any backward: S_n = 1 and every layer at the target, so the error model alone
  decides (never the all-zero sensitivities of the original's first iterations).
- AQ levels pay what the independent-noise model misses (sensitivity.py): rounding shared
  along a conv's spatial runs (run_gain), the mean over positions that runs across
  channels leave in the deviation (mean_deviation_price), and a batch norm's averaging
  bias, which its input gradient carries coherently into the layers below (deviation_price; measured
  every MEASURE_EVERY-th re-allocation through the source conv/linear's weight gradient
  of the deviation). Each re-allocation turns them into per-level factors on the layer's
  errors (level_factor), used by that allocation and by the layer's per-sample
  allocations until the next.
Bits count like the fixed levels' (codes; metadata and group padding on top), converted
to bytes per sample by aqcore.format.row_budget.

A GradientGuard (aqcore/guard.py; config.guard) checks every backward's gradients after
everything else at its end (DDP's reduction included) and zeroes a bad step's on the
device. The next forward that sees the alarm raises the floor: the levels whose codes
take the fewest bits per value are barred (past 8 bits everything is kept exact), the
layers' shares restart from the target, and that iteration re-allocates and re-measures.
"""
from __future__ import annotations

from dataclasses import dataclass
import warnings
from typing import Callable, Iterable

import torch
import torch.distributed as dist

import aqcore
from aqcore import Level
from aqcore.format import row_budget, slot_bytes
from aqcore.guard import GradientGuard

from .saved import Allocation, Plan, seed_for
from .sensitivity import InputNoise, deviation
from .settings import QuantizationConfig

# what a LayerScheme learns (Controller.state_dict)
LAYER_STATE = ("calls", "share", "grad_scale", "sample_grad", "level_factor", "source_grad_sq")
REALLOCATE_EVERY = 10  # backward passes per re-allocation: each costs a few ops per layer
MEASURE_EVERY = 5  # re-allocations per measurement of batch norms' deviation (one weight
#                    gradient of the source per AQ level and batch norm)


class Observation:
    """One training call of a layer: what the allocation needs from its forward and backward."""

    def __init__(self, scheme: "LayerScheme", errors: torch.Tensor, sample_numel: int,
                 indices: torch.Tensor | None, full: bool, measure: bool = False):
        self.scheme = scheme
        self.errors = errors  # (N, len(ladder)) float32, the activation's device
        self.sample_numel = sample_numel
        self.indices = indices  # dataset indices (use_gradient), CPU
        self.full = full  # this pass feeds a re-allocation: record the noise terms too
        self.measure = measure  # ... and measures batch norms' deviation (Controller.offer)
        self.coef: float | torch.Tensor = 0.0  # own weight-gradient term, set by the layer
        self.fan = 0.0  # weighted layers: fan_in, mean(x^2) of their input, ||W_c||^2 per output
        self.mean_sq: float | torch.Tensor = 0.0
        self.out_sq: torch.Tensor | None = None
        self.source: Observation | None = None  # the weighted layer that produced this input
        self.grad_sq: torch.Tensor | None = None  # (N,) ||g_n||^2, NaN where not finite
        self.noise: InputNoise | None = None
        self.run_gain: torch.Tensor | None = None  # convs: (AQ levels,) sensitivity.run_gain
        self.price: torch.Tensor | None = None  # (AQ levels,) coherent AQ error, on top

    def backward(self, grad_output: torch.Tensor,
                 noise: Callable[[], InputNoise] | None = None,
                 gain: Callable[[], torch.Tensor] | None = None,
                 price: Callable[[], torch.Tensor] | None = None) -> None:
        """Record ||g_n||^2, and (re-allocation passes) how the input error reaches the
        input gradient, how much more shared AQ rounding costs and the coherent part of
        the AQ deviation (sensitivity.py): noise(), gain() and price() compute those, only
        when needed."""
        g = grad_output.detach()  # per-sample norms in any layout, without a copy
        dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        sq = torch.linalg.vector_norm(g, dim=dims, dtype=torch.float32).square().reshape(-1)
        self.grad_sq = torch.where(torch.isfinite(sq), sq, torch.nan)
        self.noise = noise() if noise is not None and self.full else None
        self.run_gain = gain() if gain is not None and self.full else None
        self.price = price() if price is not None and self.full else None
        self.scheme.observed.append(self)
        self.scheme.controller.backward_running()

    def propagated(self) -> torch.Tensor:
        """What the input-gradient noise adds to the source's weight gradient (sensitivity.py)."""
        if self.source is None or self.noise is None:
            return self.errors.new_zeros(len(self.errors))
        src = self.source
        return self.noise.propagated(src.fan, src.mean_sq, src.out_sq).float()

    def level_factor(self, weighted: torch.Tensor) -> torch.Tensor:
        """(levels,) multipliers on C_n e_n(l) (weighted, (N, levels)): 1 for plain levels;
        for AQ levels the run gain, plus the coherent prices (a batch norm's deviation, a
        weighted layer's mean deviation) over what the model gives those rows
        (sensitivity.py). Device ops."""
        aq = sum(level.is_aq for level in self.scheme.controller.ladder)
        factor = weighted.new_ones(weighted.shape[1], dtype=torch.float64)
        if not aq:
            return factor.float()
        gain = factor.new_ones(aq) if self.run_gain is None else self.run_gain.to(factor)
        price = self.price
        if self.noise is not None and self.scheme.source_grad_sq is not None:
            deviation = self.noise.deviation_price(self.scheme.source_grad_sq)
            if deviation is not None:
                price = deviation if price is None else price + deviation
        if price is not None:
            gain = gain + price.to(factor) / weighted[:, -aq:].double().sum(0).clamp_min(1e-30)
        factor[-aq:] = torch.nan_to_num(gain, nan=1.0, posinf=1e30).clamp(1.0, 1e30)
        return factor.float()


class LayerScheme:
    """Per-layer state: gradient statistics and this layer's bits per value."""

    def __init__(self, controller: "Controller", index: int, name: str):
        self.controller = controller
        self.index = index
        self.name = name
        self.calls = 0
        # (bytes per sample, sample size, code bits per value); None: the target
        self.share: tuple[int, int, float] | None = None
        self.grad_scale: torch.Tensor | None = None  # mean ||g_n||^2 of the last backward
        self.sample_grad: torch.Tensor | None = None  # use_gradient memory, NaN = unseen
        self.level_factor: torch.Tensor | None = None  # (ladder,) from the last re-allocation
        self.source_grad_sq: torch.Tensor | None = None  # batch norms: (AQ levels, C), last measured
        self.observed: list[Observation] = []

    def plan(self, x: torch.Tensor, fan: float | None = None, weight: torch.Tensor | None = None,
             batch_norm: bool = False, produced: torch.Tensor | None = None,
             invstd: torch.Tensor | None = None) -> tuple[Plan, Observation | None]:
        """How to store this call's input x, and the observation its backward fills in.
        Weighted layers (conv/linear) give their fan_in and weight; batch norms say so
        (their averaging deviation is measured on some re-allocation passes; see
        sensitivity.py), and when x is their normalized input, the input as produced and
        the per-channel invstd it was normalized with."""
        cfg = self.controller.config
        self.calls += 1
        source = self.controller.take_offer(x if produced is None else produced)
        self.controller.heed_guard()
        if not cfg.compress or x.numel() == 0 or not self.controller.ladder:
            return Plan(swap=cfg.swap), None
        seed = self.controller.seed(self.index, self.calls)
        if not cfg.adaptive:
            return Plan(self.controller.lifted(cfg.fixed_level), seed, cfg.group_size, cfg.swap), None
        rows = aqcore.sample_rows(x.detach() if x.dim() > 1 else x.detach().reshape(1, -1))
        errors = aqcore.level_errors(rows, cfg.group_size, self.controller.ladder)
        obs = Observation(self, errors, rows.shape[1], self.controller.batch_indices(rows.shape[0]),
                          self.controller.reallocating, self.controller.measuring)
        if fan is not None:
            if obs.full:
                norm = torch.linalg.vector_norm(rows, dtype=torch.float32)  # one pass, no copy
                obs.fan, obs.mean_sq = fan, norm.square() / rows.numel()
                if weight is not None:
                    obs.out_sq = weight.detach().flatten(1).float().square().sum(1)
            self.controller.last_weighted = obs
        else:
            obs.source = self.controller.last_weighted
        runs = self.controller.aq_runs
        if batch_norm and obs.measure and source is not None and runs and x.dim() > 1:
            scale = 1.0 if invstd is None else invstd.reciprocal().view((1, -1) + (1,) * (x.dim() - 2))
            self.source_grad_sq = torch.stack([source(deviation(x, k) * scale).flatten(1).float().square().sum(1)
                                               for k in runs])
        if self.level_factor is not None:
            errors = errors * self.level_factor.to(errors.device)
        allocation = Allocation(self.controller.ladder, self.sample_scale(obs), cfg.bit, errors,
                                self.controller.budget_of(self, *rows.shape))
        return Plan(None, seed, cfg.group_size, cfg.swap, allocation), obs

    def sample_scale(self, obs: Observation) -> torch.Tensor:
        """S_n (N,): each sample's gradient memory (use_gradient), else the layer's mean from
        the last backward, else 1 (no backward yet). Device ops only."""
        n, device = obs.errors.shape[0], obs.errors.device
        fallback = self.grad_scale if self.grad_scale is not None else torch.ones((), device=device)
        if obs.indices is None or self.sample_grad is None:
            return fallback.expand(n)
        indices = obs.indices.to(device, non_blocking=True)
        inside = indices < len(self.sample_grad)
        known = torch.where(inside, self.sample_grad[indices.clamp_max(len(self.sample_grad) - 1)],
                            torch.nan)
        mean = torch.nanmean(known)
        fill = torch.where(torch.isnan(mean), fallback, mean)
        return torch.where(torch.isnan(known), fill, known)

    def sensitivity(self, obs: Observation) -> torch.Tensor:
        """C_n = coef * S_n + the propagated term (sensitivity.py); 0 where not finite
        (statistics of non-finite activations)."""
        c = obs.coef * self.sample_scale(obs) + obs.propagated()
        return torch.nan_to_num(c.float(), nan=0.0, posinf=0.0)

    def remember(self) -> None:
        """Fold this backward's per-sample ||g_n||^2 into the use_gradient memory."""
        for obs in self.observed:
            if obs.indices is not None:
                self._remember(obs.indices, obs.grad_sq)

    def _remember(self, indices: torch.Tensor, grad_sq: torch.Tensor) -> None:
        """S[idx] <- 0.5 S[idx] + 0.5 ||g||^2, a first sighting taken as is.
        indices: CPU (sizes the memory without a sync)."""
        size = int(indices.max()) + 1
        held = 0 if self.sample_grad is None else len(self.sample_grad)
        if size > held:
            grown = torch.full((max(size, 2 * held),), torch.nan, device=grad_sq.device)
            if self.sample_grad is not None:
                grown[:held] = self.sample_grad
            self.sample_grad = grown
        indices = indices.to(grad_sq.device, non_blocking=True)
        old = self.sample_grad[indices]
        new = torch.where(torch.isnan(old), grad_sq, 0.5 * old + 0.5 * grad_sq)
        self.sample_grad[indices] = torch.where(torch.isnan(grad_sq), old, new)


class Controller:
    """The per-model policy state behind a QModule (see the module docstring)."""

    def __init__(self, config: QuantizationConfig):
        self.config = config
        self.floor = 0.0  # levels whose codes take fewer bits per value are barred (guard)
        self.guard: GradientGuard | None = None
        self.guard_events: list[dict] = []
        self._ladder_key: tuple | None = None
        self._ladder: tuple[tuple[Level, ...], tuple[int, ...]] = ((), ())
        self._recovering = False  # this iteration re-allocates and re-measures after an alarm
        self._heeded_at: int | None = None  # the iteration whose first forward read the alarm
        self.layers: list[LayerScheme] = []
        self.iteration = 0  # completed backward passes
        self.last_weighted: Observation | None = None  # the last conv/linear forward
        self._indices: torch.Tensor | None = None
        self._queued_for: int | None = None  # the backward pass finish_backward is queued on
        self._segments: tuple = (None, None)  # (key, the layer of each grads entry) (_update_grad_scales)
        self._shares: tuple[list[tuple[LayerScheme, int]], torch.Tensor, object] | None = None
        self._offer: tuple[tuple, Callable[[torch.Tensor], torch.Tensor]] | None = None

    @property
    def ladder(self) -> tuple[Level, ...]:
        """The config's ladder above the floor; empty once the guard has barred every level."""
        return self._rungs()[0]

    @property
    def aq_runs(self) -> list[int]:
        """The run lengths of the ladder's AQ levels."""
        return list(self._rungs()[1])

    def _rungs(self) -> tuple[tuple[Level, ...], tuple[int, ...]]:
        """(ladder, AQ run lengths), rebuilt only when the floor or aq_bit changes: layers ask
        several times per call, and building it parses every level."""
        key = (self.floor, self.config.aq_bit)
        if self._ladder_key != key:
            ladder = tuple(l for l in self.config.ladder if l.bits_per_value >= self.floor)
            self._ladder_key, self._ladder = key, (ladder, tuple(l.avg for l in ladder if l.is_aq))
        return self._ladder

    @property
    def reallocating(self) -> bool:
        """Whether the current iteration's backward re-splits the bits across layers."""
        return self.config.per_layer and (self.iteration % REALLOCATE_EVERY == 0 or self._recovering)

    @property
    def measuring(self) -> bool:
        """Whether this re-allocating iteration also measures batch norms' deviation."""
        return self.reallocating and ((self.iteration // REALLOCATE_EVERY) % MEASURE_EVERY == 0
                                      or self._recovering)

    # ------------------------------------------------------------------ guard

    def watch(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Guard these parameters' gradients after every backward of this model."""
        self.guard = GradientGuard(parameters)

    def lifted(self, level: Level) -> Level:
        """level, or the cheapest level of the ladder at or above the floor."""
        if level.bits_per_value >= self.floor:
            return level
        return min(self.ladder, key=lambda l: l.bits_per_value)

    def heed_guard(self) -> None:
        """At the first forward of an iteration: after an alarm, bar the lowest precision."""
        if self.guard is None or self._heeded_at == self.iteration:
            return
        self._heeded_at = self.iteration
        if not self.guard.alarm():
            return
        in_use = self.ladder if self.config.adaptive or not self.ladder else [self.lifted(self.config.fixed_level)]
        lowest = min((l.bits_per_value for l in in_use), default=32.0)
        rungs = sorted({l.bits_per_value for l in self.config.ladder} | {32.0})
        self.floor = next((r for r in rungs if r > max(lowest, self.floor)), 32.0)
        for scheme in self.layers:
            scheme.share = scheme.level_factor = None
        self._shares = None
        self._recovering = True
        self.guard_events.append({"iteration": self.iteration, "floor": self.floor})
        barred = "every level (all activations exact)" if not self.ladder else \
            f"levels under {self.floor:g} bits per value"
        warnings.warn(f"actnn_aq: at step {self.iteration - 1} the gradients became non-finite or "
                      f"jumped far above their recent peak; that step's gradients were zeroed (the "
                      f"optimizer step changed nothing), and from now on {barred} are barred, the "
                      f"layers' bits re-allocated and their sensitivities re-measured", stacklevel=4)

    def _check_gradients(self) -> None:
        """Queued from the end of backward, so it runs after every other callback there."""
        torch.autograd.Variable._execution_engine.queue_callback(self.guard.check)

    def offer(self, output: torch.Tensor, weight_grad: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """A conv/linear of a measuring pass: weight_grad(g) is its weight gradient for an
        output gradient g (its exact input held in the closure), for a batch norm taking
        `output` as its input. Held until the next layer's plan only."""
        self._offer = ((output.data_ptr(), output.shape, output.stride()), weight_grad)

    def take_offer(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The offered weight gradient if x is that layer's output; the offer ends here."""
        offer, self._offer = self._offer, None
        if offer is None or offer[0] != (x.data_ptr(), x.shape, x.stride()):
            return None
        return offer[1]

    def budget_of(self, scheme: LayerScheme, rows: int, row_numel: int) -> int | None:
        """A layer's bytes for `rows` samples: its share once one has arrived (for samples of
        this size), else None: the target bits."""
        self._receive(wait=False)
        if scheme.share is None or scheme.share[1] != row_numel:
            return None
        return rows * scheme.share[0]

    def _receive(self, wait: bool) -> None:
        """Apply the shares of the last re-allocation once their copy to the host is done."""
        if self._shares is None:
            return
        schemes, shares, done = self._shares
        if done is not None and not done.query():
            if not wait:
                return
            done.synchronize()
        for (scheme, numel), (share, codes) in zip(schemes, shares.tolist()):
            scheme.share = (int(share), numel, codes)
        self._shares = None

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
        self._update_grad_scales(observed)
        for scheme in observed:
            scheme.remember()
        full = [o for s in observed for o in s.observed if o.full]
        if full:
            self.reallocate(full)
        for scheme in observed:
            scheme.observed.clear()
        self._indices = None
        self.last_weighted = None
        self._offer = None
        self._recovering = False
        self.iteration += 1
        if self.guard is not None:
            self._check_gradients()

    def _update_grad_scales(self, schemes: list[LayerScheme]) -> None:
        """Each layer's grad_scale <- the mean ||g_n||^2 of this backward (NaN entries left
        out; kept when none is finite), all layers in a few launches (device ops)."""
        if not schemes:
            return
        grads = torch.cat([o.grad_sq for s in schemes for o in s.observed])
        counts = tuple(sum(len(o.grad_sq) for o in s.observed) for s in schemes)
        if self._segments[0] != (counts, grads.device):
            owner = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
            self._segments = ((counts, grads.device), _to_device(owner, grads.device))
        owner = self._segments[1]
        seen = ~torch.isnan(grads)
        sums = grads.new_zeros(len(schemes)).index_add_(0, owner, torch.where(seen, grads, 0))
        mean = sums / grads.new_zeros(len(schemes)).index_add_(0, owner, seen.float())
        previous = torch.stack([s.grad_scale if s.grad_scale is not None else grads.new_ones(())
                                for s in schemes])
        for scheme, scale in zip(schemes, torch.where(torch.isnan(mean), previous, mean).unbind()):
            scheme.grad_scale = scale

    def reallocate(self, observations: list[Observation]) -> None:
        """One joint allocation over all (layer, sample) units of this backward at the
        target bits; each layer's share = the bytes per sample it got (AQ priced by its real
        bytes and error, not like 1-bit rounding as published: docs/frameworks.md). On the
        device; the shares travel to the host without blocking (budget_of picks them up)."""
        device = observations[0].errors.device
        group_size, ladder = self.config.group_size, self.ladder
        slots = [[slot_bytes(level, o.sample_numel, group_size)[1] for level in ladder]
                 for o in observations]
        rows = [len(o.errors) for o in observations]
        budget = sum(n * row_budget(ladder, o.sample_numel, group_size, self.config.bit)
                     for n, o in zip(rows, observations))
        budget = max(budget, sum(n * min(s) for n, s in zip(rows, slots)))
        per_row = torch.tensor(rows)
        costs = _to_device(torch.tensor(slots).repeat_interleave(per_row, 0), device)
        weighted = torch.cat([self._weighted(o) for o in observations])
        choice = aqcore.allocate_rows(weighted, costs, budget)
        spent = costs.gather(1, choice.unsqueeze(1)).squeeze(1)
        code_bits = _to_device(torch.tensor([l.bits_per_value for l in ladder], dtype=torch.float64),
                               device)[choice]
        layers = list(dict.fromkeys((o.scheme, o.sample_numel) for o in observations))
        owner = torch.tensor([layers.index((o.scheme, o.sample_numel)) for o in observations])
        layer_rows = torch.zeros(len(layers), dtype=torch.float64).index_add_(0, owner, per_row.double())
        layer_bytes = torch.zeros(len(layers), dtype=torch.float64, device=device)
        row_owner = _to_device(owner.repeat_interleave(per_row), device)
        layer_bytes.index_add_(0, row_owner, spent.double())
        layer_codes = torch.zeros_like(layer_bytes).index_add_(0, row_owner, code_bits)
        layer_rows = _to_device(layer_rows, device)
        shares = torch.stack([(layer_bytes / layer_rows).floor(), layer_codes / layer_rows], 1)
        if device.type == "cuda":
            host = torch.empty(shares.shape, dtype=shares.dtype, pin_memory=True)
            host.copy_(shares, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._shares = (layers, host, done)
        else:
            self._shares = (layers, shares, None)
        self._receive(wait=False)

    @staticmethod
    def _weighted(obs: Observation) -> torch.Tensor:
        """C_n e_n(l) times the layer's level factors, which its next forwards use too."""
        weighted = obs.scheme.sensitivity(obs).unsqueeze(1) * obs.errors.float()
        factor = obs.level_factor(weighted)
        obs.scheme.level_factor = factor
        return weighted * factor

    def state_dict(self) -> dict:
        """What the controller has learnt, for a checkpoint: per layer its share of the bits,
        gradient statistics, level factors, batch-norm measurements and call count (the
        rounding seeds); the iteration (the re-allocation schedule), the guard's floor,
        statistics and events."""
        self._receive(wait=True)
        return {"iteration": self.iteration, "floor": self.floor,
                "guard": None if self.guard is None else self.guard.state_dict(),
                "guard_events": list(self.guard_events),
                "layers": [{"name": s.name, **{key: getattr(s, key) for key in LAYER_STATE}}
                           for s in self.layers]}

    def load_state_dict(self, state: dict) -> None:
        names = [s.name for s in self.layers]
        if names != [layer["name"] for layer in state["layers"]]:
            raise ValueError(f"the state is of another model: its layers are "
                             f"{[layer['name'] for layer in state['layers']]}, this model's {names}")
        self.iteration, self.floor = int(state["iteration"]), float(state["floor"])
        if self.guard is not None and state["guard"] is not None:
            self.guard.load_state_dict(state["guard"])
        self.guard_events[:] = state["guard_events"]
        self._shares = None
        for scheme, layer in zip(self.layers, state["layers"]):
            for key in LAYER_STATE:
                setattr(scheme, key, layer[key])

    def state(self) -> dict[str, LayerBits | None]:
        """Each layer's share from the last re-allocation, by layer name: the bits per value
        of its codes and the bits it holds (LayerBits); None before one (the config's target)."""
        self._receive(wait=True)
        return {s.name: None if s.share is None else LayerBits(s.share[2], 8 * s.share[0] / s.share[1],
                                                               s.share[1])
                for s in self.layers}


@dataclass(frozen=True)
class LayerBits:
    """A layer's share of the budget, per value of its samples.

    bits: the chosen levels' own bits (8, 4, 2, 1; AQ 1, 0.5, 0.25), what the target `bit`
        counts, averaged over the layer's samples.
    held: the bytes held per sample, in bits per value: the codes, each group's (m0, m1)
        metadata, the last group's padding and the 16-byte alignment of a sample's slot.
        Small samples pay mostly padding (one 2-bit group holds 256 codes: a sample of 64
        values takes 80 bytes, 10 bits per value); budgets count these bytes, so the solver
        may give small layers more code bits than the target where they cost nothing extra.
    values: values per sample.
    """

    bits: float
    held: float
    values: int

    @property
    def overhead(self) -> float:
        """Bits per value held beyond the codes: metadata, padding, alignment."""
        return self.held - self.bits

    def __str__(self) -> str:
        return (f"{self.bits:.3g} bits per value in codes, {self.held:.3g} held "
                f"(+{self.overhead:.3g} metadata and padding of {self.values}-value samples)")


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built tensor on the device, through pinned memory: no sync on CUDA."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
