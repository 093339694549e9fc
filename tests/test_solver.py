"""Tests for the bit-allocation solver (aqcore/solver.py, docs/solver.md)."""
import heapq
import itertools
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, milp

from aqcore import solver
from aqcore.solver import allocate_bits, cost, lower_bound, objective, published_errors

REAL_BITS = np.array([32, 8, 4, 2, 1, 1.0, 0.5, 0.25])  # 32, plain 8..1, aq1, aq0.5, aq0.25
REAL_AQ_RUN = np.array([0, 0, 0, 0, 0, 2, 4, 8])  # values averaged per AQ level


# ----------------------------------------------------------------------------- instances

def realistic_instance(rng, n):
    """Shaped like the real problem: plain errors R^2/(2^b-1)^2 per unit spread, AQ errors
    from a random smoothness (better or worse than 1 bit), budget 1.25-2 bits on average."""
    sizes = np.round(10 ** rng.uniform(3, 6, n))
    spread = sizes * rng.lognormal(0, 1, n)
    smooth = rng.uniform(0, 2, n)
    errors = np.empty((n, len(REAL_BITS)))
    for level, (b, k) in enumerate(zip(REAL_BITS, REAL_AQ_RUN)):
        if k:
            errors[:, level] = spread * (smooth * (1 - 1 / k) + 1 / (9 * k))
        else:
            errors[:, level] = 0.0 if b >= 32 else spread / (2 ** b - 1) ** 2
    sens = rng.lognormal(0, 2, n)
    return sizes, sens, errors, REAL_BITS, rng.uniform(1.25, 2) * sizes.sum()


def random_instance(rng, n, n_levels, ties=False):
    """Unstructured instances: non-convex errors, barred levels (inf and nan), zero sizes,
    zero sensitivities, repeated bit values; with ties=True, values from small integer sets."""
    bits = rng.choice([0.25, 0.5, 1, 1, 2, 3, 4, 8, 32], n_levels)
    if ties:
        sizes = rng.integers(0, 4, n).astype(float)
        sens = rng.integers(0, 3, n).astype(float)
        errors = rng.integers(0, 4, (n, n_levels)).astype(float)
    else:
        sizes = np.where(rng.random(n) < 0.15, 0.0, rng.uniform(0, 100, n))
        sens = np.where(rng.random(n) < 0.15, 0.0, rng.lognormal(0, 1, n))
        errors = rng.exponential(1, (n, n_levels))
    errors[rng.random((n, n_levels)) < 0.15] = np.inf
    errors[rng.random((n, n_levels)) < 0.1] = np.nan
    errors[np.arange(n), rng.integers(0, n_levels, n)] = rng.exponential(1, n)  # one level allowed
    allowed_bits = np.where(np.isfinite(errors), bits, np.nan)
    low = float(np.sum(sizes * np.nanmin(allowed_bits, axis=1)))
    best = float(np.sum(sizes * bits[np.argmin(np.nan_to_num(errors, nan=np.inf), axis=1)]))
    budget = rng.choice([low, best * 1.01, rng.uniform(low, max(low, best))], p=[0.1, 0.1, 0.8])
    return sizes, sens, errors, bits, budget


def brute_force(sizes, sens, errors, bits, budget):
    """The optimal objective by enumerating every allocation."""
    options = [np.flatnonzero(np.isfinite(row)) for row in np.asarray(errors, dtype=float)]
    best = np.inf
    for choice in itertools.product(*options):
        if cost(sizes, bits, list(choice)) <= budget:
            best = min(best, objective(sens, errors, list(choice)))
    return best


