"""Bit allocation: one precision level per unit, least total error under a bit budget.

docs/solver.md. Units i (tensors, or samples of a tensor) have sizes w_i (values), a
sensitivity C_i and per-level error estimates e[i, l] (inf or nan: level not allowed). Level
l costs bits[l] payload bits per value. Minimise sum_i C_i e[i, l_i] subject to
sum_i w_i bits[l_i] <= budget: a multiple-choice knapsack.

Two methods behind one signature:
- "greedy": the published heap allocators (ActNN, GACT, their AQ variants), generically.
- "lp": the LP relaxation on each unit's convex hull, rounded down and repaired: no search,
  for allocations made on every training step (its distance from the optimum is at most one
  unit's hull step; `lower_bound` measures it).
- "exact" (default): the LP relaxation solved on each unit's convex hull and rounded, the
  leftover budget repaired, the greedy answer as a fallback candidate. When the best of these
  is not provably within GAP_TOLERANCE of the LP bound, or the problem is small, an exact
  search pruned by LP bounds (and, if that search grows too large, a MILP) finishes the job.
  Every step keeps the best answer so far, so "exact" is never worse than "greedy".

Pure numpy + scipy: the allocation policy runs on the CPU between training steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

METHODS = ("exact", "greedy", "lp")
GAP_TOLERANCE = 1e-3  # "exact" returns an objective <= (1 + GAP_TOLERANCE) * optimum...
SMALL_PROBLEM = 4000  # ...and the optimum when n_units * n_levels <= this (if the search ends)
REPAIR_ROUNDS = 8
SEARCH_WORK = 10_000_000  # states the exact search may examine (about 1 s) before giving up
MILP_TIME_LIMIT_S = 10.0  # the MILP only runs when the search gave up with the gap too large


@dataclass
class _Instance:
    """Validated inputs as float64 arrays. Per-level arrays are level-major (L, n): reductions
    over a unit's levels then run over contiguous rows, which is ~10x faster in numpy."""
    sizes: np.ndarray  # (n,)
    sensitivity: np.ndarray  # (n,)
    errors: np.ndarray  # (L, n), +inf where the level is not allowed
    bits: np.ndarray  # (L,)
    budget: float
    values: np.ndarray  # (L, n), C_i e[i, l], +inf where the level is not allowed


# ----------------------------------------------------------------------------- public API

