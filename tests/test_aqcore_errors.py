import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import aqcore
from aqcore.levels import Level

LEVEL_NAMES = [level.name for level in aqcore.ERROR_LEVELS]


def measured_error(x, level, seeds=30):
    runs = [(aqcore.decompress(aqcore.compress(x, level, seed=s)) - x).square().sum(1)
            for s in range(seeds)]
    return torch.stack(runs).mean(0)


@pytest.mark.parametrize("kind", ["noise", "smooth", "relu"])
def test_level_errors_predict_measured_error(kind):
    torch.manual_seed(0)
    x = torch.randn(3, 4096)
    if kind == "smooth":
        x = x.cumsum(1) / 20
    if kind == "relu":
        x = torch.relu(x)
    predicted = aqcore.level_errors(x)
    for i, level in enumerate(aqcore.ERROR_LEVELS):
        ratio = measured_error(x, level) / predicted[:, i]
        # zero-keeping groups (ReLU) round better than the range model assumes
        low = 0.2 if kind == "relu" and level.avg == 1 else 0.7
        assert ((ratio > low) & (ratio < 1.4)).all(), (level, ratio)


def test_zero_keeping_levels_are_priced_on_the_nonzeros():
    """ReLU-like data: the zero-keeping AQ error (the deviation of the nonzeros about their
    own run mean, plus rounding on the nonzeros) predicts the measured error, and lies below
    plain AQ's, whose runs mix zeros and positives: far below for a mostly-zero row."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(3, 4096) + torch.tensor([[0.0], [0.5], [-1.5]]))
    levels = [aqcore.parse_level(n) for n in ("aq1", "aq0.5", "aq0.25", "aq1z", "aq0.5z", "aq0.25z")]
    predicted = aqcore.level_errors(x, levels=levels)
    for i, level in enumerate(levels[3:], start=3):
        ratio = measured_error(x, level) / predicted[:, i]
        assert ((ratio > 0.7) & (ratio < 1.4)).all(), (level, ratio)
        assert (predicted[:, i] < predicted[:, i - 3]).all()
        assert predicted[2, i] < 0.5 * predicted[2, i - 3]


def test_aq_is_priced_from_data():
    torch.manual_seed(0)
    pairs = torch.rand(4096).repeat_interleave(2).view(1, -1)   # averaging pairs is free
    alternating = torch.rand(4096).repeat_interleave(2).view(1, -1) * torch.tensor([1.0, -1.0]).repeat(4096)
    e_pairs, e_alt = aqcore.level_errors(pairs)[0], aqcore.level_errors(alternating)[0]
    names = [level.name for level in aqcore.ERROR_LEVELS]
    one, aq1 = names.index("1"), names.index("aq1")
    # the published allocators price aq1 exactly like 1-bit in both cases
    assert e_pairs[aq1] < 0.3 * e_pairs[one]
    assert e_alt[aq1] / e_alt[one] > 3 * e_pairs[aq1] / e_pairs[one]
    assert (e_pairs[:4].diff() > 0).all()  # fewer bits, more error


def test_level_errors_shapes():
    assert aqcore.level_errors(torch.randn(5, 0)).shape == (5, len(aqcore.ERROR_LEVELS))
    assert aqcore.level_errors(torch.randn(2, 7), group_size=32).shape == (2, 7)


def brute_force_errors(x, group_size, levels):
    """The error model of errors.py spelled out in float64: explicit runs with their
    counts and means, explicit groups with their counts and masked min/max."""
    x = x.double()
    n_rows, n = x.shape
    columns = []
    for level in levels:
        k = level.avg
        codes = math.ceil(n / k)
        runs = torch.zeros(n_rows, codes * k, dtype=torch.float64)
        runs[:, :n] = x
        runs = runs.view(n_rows, codes, k)
        in_row = (torch.arange(codes * k) < n).view(codes, k)
        counts = in_row.sum(-1)                                  # k, or fewer in a short last run
        means = runs.sum(-1) / counts
        deviation = ((runs - means[..., None]).square() * in_row).sum((1, 2))
        stored = means                                           # = x for plain levels
        groups = math.ceil(codes / group_size)
        index = torch.arange(groups * group_size).view(groups, group_size)
        inside = index < codes
        values = stored[:, index.clamp(max=codes - 1)]
        high = torch.where(inside, values, -math.inf).amax(-1)
        low = torch.where(inside, values, math.inf).amin(-1)
        energy = (inside.sum(-1) * (high - low).square()).sum(-1)
        columns.append(deviation + k * energy / (6 * level.max_code ** 2))
    return torch.stack(columns, -1)


def make_rows(kind, n_rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, n, generator=g)
    if kind == "relu":
        return torch.relu(x)
    if kind == "smooth":
        return x.cumsum(1) / 10
    if kind == "constant":
        return torch.full((n_rows, n), 0.3) * torch.arange(1, n_rows + 1)[:, None]
    if kind == "offset":   # a large common offset: sum-of-squares formulas cancel badly
        return 1000 + x.cumsum(1) / 10
    return x


@settings(max_examples=300, deadline=None)
@given(n_rows=st.integers(1, 4),
       n=st.one_of(st.integers(1, 3000), st.sampled_from([1, 2, 7, 8, 9, 255, 256, 257, 2047,
                                                          2048, 2049, 2056])),
       group_size=st.sampled_from([32, 64, 256]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       kind=st.sampled_from(["randn", "relu", "smooth", "constant", "offset"]),
       seed=st.integers(0, 2 ** 16))
def test_level_errors_match_brute_force(n_rows, n, group_size, dtype, kind, seed):
    x = make_rows(kind, n_rows, n, seed).to(dtype)
    found = aqcore.level_errors(x, group_size)
    assert found.dtype == torch.float32 and found.shape == (n_rows, len(LEVEL_NAMES))
    expected = brute_force_errors(x, group_size, aqcore.ERROR_LEVELS)
    # float32 run means are rounded (about eps * max|x| each), which moves D by about
    # 2 * eps * max|x| * sum |x - mean| <= 2 * eps * max|x| * sqrt(n * D) per averaging
    # step: slack that only matters for a large common offset (short rows of "offset")
    rounding = torch.finfo(torch.float32).eps * x.double().abs().amax(1, keepdim=True)
    slack = 16 * rounding * (n * expected).sqrt()
    error = (found.double() - expected).abs()
    assert (error <= 1e-4 * expected + slack + 1e-9).all(), (found, expected)


def test_large_offset_does_not_cancel():
    """Deviations come from differences, so 1000 + small smooth noise keeps its precision
    in float32, where sum x^2 - k * sum mean^2 loses all of it."""
    torch.manual_seed(0)
    x = 1000 + torch.randn(2, 8192).cumsum(1) / 100
    found = aqcore.level_errors(x, 256)
    expected = brute_force_errors(x, 256, aqcore.ERROR_LEVELS)
    torch.testing.assert_close(found.double(), expected, rtol=1e-4, atol=0)
    runs = x.view(2, -1, 8)
    naive = x.square().sum(1) - 8 * runs.mean(-1).square().sum(1)
    exact = (runs.double() - runs.double().mean(-1, keepdim=True)).square().sum((1, 2))
    assert ((naive.double() - exact).abs() > 0.5 * exact).all()  # off by 50% or more


@settings(max_examples=40, deadline=None)
@given(picks=st.lists(st.sampled_from(LEVEL_NAMES), min_size=1, max_size=9),
       n=st.sampled_from([1, 5, 300, 1029, 4096]),
       group_size=st.sampled_from([32, 256]))
def test_any_level_subset_gives_the_full_columns(picks, n, group_size):
    x = make_rows("randn", 3, n, n)
    full = aqcore.level_errors(x, group_size)
    some = aqcore.level_errors(x, group_size, tuple(aqcore.parse_level(p) for p in picks))
    torch.testing.assert_close(some, full[:, [LEVEL_NAMES.index(p) for p in picks]],
                               rtol=1e-6, atol=0)


def test_strided_rows_match_contiguous():
    x = torch.randn(3, 5000)
    for view in (x[:, 7:4000], x[:, ::2], x.t()[:900].t()):
        torch.testing.assert_close(aqcore.level_errors(view, 64),
                                   aqcore.level_errors(view.contiguous(), 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 2048), (3, 3001), (2, 1), (5, 777)])
def test_level_errors_run_on_meta_tensors(shape, dtype):
    """Shape-only execution: no .item(), no host sync, no data-dependent shapes."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    for levels in (aqcore.ERROR_LEVELS, aqcore.ERROR_LEVELS[:2], aqcore.ERROR_LEVELS[-1:]):
        out = aqcore.level_errors(x, 256, levels)
        assert out.device.type == "meta" and out.dtype == torch.float32
        assert out.shape == (shape[0], len(levels))


def test_non_power_of_two_runs_are_refused():
    with pytest.raises(ValueError):
        aqcore.level_errors(torch.randn(2, 30), 32, (Level("aq3", 2, 3),))