def milp_optimum(sizes, sens, errors, bits, budget):
    """The optimal objective from scipy's MILP on the one-hot formulation, or None if HiGHS's
    answer breaks the budget by its tolerance (then it proves nothing)."""
    errors = np.where(np.isnan(errors), np.inf, errors)
    unit, level = np.nonzero(np.isfinite(errors))
    onehot = np.zeros((len(sizes), len(unit)))
    onehot[unit, np.arange(len(unit))] = 1
    res = milp(sens[unit] * errors[unit, level], integrality=np.ones(len(unit)),
               bounds=Bounds(0, 1), options={"mip_rel_gap": 1e-9},
               constraints=[LinearConstraint(onehot, 1, 1),
                            LinearConstraint(sizes[unit] * bits[level], -np.inf, budget)])
    choice = np.empty(len(sizes), dtype=np.int64)
    choice[unit[res.x > 0.5]] = level[res.x > 0.5]
    return objective(sens, errors, choice) if cost(sizes, bits, choice) <= budget else None


def heap_greedy(sizes, sens, errors, bits, budget):
    """The published heap loop, written literally (docs/solver.md, "greedy"): ladders of
    allowed levels by decreasing bits (lowest error among equal bits), start at the top,
    max-heap on C (e_cur - e_next) / (w (b_cur - b_next)), ties to the larger unit."""
    errors = np.where(np.isnan(errors), np.inf, errors)
    n = len(sizes)
    choice, ladders, rung = [], [], [0] * n
    for i in range(n):
        allowed = [lv for lv in range(len(bits)) if np.isfinite(errors[i][lv])]
        if sizes[i] == 0:  # free units sit at their lowest-error level
            choice.append(min(allowed, key=lambda lv: (errors[i][lv], bits[lv], lv)))
            ladders.append([choice[-1]])
            continue
        ladder = []
        for b in sorted({bits[lv] for lv in allowed}, reverse=True):
            same_bits = [lv for lv in allowed if bits[lv] == b]
            ladder.append(min(same_bits, key=lambda lv: (errors[i][lv], lv)))
        ladders.append(ladder)
        choice.append(ladder[0])
    heap = []

    def push(i):
        if rung[i] + 1 < len(ladders[i]):
            cur, nxt = ladders[i][rung[i]], ladders[i][rung[i] + 1]
            key = sens[i] * (errors[i][cur] - errors[i][nxt]) / (sizes[i] * (bits[cur] - bits[nxt]))
            heapq.heappush(heap, (-key, -i))

    for i in range(n):
        push(i)
    while cost(sizes, bits, choice) > budget:
        _, minus_i = heapq.heappop(heap)
        i = -minus_i
        rung[i] += 1
        choice[i] = ladders[i][rung[i]]
        push(i)
    return np.array(choice)


# ----------------------------------------------------------------------------- optimality

SEEDS = st.integers(0, 2**32 - 1)


@settings(max_examples=150, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 6), n_levels=st.integers(1, 4), ties=st.booleans())
def test_exact_is_optimal_on_small_instances(seed, n, n_levels, ties):
    rng = np.random.default_rng(seed)
    sizes, sens, errors, bits, budget = random_instance(rng, n, n_levels, ties)
    choice = allocate_bits(sizes, sens, errors, bits, budget)
    best = brute_force(sizes, sens, errors, bits, budget)
    assert cost(sizes, bits, choice) <= budget
    assert objective(sens, errors, choice) <= best + 1e-9 * abs(best)
    assert lower_bound(sizes, sens, errors, bits, budget) <= best + 1e-9 * abs(best)