def allocate_bits(sizes, sensitivity, errors, level_bits, budget: float,
                  method: str = "exact") -> np.ndarray:
    """Pick a level per unit minimising sum_i C_i e[i, l_i] with sum_i w_i bits[l_i] <= budget.

    sizes (n,), sensitivity (n,), errors (n, L), level_bits (L,): array-likes (numpy, or torch
    CPU tensors). budget: bits. Returns int64 level indices (n,). Units of size 0 cost nothing
    and get their lowest-error level. Raises ValueError on malformed input, on a unit with no
    allowed level, and on a budget below the cheapest possible allocation.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    inst = _validate(sizes, sensitivity, errors, level_bits, budget)
    best = _lowest_error_levels(inst)
    if method != "greedy" and _cost(inst.sizes, inst.bits, best) <= inst.budget:
        return best  # every unit at its best level fits: nothing to trade off
    if method == "lp":
        return _lp_rounded(inst)
    greedy = _greedy(inst)
    if method == "greedy":
        return greedy
    return _exact(inst, greedy)


def lower_bound(sizes, sensitivity, errors, level_bits, budget: float) -> float:
    """A lower bound on the optimal objective: the value of the LP relaxation (by Lagrangian
    duality), to measure how far any allocation can be from optimal."""
    inst = _validate(sizes, sensitivity, errors, level_bits, budget)
    path, rate = _convex_hulls(inst)
    _, lam = _lp_prefix(inst, path, _hull_segments(inst, path, rate))
    return _dual(inst, lam)


def objective(sensitivity, errors, choice) -> float:
    """sum_i C_i e[i, choice_i], the quantity allocate_bits minimises, summed exactly as the
    solver sums it (so comparisons agree with its own); +inf on a disallowed level."""
    sens = np.asarray(sensitivity, dtype=np.float64)
    return _objective(_values(sens, np.asarray(errors, dtype=np.float64).T), np.asarray(choice))


def cost(sizes, level_bits, choice) -> float:
    """sum_i w_i bits[choice_i], the bits an allocation spends, summed exactly as the solver
    sums it (so `cost(...) <= budget` holds for every allocation it returns)."""
    return _cost(np.asarray(sizes, dtype=np.float64), np.asarray(level_bits, dtype=np.float64),
                 np.asarray(choice))


def published_errors(level_bits, aq_levels_mask) -> np.ndarray:
    """Per-level variance coefficient of the published allocators, to run them through
    allocate_bits with errors = np.outer(np.ones(n), published_errors(...)).

    0 at >= 32 bits (stored exactly), 1/(2^b - 1)^2 for b-bit rounding, and the 1-bit
    coefficient 1 for every AQ level whatever its bits (docs/solver.md).
    """
    bits = _vector("level_bits", level_bits)
    aq = np.asarray(aq_levels_mask, dtype=bool)
    if aq.shape != bits.shape:
        raise ValueError(f"aq_levels_mask has shape {aq.shape}; expected {bits.shape}, "
                         "one flag per level")
    plain = ~aq & (bits < 32)
    bad = plain & ((bits != np.round(bits)) | (bits < 1))
    if bad.any():
        raise ValueError(f"published pricing needs integer bits >= 1 for plain levels, got "
                         f"{bits[bad]}; mark averaged levels in aq_levels_mask")
    coef = np.zeros_like(bits)
    coef[plain] = 1.0 / (2.0 ** bits[plain] - 1.0) ** 2
    coef[aq] = 1.0
    return coef


# ----------------------------------------------------------------------------- validation

def _numbers(name: str, x, shape: str) -> np.ndarray:
    """x as float64; a TypeError naming what allocate_bits takes where it is not numbers."""
    try:
        if isinstance(x, (str, bytes)) or x is None:  # numpy would read them as a value
            raise TypeError(f"{type(x).__name__} is not an array")
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"allocate_bits takes {name} as {shape} of numbers (a list, numpy array "
                        f"or CPU tensor), got {type(x).__name__} ({error})") from None


def _vector(name: str, x) -> np.ndarray:
    v = _numbers(name, x, "a 1-D array-like")
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {v.shape}")
    return v


def _require(name: str, ok: np.ndarray, what: str) -> None:
    if not ok.all():
        where = [tuple(i.tolist()) if ok.ndim > 1 else int(i[0]) for i in np.argwhere(~ok)[:10]]
        raise ValueError(f"{name} must be {what}; bad entries at {where}")


def _values(sensitivity: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """C_i e[i, l] (errors level-major (L, n)), +inf where the level is not allowed; nan
    errors mean "not allowed" too, and 0 * inf never makes a nan."""
    barred = ~np.isfinite(errors)
    values = sensitivity * np.where(barred, 0.0, errors)
    values[barred] = np.inf
    return values


def _validate(sizes, sensitivity, errors, level_bits, budget) -> _Instance:
    w = _vector("sizes", sizes)
    c = _vector("sensitivity", sensitivity)
    bits = _vector("level_bits", level_bits)
    e = _numbers("errors", errors, "a (units, levels) array-like")
    n, n_levels = len(w), len(bits)
    if n_levels == 0:
        raise ValueError("level_bits is empty; pass at least one level")
    if c.shape != (n,):
        raise ValueError(f"sensitivity has shape {c.shape}; expected ({n},), one per unit")
    if n == 0 and e.size == 0:
        e = e.reshape(0, n_levels)
    if e.shape != (n, n_levels):
        raise ValueError(f"errors has shape {e.shape}; expected (units, levels) = {(n, n_levels)}")
    _require("sizes", np.isfinite(w) & (w >= 0), "finite and >= 0")
    _require("level_bits", np.isfinite(bits) & (bits >= 0), "finite and >= 0")
    _require("sensitivity", ~np.isnan(c), "free of NaN (the GACT probe uses 1e10 for NaN)")
    _require("sensitivity", np.isfinite(c) & (c >= 0), "finite and >= 0")
    _require("errors", ~(e < 0), ">= 0 (use inf or nan to forbid a level)")
    try:  # numbers, numpy and one-value tensors; never text
        budget = float(budget if not isinstance(budget, (str, bytes)) else None)
    except (TypeError, ValueError):
        raise TypeError(f"allocate_bits takes budget as a number of bits, got "
                        f"{type(budget).__name__} {budget!r}") from None
    if math.isnan(budget):
        raise ValueError("budget is NaN; pass the number of payload bits allowed")
    e = np.ascontiguousarray(e.T)
    e[np.isnan(e)] = np.inf
    stuck = np.isinf(e).all(axis=0)
    if stuck.any():
        raise ValueError(f"units {np.flatnonzero(stuck)[:10].tolist()} have no allowed level (all "
                         "errors inf/nan); give each unit at least one finite error")
    _pin_free_units(w, bits, e)
    inst = _Instance(w, c, e, bits, budget, _values(c, e))
    need = _cost(w, bits, _cheapest_levels(inst))
    if need > inst.budget:
        raise ValueError(f"budget {inst.budget!r} bits is infeasible: every unit at its cheapest "
                         f"allowed level still needs {need!r} bits; raise the budget to that")
    return inst


def _pin_free_units(sizes: np.ndarray, bits: np.ndarray, errors: np.ndarray) -> None:
    """Units of size 0 cost nothing at any level: bar all but their lowest-error one, in place,
    so no solver ever trades them off (or divides by their size)."""
    free = np.flatnonzero(sizes == 0)
    keep = _argmin_then(errors[:, free], bits[:, None])
    pinned = np.full((len(bits), len(free)), np.inf)
    pinned[keep, np.arange(len(free))] = errors[keep, free]
    errors[:, free] = pinned


# ----------------------------------------------------------------------------- small helpers

def _cost(sizes: np.ndarray, bits: np.ndarray, choice: np.ndarray) -> float:
    return float(np.sum(sizes * bits[choice]))


def _objective(values: np.ndarray, choice: np.ndarray) -> float:
    """values level-major (L, n)."""
    return float(np.sum(values[choice, np.arange(len(choice))]))


def _argmin_then(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Per unit (column) argmin of primary, ties to the smaller secondary, then the lower level."""
    tied = primary == primary.min(axis=0)
    return np.argmin(np.where(tied, secondary, np.inf), axis=0)


