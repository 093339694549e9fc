import hashlib
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import aqcore
from aqcore import reference
from aqcore.format import KIND_BITS, KIND_CODES, KIND_RAW

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANTIZED = [level.name for level in aqcore.QUANTIZED_LEVELS]
PLAIN = ["8", "4", "2", "1"]
AQ = ["aq1", "aq0.5", "aq0.25"]
ZERO_AQ = ["aq1z", "aq0.5z", "aq0.25z"]


def group_step(ct):
    """Per-element grid step of a one-row compressed tensor (plain levels)."""
    level = ct.levels[0]
    meta = ct.meta.float()
    span = (meta[:, 0] - meta[:, 1]).abs()
    levels = level.max_code - (meta[:, 0] >= meta[:, 1]).float()
    step = torch.where(levels > 0, span / levels.clamp_min(1), 0.0)
    index = torch.arange(ct.shape.numel()) // level.avg // ct.group_size
    return step[index].view(ct.shape)


def group_average(x, k):
    flat = x.reshape(1, -1).float()
    return reference.average_runs(flat, k).repeat_interleave(k, 1)[:, : flat.shape[1]].view(x.shape)


def nonzero_average(x, k):
    """The zero-keeping AQ model: zeros stay 0, a nonzero becomes its run's nonzero mean."""
    flat = x.reshape(-1).float()
    runs = torch.nn.functional.pad(flat, (0, -flat.numel() % k)).view(-1, k)
    means = runs.sum(1) / (runs != 0).sum(1).clamp_min(1)
    return torch.where(flat != 0, means.repeat_interleave(k)[: flat.numel()], 0.0).view(x.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", list(aqcore.LEVELS))
@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 33, 3), (2, 3, 300)])
def test_round_trip_keeps_shape_dtype_and_error_bound(level, dtype, shape):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    ct = aqcore.compress(x, level, seed=3)
    y = aqcore.decompress(ct)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    if level == "32" or (level == "16" and dtype != torch.float32):
        assert torch.equal(y, x)
    elif level == "16":
        assert torch.equal(y, x.to(torch.bfloat16).float())
    elif level in PLAIN:
        ulp = x.float().abs() * 2 ** -7 if dtype != torch.float32 else 0
        assert ((y.float() - x.float()).abs() <= group_step(ct) * (1 + 1e-6) + ulp).all()
    else:
        average = nonzero_average if level in ZERO_AQ else group_average
        target = average(x, ct.levels[0].avg)
        ulp = target.abs() * 2 ** -7 if dtype != torch.float32 else 0
        assert ((y.float() - target).abs() <= group_step(ct) * (1 + 1e-6) + ulp).all()


@pytest.mark.parametrize("level", PLAIN)
def test_plain_levels_are_unbiased(level):
    torch.manual_seed(0)
    x = torch.randn(4, 1000)
    seeds = 400
    mean = sum(aqcore.decompress(aqcore.compress(x, level, seed=s)) for s in range(seeds)) / seeds
    step = group_step(aqcore.compress(x, level))
    # the mean of n draws of a rounding with spread <= step has std <= step / (2 sqrt(n))
    z = (mean - x).abs() / (step / (2 * math.sqrt(seeds)))
    assert z.max() < 6
    assert (mean - x).abs().mean() < 0.1 * step.mean()


@pytest.mark.parametrize("level", AQ)
def test_aq_equals_group_average_model_in_expectation(level):
    torch.manual_seed(1)
    x = torch.randn(3, 37, 11)
    k = aqcore.parse_level(level).avg
    seeds = 400
    mean = sum(aqcore.decompress(aqcore.compress(x, level, seed=s)) for s in range(seeds)) / seeds
    target = group_average(x, k)
    step = group_step(aqcore.compress(x, level))
    assert ((mean - target).abs() / (step / (2 * math.sqrt(seeds)))).max() < 6
    # and the average model is not the identity: it really averages
    assert (target - x).abs().mean() > 0.3