@pytest.mark.parametrize("seed", range(12))
def test_exact_matches_a_milp_on_medium_instances(seed):
    """Beyond brute force: the bounded search must find the MILP optimum (to HiGHS's gap)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 80))
    if seed % 2:
        instance = realistic_instance(rng, n)
    else:
        instance = random_instance(rng, n, int(rng.integers(2, 8)), ties=seed % 4 == 0)
    sizes, sens, errors, bits, budget = instance
    choice = allocate_bits(*instance)
    reference = milp_optimum(*instance)
    assert cost(sizes, bits, choice) <= budget
    if reference is not None:
        assert objective(sens, errors, choice) <= reference * (1 + 1e-9)


def test_milp_fallback_is_optimal_when_the_search_gives_up(monkeypatch):
    calls = []
    solve_milp = solver._solve_milp

    def counted(*args):
        calls.append(args)
        return solve_milp(*args)

    monkeypatch.setattr(solver, "SEARCH_WORK", 0)
    monkeypatch.setattr(solver, "GAP_TOLERANCE", 0.0)
    monkeypatch.setattr(solver, "_solve_milp", counted)
    rng = np.random.default_rng(3)
    for _ in range(40):
        instance = random_instance(rng, 5, 3)
        sizes, sens, errors, bits, budget = instance
        choice = allocate_bits(*instance)
        best = brute_force(*instance)
        assert cost(sizes, bits, choice) <= budget
        assert objective(sens, errors, choice) <= best + 1e-6 * abs(best)  # HiGHS's absolute gap
    assert calls


@settings(max_examples=100, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 40), n_levels=st.integers(1, 6), ties=st.booleans())
def test_greedy_is_the_published_heap_loop(seed, n, n_levels, ties):
    instance = random_instance(np.random.default_rng(seed), n, n_levels, ties)
    np.testing.assert_array_equal(allocate_bits(*instance, method="greedy"), heap_greedy(*instance))


@pytest.mark.parametrize("n", [10, 200, 2000])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["random", "ties", "realistic"])
def test_exact_never_worse_than_greedy(n, seed, kind):
    rng = np.random.default_rng(seed)
    if kind == "realistic":
        sizes, sens, errors, bits, budget = realistic_instance(rng, n)
    else:
        sizes, sens, errors, bits, budget = random_instance(rng, n, 6, ties=kind == "ties")
    exact = allocate_bits(sizes, sens, errors, bits, budget)
    greedy = allocate_bits(sizes, sens, errors, bits, budget, method="greedy")
    assert cost(sizes, bits, exact) <= budget
    assert cost(sizes, bits, greedy) <= budget
    assert objective(sens, errors, exact) <= objective(sens, errors, greedy)


@pytest.mark.parametrize("seed", range(3))
def test_exact_within_a_tenth_of_a_percent_of_the_lp_bound(seed):
    instance = realistic_instance(np.random.default_rng(seed), 10_000)
    sizes, sens, errors, bits, budget = instance
    choice = allocate_bits(*instance)
    bound = lower_bound(*instance)
    assert cost(sizes, bits, choice) <= budget
    assert bound <= objective(sens, errors, choice) <= bound * (1 + 1e-3)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [128, 10_000])
def test_lp_rounding_is_feasible_and_close_to_the_bound(seed, n):
    """The per-step method: no search, still within 1% of the LP bound on per-sample
    instances (ActNN's: every sample of a layer has the same size)."""
    sizes, sens, errors, bits, budget = realistic_instance(np.random.default_rng(seed), n)
    budget = budget / sizes.sum() * 4096 * n
    sizes = np.full(n, 4096.0)
    instance = sizes, sens, errors, bits, budget
    choice = allocate_bits(*instance, method="lp")
    exact = allocate_bits(*instance)
    bound = lower_bound(*instance)
    assert cost(sizes, bits, choice) <= budget
    assert objective(sens, errors, exact) <= objective(sens, errors, choice) <= bound * 1.01


@settings(max_examples=60, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 30), n_levels=st.integers(1, 5), ties=st.booleans())
def test_lp_rounding_never_exceeds_the_budget(seed, n, n_levels, ties):
    sizes, sens, errors, bits, budget = random_instance(np.random.default_rng(seed), n, n_levels, ties)
    choice = allocate_bits(sizes, sens, errors, bits, budget, method="lp")
    assert cost(sizes, bits, choice) <= budget
    assert np.isfinite(np.asarray(errors)[np.arange(n), choice]).all()


def test_exact_beats_greedy_where_the_greedy_overshoots():
    """The GACT hand example (test_greedy_reproduces_gact_ladder_by_hand): greedy stops at 11
    of 12 bits with bits 1, 2, 8 (objective 1 + 100/9 + 10^4/255^2 = 12.27); the optimum
    spends the last bit on unit 0: bits 2, 2, 8 (objective 1/9 + 100/9 + 0.15 = 11.38)."""
    errors = np.outer(np.ones(3), published_errors([32, 8, 4, 2, 1], [False] * 5))
    exact = allocate_bits([1, 1, 1], [1, 100, 10_000], errors, [32, 8, 4, 2, 1], 12)
    np.testing.assert_array_equal(exact, [3, 3, 1])