def _descending(key: np.ndarray) -> np.ndarray:
    """Indices that sort key from largest to smallest, equal keys in index order. Quicksort,
    about twice as fast as a stable sort, is exact unless there are ties."""
    order = np.argsort(-key)
    ranked = key[order]
    if (ranked[1:] == ranked[:-1]).any():
        order = np.argsort(-key, kind="stable")
    return order


def _cheapest_levels(inst: _Instance) -> np.ndarray:
    allowed_bits = np.where(np.isinf(inst.values), np.inf, inst.bits[:, None])
    return _argmin_then(allowed_bits, inst.values)


def _lowest_error_levels(inst: _Instance) -> np.ndarray:
    return _argmin_then(inst.errors, inst.bits[:, None])


# ----------------------------------------------------------------------------- greedy

def _greedy(inst: _Instance) -> np.ndarray:
    """The published heap allocator (docs/solver.md), vectorised.

    A unit's ladder is its allowed levels by decreasing bits; of levels with equal bits only
    the lowest-error one is a rung, as stepping between them saves nothing. All units start
    on their top rung. A max-heap holds each unit's next step, keyed by
    C (e_cur - e_next) / (w (b_cur - b_next)) <= 0, ties to the larger unit index; pop, step
    down, push the unit's next step; stop once the cost fits. A step enters the heap only
    when the one before it pops, so the pops come in order of the running minimum of keys
    along each ladder (then larger unit, then earlier step): one stable sort replaces the heap.
    """
    n = len(inst.sizes)
    cols = np.arange(n)
    rung_bits = np.unique(inst.bits)[::-1]
    rungs = np.stack([_best_of(inst, np.flatnonzero(inst.bits == b)) for b in rung_bits])  # (D, n)
    err = inst.errors[rungs, cols]
    on = np.isfinite(err)
    below = _next_rung(on)  # (D, n), len(rung_bits) where no lower rung exists
    step = on & (below < len(rung_bits))
    last = np.minimum(below, len(rung_bits) - 1)
    saved = rung_bits[:, None] - rung_bits[last]  # bits per value a step saves
    with np.errstate(invalid="ignore", divide="ignore"):
        key = inst.sensitivity * (err - err[last, cols]) / (inst.sizes * saved)
    key[~step] = np.inf
    for d in range(1, len(key)):  # running minimum along each ladder
        np.minimum(key[d], key[d - 1], out=key[d])

    unit, d = np.nonzero(step.T[::-1])  # larger unit first, then earlier step
    unit = n - 1 - unit
    order = np.argsort(-key[d, unit], kind="stable")  # running minima tie often: no quicksort
    unit, d = unit[order], d[order]
    top = np.argmax(on, axis=0)
    start = _cost(inst.sizes, inst.bits, rungs[top, cols])
    left = start - np.cumsum(inst.sizes[unit] * saved[d, unit])
    jump = (below - np.arange(len(rung_bits))[:, None])[d, unit]

    def after(pops: int) -> np.ndarray:
        down = np.bincount(unit[:pops], weights=jump[:pops], minlength=n).astype(np.int64)
        return rungs[top + down, cols]

    if start <= inst.budget:
        return after(0)
    fits = left <= inst.budget
    pops = int(np.argmax(fits)) + 1 if fits.any() else len(unit)
    while pops < len(unit) and _cost(inst.sizes, inst.bits, after(pops)) > inst.budget:
        pops += 1  # the running sum is rounded; exact sums decide, as in the heap loop
    while pops > 1 and _cost(inst.sizes, inst.bits, after(pops - 1)) <= inst.budget:
        pops -= 1
    return after(pops)