def test_short_last_run_averages_what_it_has():
    x = torch.tensor([1.0, 3.0, 5.0, 7.0, 10.0, 20.0])
    means = reference.average_runs(x.view(1, -1), 4)
    assert means.tolist() == [[4.0, 15.0]]


@pytest.mark.parametrize("level", ["8", "4", "2", "aq1", "aq0.5"])
def test_exact_zeros_stay_exact(level):
    torch.manual_seed(2)
    x = torch.relu(torch.randn(5, 700))
    if aqcore.parse_level(level).avg > 1:
        x = x.view(5, -1, 1).repeat(1, 1, aqcore.parse_level(level).avg).view(5, -1)
    for seed in range(20):
        y = aqcore.decompress(aqcore.compress(x, level, seed=seed))
        assert torch.equal(y == 0, x == 0)
        assert (y >= 0).all()


@pytest.mark.parametrize("level", ZERO_AQ)
def test_zero_keeping_aq_keeps_the_zero_pattern_and_averages_the_nonzeros(level):
    """A ReLU output at a zero-keeping AQ level: every zero decompresses to exactly 0 and
    every positive stays positive (so ReLU's backward mask is exact), and in expectation a
    nonzero value becomes the mean of the nonzeros of its run (plain AQ would spread the
    run's mean over its zeros: most of them turn positive)."""
    torch.manual_seed(3)
    x = torch.relu(torch.randn(6, 333))
    k = aqcore.parse_level(level).avg
    seeds = 300
    total = torch.zeros_like(x)
    for seed in range(seeds):
        y = aqcore.decompress(aqcore.compress(x, level, seed=seed))
        assert torch.equal(y == 0, x == 0) and (y >= 0).all()
        total += y
    step = group_step(aqcore.compress(x, level))
    target = nonzero_average(x, k)
    z = (total / seeds - target).abs() / (step / (2 * math.sqrt(seeds)))
    assert z[x != 0].max() < 6
    plain = aqcore.decompress(aqcore.compress(x, level[:-1]))
    assert ((plain > 0) != (x > 0)).float().mean() > 0.2