# ----------------------------------------------------------------------------- published greedy

def test_greedy_reproduces_gact_ladder_by_hand():
    """GACT C.6, w = 1, C = 1, 100, 10000, budget 12 bits. Keys C (e_b - e_b') / (b - b') with
    e_32 = 0, e_b = 1/(2^b-1)^2. Pops: u0 32->8 (-6.4e-7), u1 32->8 (-6.4e-5), u0 8->4
    (-1.1e-3), u2 32->8 (-6.4e-3), u0 4->2 (-0.053), u1 8->4 (-0.11), u0 2->1 (-0.89), u1 4->2
    (-5.3): cost 96 -> 72, 48, 44, 20, 18, 14, 13, 11 <= 12, stop. Bits 1, 2, 8."""
    bits = [32, 8, 4, 2, 1]
    errors = np.outer(np.ones(3), published_errors(bits, [False] * 5))
    choice = allocate_bits([1, 1, 1], [1, 100, 10_000], errors, bits, 12, method="greedy")
    np.testing.assert_array_equal(np.asarray(bits)[choice], [1, 2, 8])


def test_greedy_reproduces_actnn_one_bit_steps_by_hand():
    """ActNN B.7, w = 1, C = 1, 16, from 8 bits each to T = 4. Keys in pop order: u0@8, u0@7,
    u1@8, u0@6, u1@7, u0@5, u1@6, u0@4, u1@5, u0@3, u1@4, u0@2 (-0.89 beats u1@3, -1.45):
    twelve pops leave u0 at 1 bit and u1 at 3."""
    bits = [8, 7, 6, 5, 4, 3, 2, 1]
    errors = np.outer(np.ones(2), published_errors(bits, [False] * 8))
    choice = allocate_bits([1, 1], [1, 16], errors, bits, 4, method="greedy")
    np.testing.assert_array_equal(np.asarray(bits)[choice], [1, 3])


def test_published_errors_prices_aq_as_one_bit():
    coef = published_errors([32, 8, 4, 2, 1, 1.0, 0.5], [False] * 5 + [True] * 2)
    np.testing.assert_allclose(coef, [0, 1 / 255**2, 1 / 225, 1 / 9, 1, 1, 1])
    with pytest.raises(ValueError, match="aq_levels_mask"):
        published_errors([2, 0.5], [False, False])


# ----------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_budget_at_the_minimum_gives_the_cheapest_levels(method):
    errors = [[0.0, 1.0, 9.0], [0.0, 2.0, np.inf]]  # unit 1 cannot go to 1 bit
    choice = allocate_bits([10, 20], [1, 1], errors, [8, 4, 1], 10 * 1 + 20 * 4, method=method)
    np.testing.assert_array_equal(choice, [2, 1])


def test_budget_above_the_maximum_gives_the_lowest_error_levels():
    errors = [[0.5, 0.1, 0.9], [0.0, 0.0, 0.0], [3.0, 2.0, 1.0]]
    choice = allocate_bits([10, 20, 30], [1, 0, 1], errors, [8, 4, 1], 1e9)
    np.testing.assert_array_equal(choice, [1, 2, 2])  # ties (unit 1) go to the fewest bits


def test_zero_size_units_are_free_and_take_their_lowest_error_level():
    errors = [[0.0, 1.0, 9.0], [5.0, 1.0, 3.0]]
    for method in ("exact", "greedy"):
        choice = allocate_bits([10, 0], [1, 1], errors, [8, 4, 1], 10, method=method)
        np.testing.assert_array_equal(choice, [2, 1])