def _best_of(inst: _Instance, levels: np.ndarray) -> np.ndarray:
    """Per unit, the lowest-error level among levels (the first one on ties)."""
    return levels[np.argmin(inst.errors[levels], axis=0)]


def _next_rung(on: np.ndarray) -> np.ndarray:
    """below[d, i]: the first allowed rung after d for unit i, or len(on) if there is none."""
    below = np.full(on.shape, len(on))
    for d in range(len(on) - 2, -1, -1):
        below[d] = np.where(on[d + 1], d + 1, below[d + 1])
    return below


# ----------------------------------------------------------------------------- exact

def _exact(inst: _Instance, greedy: np.ndarray) -> np.ndarray:
    """The best of: the LP rounded down and repaired, and the greedy answer. When that is not
    provably within GAP_TOLERANCE of the LP bound, or the problem is small, also the LP rounded
    up, then an exact search (or, if the search grows too large and the gap is big, a MILP).
    Never worse than greedy: every step keeps the best answer so far."""
    path, rate = _convex_hulls(inst)
    segs = _hull_segments(inst, path, rate)
    taken, lam = _lp_prefix(inst, path, segs)
    bound = _dual(inst, lam)
    best = _better(inst, greedy, _repair(inst, _after(path, segs, taken)))

    def gap(choice: np.ndarray) -> float:  # obj <= (1 + gap) * bound <= (1 + gap) * optimum
        obj = _objective(inst.values, choice)
        if obj <= max(bound, 0.0):
            return 0.0
        return (obj - bound) / bound if bound > 0 else math.inf

    if gap(best) > GAP_TOLERANCE or (gap(best) > 0 and inst.values.size <= SMALL_PROBLEM):
        best = _better(inst, best, _round_up(inst, path, segs, taken))
        optimum = _bounded_search(inst, best, lam, path, segs)
        if optimum is None and gap(best) > GAP_TOLERANCE:
            optimum = _solve_milp(inst, best)
        best = _better(inst, best, optimum)
    return best


def _lp_rounded(inst: _Instance) -> np.ndarray:
    """The LP relaxation's integral part, leftover budget spent by repair rounds."""
    path, rate = _convex_hulls(inst)
    segs = _hull_segments(inst, path, rate)
    taken, _ = _lp_prefix(inst, path, segs)
    return _repair(inst, _after(path, segs, taken))