def test_zero_keeping_aq_carries_non_finite_values():
    """A NaN makes its group of codes (here one row: 1024 values, 256 averages) NaN, as at
    every level; the zeros of that group stay exact zeros, other groups stay finite."""
    x = torch.relu(torch.randn(4, 1024))
    x[1, 7] = float("nan")
    y = aqcore.decompress(aqcore.compress(x, "aq0.5z"))
    assert torch.isnan(y[1][x[1] != 0]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    assert torch.equal(y == 0, x == 0)


def test_relu_mask_gradient_converges_with_zeros_kept():
    """A ReLU+BN CNN whose ReLU backward reads its saved output: with exact zeros kept,
    the mean of compressed gradients converges to the exact gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))

    def grad(seed=None):
        model.zero_grad()
        counter = iter(range(10**6))
        pack = (lambda t: t) if seed is None else (
            lambda t: aqcore.compress(t, "2", seed=seed * 1000 + next(counter))
            if t.is_floating_point() and t.dim() >= 2 else t)
        unpack = (lambda t: t) if seed is None else (
            lambda t: aqcore.decompress(t) if isinstance(t, aqcore.CompressedTensor) else t)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        return model[0].weight.grad.clone()

    exact = grad()
    total, errors = 0, {}
    for n in range(1, 161):
        total = total + grad(n)
        if n in (10, 160):
            errors[n] = ((total / n - exact).norm() / exact.norm()).item()
    # unbiased: the error of the mean keeps falling like 1/sqrt(n) (1/4 from 10 to 160)
    assert errors[160] < 0.4 * errors[10]
    assert errors[160] < 0.15


def test_nbytes_counts_payload_and_metadata():
    x = torch.randn(64, 4096)
    for name, level in aqcore.LEVELS.items():
        ct = aqcore.compress(x, name)
        if level.is_raw:
            assert ct.nbytes == x.numel() * level.bits // 8
            continue
        codes = x.numel() / level.avg
        expected = codes * level.bits / 8 + math.ceil(codes / 256) * 4
        expected += x.numel() / 8 if level.zeros else 0  # the mask
        assert abs(ct.nbytes - expected) <= 0.02 * expected


def test_bytes_per_value_at_group_size_256():
    x = torch.randn(1 << 20)
    per_value = {name: aqcore.compress(x, name).nbytes * 8 / x.numel()
                 for name in QUANTIZED + ZERO_AQ}
    assert per_value == pytest.approx({"8": 8.125, "4": 4.125, "2": 2.125, "1": 1.125,
                                       "aq1": 1.0625, "aq0.5": 0.53125, "aq0.25": 0.265625,
                                       "aq1z": 2.0625, "aq0.5z": 1.53125, "aq0.25z": 1.265625})


def test_format_is_deterministic_per_seed():
    x = torch.randn(3, 1000)
    a, b, c = (aqcore.compress(x, "2", seed=s) for s in (5, 5, 6))
    assert torch.equal(a.payload, b.payload) and torch.equal(a.meta, b.meta)
    assert not torch.equal(a.payload, c.payload)


def test_format_bytes_are_pinned():
    # Changing these bytes breaks compatibility with the CUDA kernels and saved data.
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 300, generator=g)
    digest = hashlib.sha256()
    for level in QUANTIZED:
        ct = aqcore.compress(x, level, seed=11)
        digest.update(ct.payload.numpy().tobytes())
        digest.update(ct.meta.view(torch.int16).numpy().tobytes())
    mixed = aqcore.compress(x, ["aq0.5", "4"], seed=11)
    digest.update(mixed.payload.numpy().tobytes())
    assert digest.hexdigest()[:16] == PINNED_DIGEST


PINNED_DIGEST = "74e799a77dfb00c2"


def test_metadata_is_the_range_rounded_outward():
    x = torch.tensor([[1000.1, 1000.3, 999.9, 1000.0]])
    ct = aqcore.compress(x, "8")
    lo, hi = ct.meta.float()[0].tolist()
    assert lo <= 999.9 and hi >= 1000.3
    assert hi - lo <= 8  # one bf16 ulp each side at most
    y = sum(aqcore.decompress(aqcore.compress(x, "8", seed=s)) for s in range(200)) / 200
    assert (y - x).abs().max() < 0.05


def test_bf16_round_outward_brackets():
    x = torch.randn(10000) * torch.logspace(-30, 30, 10000)
    down = reference.bf16_round_outward(x, up=False)
    up = reference.bf16_round_outward(x, up=True)
    assert (down <= x).all() and (up >= x).all()
    assert torch.equal(down.bfloat16().float(), down) and torch.equal(up.bfloat16().float(), up)
    ulps = up.bfloat16().view(torch.int16).int() - down.bfloat16().view(torch.int16).int()
    assert ((up == down) | (ulps.abs() == 1)).all()


@pytest.mark.parametrize("level", QUANTIZED)
def test_non_finite_groups_decompress_non_finite(level):
    x = torch.randn(2, 1024)
    x[0, 5] = float("nan")
    x[1, 700] = float("inf")
    y = aqcore.decompress(aqcore.compress(x, level))
    group = aqcore.parse_level(level).avg * 256
    assert not torch.isfinite(y[0, (5 // group) * group]).item()
    assert not torch.isfinite(y[1, (700 // group) * group]).item()
    assert torch.isfinite(y[0, group * 2:]).all()


def test_constant_groups_are_exact():
    for value in (0.0, -3.0, 2.5):
        x = torch.full((3, 500), value)
        for level in QUANTIZED:
            assert torch.equal(aqcore.decompress(aqcore.compress(x, level)), x)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 6, 5, 7).to(memory_format=torch.channels_last),
    lambda: torch.randn(6, 9).t(),
    lambda: torch.randn(8, 10)[:, ::2],
    lambda: torch.randn(3, 1, 5).expand(3, 4, 5),
    lambda: torch.randn(4, 6, 5, 7, 3).to(memory_format=torch.channels_last_3d),
])
def test_layouts(make):
    x = make()
    y = aqcore.decompress(aqcore.compress(x, "8"))
    assert y.shape == x.shape
    assert (y - x).abs().max() < 0.05
    if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        assert y.stride() == x.stride()


def test_channels_last_is_compressed_in_memory_order():
    x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    ct = aqcore.compress(x, "4", seed=1)
    same = aqcore.compress(x.permute(0, 2, 3, 1).contiguous(), "4", seed=1)
    assert torch.equal(ct.payload, same.payload)


def test_empty_and_tiny():
    for x in (torch.randn(0), torch.randn(3, 0, 2), torch.tensor(2.5), torch.randn(1)):
        for level in ("2", "aq0.5"):
            y = aqcore.decompress(aqcore.compress(x, level))
            assert y.shape == x.shape and y.dtype == x.dtype
    assert aqcore.decompress(aqcore.compress(torch.tensor([2.5]), "1")).item() == 2.5


@pytest.mark.parametrize("x", [
    torch.randint(-5, 5, (3, 4)), torch.randint(0, 255, (10,), dtype=torch.uint8),
    torch.randn(3, 2, dtype=torch.complex64), torch.randn(4, 4).to_sparse(),
    torch.randn(5, dtype=torch.float64),
])
def test_other_tensors_are_held_losslessly(x):
    ct = aqcore.compress(x, "2")
    assert ct.kind == KIND_RAW
    y = aqcore.decompress(ct)
    assert y.dtype == x.dtype and torch.equal(y.to_dense() if y.is_sparse else y,
                                              x.to_dense() if x.is_sparse else x)


def test_masks_pack_at_one_bit():
    mask = torch.rand(3, 1001) > 0.3
    ct = aqcore.compress(mask, "8")
    assert ct.kind == KIND_BITS and ct.nbytes == math.ceil(mask.numel() / 8)
    assert torch.equal(aqcore.decompress(ct), mask)
    byte_mask = mask.to(torch.uint8)
    ct = aqcore.pack_mask(byte_mask)
    assert torch.equal(aqcore.decompress(ct), byte_mask)
    with pytest.raises(TypeError, match="bool or uint8"):
        aqcore.pack_mask(torch.randn(3))


def test_masks_pack_in_memory_order_and_unpack_in_the_same_layout():
    """A channels_last ReLU mask packs without a transposing copy and unpacks channels_last
    (an NCHW mask there made every ReLU, batch norm and conv backward copy their gradients)."""
    mask = torch.rand(4, 5, 6, 7) > 0.5
    last = mask.contiguous(memory_format=torch.channels_last)
    ct = aqcore.pack_mask(last)
    assert torch.equal(ct.payload, aqcore.pack_mask(last.permute(0, 2, 3, 1).contiguous()).payload)
    back = aqcore.decompress(ct)
    assert torch.equal(back, mask) and back.stride() == last.stride()
    out = torch.empty_like(mask)
    assert torch.equal(aqcore.decompress(ct, out=out), mask) and out.is_contiguous()
    sliced = mask[:, 1:]  # not dense: packed from a contiguous copy
    assert torch.equal(aqcore.decompress(aqcore.pack_mask(sliced)), sliced)


def test_mixed_rows_follow_their_levels():
    torch.manual_seed(3)
    x = torch.randn(4, 3, 50)
    levels = ["aq0.5", "8", "aq1", "2"]
    ct = aqcore.compress(x, levels, seed=2)
    assert ct.kind == KIND_CODES and ct.levels == tuple(map(aqcore.parse_level, levels))
    seeds = 300
    mean = sum(aqcore.decompress(aqcore.compress(x, levels, seed=s)) for s in range(seeds)) / seeds
    for row, level in enumerate(levels):
        k = aqcore.parse_level(level).avg
        target = group_average(x[row], k) if k > 1 else x[row]
        step = (target.max() - target.min()) / aqcore.parse_level(level).max_code
        assert (mean[row] - target).abs().max() < 6 * step / (2 * seeds ** 0.5), level
    alone = aqcore.compress(x[1:2], ["8"], seed=0)
    assert alone.nbytes < ct.nbytes


def test_mixed_rows_nbytes():
    x = torch.randn(8, 4096)
    levels = ["8", "aq0.25"] * 4
    ct = aqcore.compress(x, levels)
    expected = 4 * (4096 + 16 * 4) + 4 * (4096 * 0.25 / 8 + 2 * 4)
    assert abs(ct.nbytes - expected) <= 0.02 * expected


def test_bad_arguments_are_clear():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="unknown precision level"):
        aqcore.compress(x, "3")
    with pytest.raises(ValueError, match="one level per row"):
        aqcore.compress(x, ["2", "4"])
    with pytest.raises(ValueError, match="quantized levels"):
        aqcore.compress(x, ["2", "32", "2", "2"])
    with pytest.raises(ValueError, match="zero-keeping levels store whole tensors"):
        aqcore.compress(x, ["2", "aq1z", "2", "2"])
    with pytest.raises(ValueError, match="multiple of 32"):
        aqcore.compress(x, "2", group_size=100)


@pytest.mark.parametrize("call, named", [
    (lambda: aqcore.compress([1.0, 2.0], "2"), "compress takes a torch.Tensor as x"),
    (lambda: aqcore.compress(torch.ones(3), "2", seed=0.5), "integer seed"),
    (lambda: aqcore.decompress(torch.ones(3)), "CompressedTensor"),
    (lambda: aqcore.decompress(aqcore.compress(torch.ones(3), "2"), out=[0.0] * 3), "as out"),
    (lambda: aqcore.pack_mask([True, False]), "pack_mask takes a torch.Tensor"),
    (lambda: aqcore.level_errors([[1.0, 2.0]]), "level_errors takes a torch.Tensor"),
    (lambda: aqcore.level_errors(torch.ones(2, 3, dtype=torch.int64)), "floating rows"),
    (lambda: aqcore.sample_rows([[1.0]]), "sample_rows takes a torch.Tensor"),
    (lambda: aqcore.compress_allocated([[1.0]], ["2"], torch.ones(1), 2.0), "as x"),
    (lambda: aqcore.compress_allocated(torch.ones(2, 3), "2", torch.ones(2), 2.0), "a ladder"),
    (lambda: aqcore.compress_allocated(torch.ones(2, 3), ["2"], [1, 1], 2.0), "as weights"),
    (lambda: aqcore.compress_allocated(torch.ones(2, 3), ["2"], torch.ones(2), "2"), "bits"),
    (lambda: aqcore.allocate_rows([[0.0]], torch.zeros(1, dtype=torch.int64), 1), "torch tensors"),
])
def test_wrong_argument_types_raise_a_type_error_naming_what_is_taken(call, named):
    with pytest.raises(TypeError, match=named):
        call()


def test_level_errors_names_the_shape_it_takes():
    with pytest.raises(ValueError, match="2-D rows"):
        aqcore.level_errors(torch.ones(3))


def test_decompress_into_out():
    x = torch.randn(5, 300)
    ct = aqcore.compress(x, "4", seed=1)
    out = torch.empty_like(x)
    assert aqcore.decompress(ct, out=out) is out
    assert torch.equal(out, aqcore.decompress(ct))
    with pytest.raises(ValueError, match="out must be"):
        aqcore.decompress(ct, out=torch.empty(3))


def test_to_device_round_trip():
    x = torch.randn(3, 100)
    ct = aqcore.compress(x, "aq0.5")
    moved = ct.to("cpu")
    assert torch.equal(aqcore.decompress(moved), aqcore.decompress(ct))


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       level=st.sampled_from(QUANTIZED), dtype=st.sampled_from(DTYPES),
       group_size=st.sampled_from([32, 64, 256]), seed=st.integers(0, 2**64 - 1))
def test_any_shape_round_trips(shape, level, dtype, group_size, seed):
    x = torch.randn(shape).to(dtype)
    ct = aqcore.compress(x, level, seed=seed, group_size=group_size)
    y = aqcore.decompress(ct)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert y.float().min() >= x.float().min() - 0.05 * (1 + x.float().abs().max())
    assert y.float().max() <= x.float().max() + 0.05 * (1 + x.float().abs().max())
