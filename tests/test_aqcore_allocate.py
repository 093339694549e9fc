"""Device-side per-row allocation (aqcore/allocate.py) and the allocated layout."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import aqcore
from aqcore.allocate import reference_allocate_rows
from aqcore.format import row_budget, slot_bytes

LADDER = ("8", "4", "2", "1", "aq1", "aq0.5", "aq0.25")


def instance(rng, rows, levels, ties=False):
    """Weighted errors growing as levels get cheaper, and decreasing costs."""
    steps = rng.random((1 if ties else rows, levels)) * 4 + 0.1
    weighted = np.cumsum(steps, 1) * (1 if ties else rng.lognormal(0, 2, (rows, 1)))
    weighted = np.broadcast_to(weighted, (rows, levels))
    costs = np.sort(rng.choice(np.arange(1, 200), levels, replace=False))[::-1].copy()
    return torch.tensor(weighted, dtype=torch.float32), torch.tensor(costs)


def objective(weighted, choice):
    return weighted.double().gather(1, choice.unsqueeze(1)).sum().item()


def spent(costs, choice):
    return costs.expand(len(choice), -1).gather(1, choice.unsqueeze(1)).sum().item()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(1, 7), st.floats(0, 1), st.integers(0, 2**31), st.booleans())
def test_allocation_fits_and_is_near_the_lp_bound(rows, levels, fraction, seed, ties):
    rng = np.random.default_rng(seed)
    weighted, costs = instance(rng, rows, levels, ties)
    low, high = rows * int(costs.min()), rows * int(costs.max())
    budget = int(low + fraction * (high - low))
    choice = aqcore.allocate_rows(weighted, costs, budget)
    assert choice.dtype == torch.int64 and choice.shape == (rows,)
    assert spent(costs, choice) <= budget
    bound = aqcore.lower_bound(np.ones(rows), np.ones(rows), weighted.double().numpy(),
                               costs.double().numpy(), budget)
    row_step = (weighted.max(1).values - weighted.min(1).values).max().item()
    assert objective(weighted, choice) <= bound + row_step * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("seed", range(20))
def test_allocation_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    rows, levels = 5, 3
    weighted, costs = instance(rng, rows, levels)
    budget = int(rows * costs.min() + rng.random() * rows * (costs.max() - costs.min()))
    best = min(
        (objective(weighted, torch.tensor(c)) for c in np.ndindex(*(levels,) * rows)
         if spent(costs, torch.tensor(c)) <= budget))
    choice = aqcore.allocate_rows(weighted, costs, budget)
    row_step = (weighted.max(1).values - weighted.min(1).values).max().item()
    assert best <= objective(weighted, choice) <= best + row_step


def test_allocation_extremes_and_ties_use_the_budget():
    weighted = torch.tensor([[1.0, 2.0, 4.0]]).repeat(10, 1)
    costs = torch.tensor([30, 20, 10])
    assert aqcore.allocate_rows(weighted, costs, 300).tolist() == [0] * 10  # all fit
    assert aqcore.allocate_rows(weighted, costs, 100).tolist() == [2] * 10  # the minimum
    choice = aqcore.allocate_rows(weighted, costs, 205)  # identical rows: mix two levels
    assert 195 <= spent(costs, choice) <= 205
    zero = aqcore.allocate_rows(torch.zeros(4, 3), costs, 1000)  # nothing to gain: cheapest
    assert zero.tolist() == [2] * 4


def test_allocation_takes_per_row_costs():
    weighted = torch.tensor([[1.0, 5.0], [1.0, 5.0]])
    costs = torch.tensor([[10, 1], [100, 1]])  # row 0's better level is cheap
    assert aqcore.allocate_rows(weighted, costs, 12).tolist() == [0, 1]


def test_allocation_rejects_bad_input():
    with pytest.raises(ValueError, match="float32"):
        aqcore.allocate_rows(torch.zeros(3, 2, dtype=torch.float64), torch.tensor([2, 1]), 9)
    with pytest.raises(ValueError, match="costs"):
        aqcore.allocate_rows(torch.zeros(3, 2), torch.tensor([2, 1, 0]), 9)
    with pytest.raises(ValueError, match="at most 8"):
        aqcore.allocate_rows(torch.zeros(3, 9), torch.arange(9, 0, -1), 90)


def relu_batch(rows=12, shape=(8, 20, 20), seed=0):
    torch.manual_seed(seed)
    return torch.relu(torch.randn(rows, *shape)) * torch.rand(rows, 1, 1, 1) * 5


@pytest.mark.parametrize("bits", [0.2, 1.25, 2.0, 12.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compress_allocated_matches_per_row_compress(bits, dtype):
    x = relu_batch().to(dtype)
    weights = torch.rand(x.shape[0])
    ct, errors = aqcore.compress_allocated(x, LADDER, weights, bits, seed=7)
    assert errors.shape == (x.shape[0], len(LADDER))
    levels = list(ct.row_levels())
    expected = aqcore.decompress(aqcore.compress(x, levels, seed=7))
    assert torch.equal(aqcore.decompress(ct), expected)
    slots = [slot_bytes(level, x[0].numel(), 256)[1] for level in levels]
    assert sum(slots) <= ct.payload.numel()
    per_row = row_budget(ct.levels, x[0].numel(), 256, bits)
    assert ct.payload.numel() <= max(x.shape[0] * per_row, sum(slots)) + 16
    assert ct.nbytes == ct.payload.numel() + ct.table.numel() * 8
    budget_levels = [l for l in levels if l.bits_per_value > 1]
    if bits >= 12:
        assert budget_levels == levels and all(l.name == "8" for l in levels)


def test_compress_allocated_spends_bits_where_weights_are():
    x = relu_batch(rows=16)
    weights = torch.ones(16)
    weights[:4] = 1e6
    ct, _ = aqcore.compress_allocated(x, LADDER, weights, 1.5)
    by_row = {e[3]: aqcore.QUANTIZED_LEVELS[e[0]] for e in ct.table.tolist()}
    heavy = np.mean([by_row[r].bits_per_value for r in range(4)])
    light = np.mean([by_row[r].bits_per_value for r in range(4, 16)])
    assert heavy > 2 * light


def test_compress_allocated_layouts_and_non_finite():
    x = relu_batch(rows=4).to(memory_format=torch.channels_last)
    ct, _ = aqcore.compress_allocated(x, LADDER[:4], torch.ones(4), 2.0)
    y = aqcore.decompress(ct)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == x.shape
    assert torch.equal(y, aqcore.decompress(aqcore.compress(x, list(ct.row_levels()))))
    x = relu_batch(rows=3)
    x[1, 0, 0, 0] = torch.nan
    ct, errors = aqcore.compress_allocated(x, LADDER, torch.tensor([1.0, torch.nan, torch.inf]), 1.0)
    y = aqcore.decompress(ct)
    assert torch.isnan(y[1, 0, 0, 0]) and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
    moved = ct.to("cpu")
    assert torch.equal(aqcore.decompress(moved).nan_to_num(), y.nan_to_num())


def test_compress_allocated_rejects_bad_input():
    x = relu_batch(rows=2)
    with pytest.raises(ValueError, match="ladder"):
        aqcore.compress_allocated(x, ["aq0.5", "2"], torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="ladder"):
        aqcore.compress_allocated(x, ["32", "2"], torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="zero-keeping"):
        aqcore.compress_allocated(x, ["2", "aq0.5z"], torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="weights"):
        aqcore.compress_allocated(x, LADDER, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="non-empty floating"):
        aqcore.compress_allocated(torch.ones(2, 3, dtype=torch.int64), LADDER, torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="unknown precision"):
        aqcore.compress_allocated(x, ["3"], torch.ones(2), 1.0)


def test_reference_search_is_deterministic():
    rng = np.random.default_rng(0)
    weighted, costs = instance(rng, 100, 7)
    first = reference_allocate_rows(weighted, costs, int(costs.float().mean() * 100))
    assert torch.equal(first, reference_allocate_rows(weighted, costs, int(costs.float().mean() * 100)))


def test_row_budget_counts_like_the_fixed_levels():
    ladder = [aqcore.parse_level(name) for name in LADDER]
    for bits, level in [(8, "8"), (2, "2"), (1, "1"), (0.5, "aq0.5")]:
        assert row_budget(ladder, 4096, 256, bits) == slot_bytes(aqcore.parse_level(level), 4096, 256)[1]
    assert row_budget(ladder, 4096, 256, 100) == slot_bytes(ladder[0], 4096, 256)[1]
    between = row_budget(ladder, 4096, 256, 1.5)
    assert slot_bytes(ladder[3], 4096, 256)[1] < between < slot_bytes(ladder[2], 4096, 256)[1]
    # a 64-value row: aq1 pads to a whole group, as dear as 2 bits; 1 bit affords both 1-bit levels
    assert row_budget(ladder, 64, 256, 1) == slot_bytes(ladder[4], 64, 256)[1] == 80