def _better(inst: _Instance, best: np.ndarray, candidate: np.ndarray | None) -> np.ndarray:
    """candidate if there is one and its objective is lower, else best."""
    if candidate is not None and _objective(inst.values, candidate) < _objective(inst.values, best):
        return candidate
    return best


def _convex_hulls(inst: _Instance) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's lower convex hull in (bits, value) space, cheapest point first (gift wrapping,
    all units at once). Only hull points are ever Lagrangian (LP) choices.

    Returns path (L, n): hull levels, the last repeated once the hull ends, and rate
    (L-1, n): value saved per extra budget bit along each hull segment, -inf past the end,
    non-increasing along the hull.
    """
    by_bits = np.argsort(inst.bits, kind="stable")  # so argmax ties go to the nearer point
    v, bits = inst.values[by_bits], inst.bits[by_bits]
    n_levels, n = v.shape
    cols = np.arange(n)
    path = np.empty((n_levels, n), dtype=np.int64)
    rate = np.full((n_levels - 1, n), -np.inf)
    path[0] = _argmin_then(np.where(np.isinf(v), np.inf, bits[:, None]), v)
    for s in range(n_levels - 1):
        cur = path[s]
        dv = v[cur, cols] - v
        db = bits[:, None] - bits[cur]
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = dv / db
        np.copyto(slope, -np.inf, where=(dv <= 0) | (db <= 0))
        nxt = np.argmax(slope, axis=0)
        steepest = slope[nxt, cols]
        if not (steepest > -np.inf).any():
            path[s + 1:] = cur
            break
        path[s + 1] = np.where(steepest > -np.inf, nxt, cur)
        rate[s] = steepest / inst.sizes
        if s:
            np.minimum(rate[s], rate[s - 1], out=rate[s])  # guards the order against rounding
    return by_bits[path], rate


@dataclass
class _Segments:
    """All units' hull segments in the LP's order: best rate first, each unit's in hull order."""
    unit: np.ndarray
    extra: np.ndarray  # budget bits the segment adds
    gain: np.ndarray  # objective it removes
    rate: np.ndarray  # gain per bit (non-increasing)


def _hull_segments(inst: _Instance, path: np.ndarray, rate: np.ndarray) -> _Segments:
    s, unit = np.nonzero(rate > -np.inf)  # step-major, so ties keep each unit's order
    order = _descending(rate[s, unit])
    s, unit = s[order], unit[order]
    lower, upper = path[s, unit], path[s + 1, unit]
    return _Segments(unit, inst.sizes[unit] * (inst.bits[upper] - inst.bits[lower]),
                     inst.values[lower, unit] - inst.values[upper, unit], rate[s, unit])


def _lp_prefix(inst: _Instance, path: np.ndarray, segs: _Segments) -> tuple[int, float]:
    """How many hull segments, best rate first, fit the budget: the LP optimum without its one
    fractional segment. Also returns the LP multiplier (the rate of the first segment left
    out, 0 if all fit)."""
    room = inst.budget - _cost(inst.sizes, inst.bits, path[0])
    taken = int(np.searchsorted(np.cumsum(segs.extra), room, side="right"))
    while _cost(inst.sizes, inst.bits, _after(path, segs, taken)) > inst.budget:  # rounded sums
        taken -= 1
    return taken, float(segs.rate[taken]) if taken < len(segs.rate) else 0.0


def _after(path: np.ndarray, segs: _Segments, taken: int) -> np.ndarray:
    """The levels reached by taking the first `taken` segments."""
    n = path.shape[1]
    return path[np.bincount(segs.unit[:taken], minlength=n), np.arange(n)]