def test_no_sensitivity_costs_nothing_and_still_respects_the_budget():
    errors = np.random.default_rng(0).exponential(1, (5, 4))
    bits = [8, 4, 2, 1]
    for budget in (5, 8, 13):
        choice = allocate_bits(np.ones(5), np.zeros(5), errors, bits, budget)
        assert objective(np.zeros(5), errors, choice) == 0
        assert cost(np.ones(5), bits, choice) <= budget
    cheapest = allocate_bits(np.ones(5), np.zeros(5), errors, bits, 5)
    np.testing.assert_array_equal(cheapest, np.full(5, 3))
    roomy = allocate_bits(np.ones(5), np.zeros(5), errors, bits, 40)
    np.testing.assert_array_equal(roomy, errors.argmin(1))  # the budget allows the lowest errors


def test_empty_and_torch_inputs():
    empty = allocate_bits([], [], np.zeros((0, 3)), [8, 4, 1], 0)
    assert empty.dtype == np.int64 and empty.shape == (0,)
    sizes, sens, errors, bits, budget = realistic_instance(np.random.default_rng(1), 50)
    from_torch = allocate_bits(torch.tensor(sizes), torch.tensor(sens), torch.tensor(errors),
                               torch.tensor(bits), budget)
    assert from_torch.dtype == np.int64
    np.testing.assert_array_equal(from_torch, allocate_bits(sizes, sens, errors, bits, budget))


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_infeasible_budget_names_the_minimum(method):
    with pytest.raises(ValueError, match="raise the budget to that") as info:
        allocate_bits([10, 20], [1, 1], [[0, 1], [0, np.inf]], [8, 1], 169, method=method)
    assert "170" in str(info.value)


@pytest.mark.parametrize("args, match", [
    (([1, 2], [1, 1], [[0, 1]], [8, 1], 100), "errors has shape"),
    (([1, 2], [1], [[0, 1], [0, 1]], [8, 1], 100), "sensitivity has shape"),
    (([1, 2], [1, np.nan], [[0, 1], [0, 1]], [8, 1], 100), "NaN"),
    (([1, -2], [1, 1], [[0, 1], [0, 1]], [8, 1], 100), "sizes must be"),
    (([1, 2], [1, 1], [[0, -1], [0, 1]], [8, 1], 100), "errors must be"),
    (([1, 2], [1, 1], [[0, 1], [np.inf, np.nan]], [8, 1], 100), r"units \[1\] have no allowed"),
    (([1, 2], [1, 1], np.zeros((2, 0)), [], 100), "level_bits is empty"),
])
def test_bad_input_raises(args, match):
    with pytest.raises(ValueError, match=match):
        allocate_bits(*args)


@pytest.mark.parametrize("args, named", [
    (("12", [1], [[0, 1]], [8, 1], 8), "sizes as a 1-D array-like of numbers"),
    (([1], None, [[0, 1]], [8, 1], 8), "sensitivity as a 1-D array-like"),
    (([1], [1], {"a": 1}, [8, 1], 8), r"errors as a \(units, levels\) array-like"),
    (([1], [1], [[0, 1]], ["a", "b"], 8), "level_bits"),
    (([1], [1], [[0, 1]], [8, 1], "8"), "budget as a number of bits"),
    (([1], [1], [[0, 1]], [8, 1], None), "budget as a number of bits"),
])
def test_wrong_types_raise_a_type_error_naming_what_is_taken(args, named):
    with pytest.raises(TypeError, match=named):
        allocate_bits(*args)
    assert allocate_bits([1], [1], torch.tensor([[0.0, 1.0]]), np.array([8, 1]),
                         torch.tensor(8.0)).tolist() == [0]  # tensors and arrays are fine


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: exact, greedy, lp"):
        allocate_bits([1], [1], [[0, 1]], [8, 1], 8, method="dp")


# ----------------------------------------------------------------------------- speed

def test_ten_thousand_units_allocate_quickly():
    """The budget is 50 ms on one core; 0.5 s here keeps the test from flaking on a busy box."""
    instance = realistic_instance(np.random.default_rng(0), 10_000)
    allocate_bits(*instance)
    best = min(_timed(allocate_bits, *instance) for _ in range(5))
    assert best < 0.5


def _timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start