def _round_up(inst: _Instance, path: np.ndarray, segs: _Segments, taken: int) -> np.ndarray | None:
    """The LP rounded up: take its fractional segment whole, then give back other units' taken
    segments, lowest rate first, until the budget fits. Repaired; None if nothing fits."""
    if taken == len(segs.unit):
        return None
    over = _cost(inst.sizes, inst.bits, _after(path, segs, taken + 1)) - inst.budget
    back = np.flatnonzero(segs.unit[:taken] != segs.unit[taken])[::-1]  # each unit's last first
    n = path.shape[1]
    counts = np.bincount(segs.unit[:taken + 1], minlength=n)
    for given in range(int(np.searchsorted(np.cumsum(segs.extra[back]), over)) + 1, len(back) + 1):
        choice = path[counts - np.bincount(segs.unit[back[:given]], minlength=n), np.arange(n)]
        if _cost(inst.sizes, inst.bits, choice) <= inst.budget:  # the running sum is rounded
            return _repair(inst, choice)
    return None


def _lp_value(inst: _Instance, path: np.ndarray, segs: _Segments, units: np.ndarray,
              room: np.ndarray) -> np.ndarray:
    """The LP relaxation's optimum over the given units (a mask) alone, for each budget in
    room: a lower bound on any allocation of them within that budget (+inf below their cheapest)."""
    on = units[segs.unit]
    extra = np.concatenate(([0.0], np.cumsum(segs.extra[on])))
    gain = np.concatenate(([0.0], np.cumsum(segs.gain[on])))
    per_bit = np.append(segs.gain[on] / segs.extra[on], 0.0)
    cols = np.flatnonzero(units)
    left = room - inst.sizes[cols] @ inst.bits[path[0, cols]]
    whole = np.maximum(np.searchsorted(extra, left, side="right") - 1, 0)  # segments that fit
    start = inst.values[path[0, cols], cols].sum()
    value = start - gain[whole] - (left - extra[whole]) * per_bit[whole]
    return np.where(left >= 0, value, np.inf)


def _dual(inst: _Instance, lam: float) -> float:
    """Lagrangian dual sum_i min_l (C_i e[i,l] + lam w_i bits[l]) - lam B: a lower bound on the
    optimum for every lam >= 0 (weak duality), equal to the LP value at the LP multiplier."""
    if lam == 0.0:
        return float(inst.values.min(axis=0).sum())
    priced = inst.values + lam * inst.bits[:, None] * inst.sizes
    return float(priced.min(axis=0).sum() - lam * inst.budget)


def _repair(inst: _Instance, choice: np.ndarray) -> np.ndarray:
    """Spend the budget the rounding left: each round, every unit proposes its largest single
    upgrade that fits on its own; proposals go in most value per bit first while they fit."""
    v, w, bits = inst.values, inst.sizes, inst.bits
    cols = np.arange(len(choice))
    for _ in range(REPAIR_ROUNDS):
        room = inst.budget - _cost(w, bits, choice)
        gain = v[choice, cols] - v
        extra = (bits[:, None] - bits[choice]) * w
        gain[(gain <= 0) | (extra > room)] = -np.inf
        best = np.argmax(gain, axis=0)
        units = np.flatnonzero(gain[best, cols] > -np.inf)
        if units.size == 0:
            break
        best = best[units]
        g, x = gain[best, units], extra[best, units]
        per_bit = np.full(g.shape, np.inf)  # upgrades that cost nothing come first
        np.divide(g, x, out=per_bit, where=x > 0)
        order = _descending(per_bit)
        fits = np.logical_and.accumulate(np.cumsum(x[order]) <= room)
        trial = choice.copy()
        trial[units[order[fits]]] = best[order[fits]]
        if _cost(w, bits, trial) > inst.budget:  # the running sum is rounded
            break
        choice = trial
    return choice


def _bounded_search(inst: _Instance, incumbent: np.ndarray, lam: float, path: np.ndarray,
                    segs: _Segments) -> np.ndarray | None:
    """The optimal allocation, by a dynamic program pruned with LP bounds.

    Fixing: with priced[l, i] = C_i e[i, l] + lam w_i bits[l] and reduced costs
    r[l, i] = priced[l, i] - min_l priced[:, i] >= 0, every allocation within budget has
    objective >= dual(lam) + sum_i r[l_i, i]. A level with r > U - dual(lam) can never beat
    the incumbent U, so most units keep one level.
    Search: over the other units one at a time, keep the partial allocations that are
    Pareto-optimal in (bits, objective) and whose objective plus the LP bound of the units
    still to come, given the bits left, does not exceed U.
    Returns None (no proof either way) once SEARCH_WORK partial allocations and LP segments
    have been examined.
    """
    v = inst.values
    spend = inst.bits[:, None] * inst.sizes
    reduced = v + lam * spend
    reduced -= reduced.min(axis=0)
    best = _objective(v, incumbent)
    bound = _dual(inst, lam)
    tol = 1e-9 * max(abs(best), abs(bound))
    keep = reduced <= best - bound + tol
    cols = np.arange(v.shape[1])
    fixed = keep.sum(axis=0) == 1
    base = np.argmax(keep, axis=0)  # the only kept level of a fixed unit
    free = np.flatnonzero(~fixed)
    most = np.where(keep[:, free], spend[:, free], -np.inf).max(axis=0)
    least = np.where(keep[:, free], spend[:, free], np.inf).min(axis=0)
    free = free[np.argsort(least - most, kind="stable")]  # widest spend range first: prunes sooner

    pending = ~fixed
    on = pending[segs.unit]
    segs = _Segments(segs.unit[on], segs.extra[on], segs.gain[on], segs.rate[on])  # the free units'
    states_spent = np.array([spend[base[fixed], cols[fixed]].sum()])
    states_value = np.array([v[base[fixed], cols[fixed]].sum()])
    trail = []  # per free unit: (parent state, level) of each surviving state
    work = 0
    for unit in free:
        levels = np.flatnonzero(keep[:, unit])
        spent = (states_spent[:, None] + spend[levels, unit]).ravel()
        value = (states_value[:, None] + v[levels, unit]).ravel()
        pending[unit] = False
        work += len(value) + len(segs.unit)
        if work > SEARCH_WORK:
            return None
        promise = value + _lp_value(inst, path, segs, pending, inst.budget - spent)
        alive = np.flatnonzero(promise <= best + tol)
        alive = alive[np.lexsort((value[alive], spent[alive]))]
        running_min = np.minimum.accumulate(value[alive])
        alive = alive[value[alive] < np.concatenate(([np.inf], running_min[:-1]))]  # Pareto front
        trail.append((alive // len(levels), levels[alive % len(levels)]))
        states_spent, states_value = spent[alive], value[alive]
    if len(states_value) == 0:
        return incumbent  # nothing beats it
    choice = base.copy()
    state = int(np.argmin(states_value))
    for unit, (parent, level) in zip(free[::-1], trail[::-1]):
        choice[unit] = level[state]
        state = parent[state]
    return choice if _cost(inst.sizes, inst.bits, choice) <= inst.budget else incumbent


def _solve_milp(inst: _Instance, incumbent: np.ndarray) -> np.ndarray | None:
    """The 0/1 program, one-hot per unit plus the budget row, with HiGHS. Returns None when it
    finds nothing that beats the incumbent and meets the budget exactly."""
    n = len(incumbent)
    level, unit = np.nonzero(np.isfinite(inst.values))
    floor = inst.values.min(axis=0)
    excess = inst.values[level, unit] - floor[unit]  # >= 0; scaled so the incumbent's is 1
    scale = _objective(inst.values, incumbent) - float(floor.sum())
    if scale <= 0:
        return None
    m = len(unit)
    onehot = csr_array((np.ones(m), (unit, np.arange(m))), shape=(n, m))
    row_scale = inst.budget if inst.budget > 0 else 1.0
    spend = (inst.sizes[unit] * inst.bits[level] / row_scale)[None, :]
    res = milp(excess / scale, integrality=np.ones(m), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(onehot, 1, 1),
                            LinearConstraint(spend, -np.inf, inst.budget / row_scale)],
               options={"time_limit": MILP_TIME_LIMIT_S, "mip_rel_gap": 1e-9})
    if res.x is None:
        return None
    on = res.x > 0.5
    if not np.array_equal(np.bincount(unit[on], minlength=n), np.ones(n, dtype=np.int64)):
        return None
    choice = np.empty(n, dtype=np.int64)
    choice[unit[on]] = level[on]
    if _cost(inst.sizes, inst.bits, choice) > inst.budget:
        return None
    return choice
