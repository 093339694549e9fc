"""The CUDA kernels reproduce the reference implementation byte for byte (format.py)."""
import random
import zlib

import pytest
import torch

import aqcore
from aqcore import kernels, reference
from aqcore.levels import LEVELS, QUANTIZED_LEVELS
from kernel_checks import assert_exact, same_bits

pytestmark = pytest.mark.cuda

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LEVEL_NAMES = [level.name for level in QUANTIZED_LEVELS]


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert kernels.available(), "the CUDA kernels must build on a GPU machine"


def special(kind: str, shape, generator) -> torch.Tensor:
    """Inputs that exercise every branch of the format: zeros, constants, non-finite..."""
    x = torch.randn(shape, generator=generator)
    n = x.shape[-1]
    if kind == "relu":
        x = x.clamp_min(0)
    elif kind == "sparse_relu":
        x = torch.where(torch.rand(shape, generator=generator) < 0.9, 0.0, x.abs())
    elif kind == "zeros":
        x = torch.zeros(shape)
    elif kind == "signed_zeros":
        x = torch.where(torch.rand(shape, generator=generator) < 0.5, -0.0, 0.0)
    elif kind == "constant":
        x = torch.full(shape, 3.25)
    elif kind == "nan":
        x.view(-1)[::97] = float("nan")
    elif kind == "inf":
        x.view(-1)[5::301] = float("inf")
        x.view(-1)[50::401] = -float("inf")
    elif kind == "near_max":
        x = x.clamp(-1, 1) * 3.39e38
    elif kind == "denormal":
        x = x * 1e-44
    elif kind == "wide":
        x = x * torch.logspace(-20, 20, n)
    elif kind == "offset":
        x = x + 1000.0
    elif kind == "two_values":
        x = torch.where(torch.rand(shape, generator=generator) < 0.5, 0.0, 2.0)
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", LEVEL_NAMES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (1, 255), (1, 256), (1, 2049), (2, 2048),
                                   (3, 777), (1, 100_000), (5, 4100)])
def test_random_rows(dtype, level, shape):
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, level, shape)).encode()))
    x = torch.randn(shape, generator=g).to(dtype)
    assert_exact(x, [LEVELS[level]] * shape[0], seed=random.Random(str(shape)).randrange(2**64))


KINDS = ["relu", "sparse_relu", "zeros", "signed_zeros", "constant", "nan", "inf", "near_max",
         "denormal", "wide", "offset", "two_values"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_special_values_every_level(dtype, kind):
    g = torch.Generator().manual_seed(KINDS.index(kind))
    x = special(kind, (3, 2500), g).to(dtype)
    for level in LEVEL_NAMES:
        assert_exact(x, [LEVELS[level]] * 3, seed=11)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row_numel", [1, 3, 31, 257, 1000, 2048, 2049, 4100, 65_537])
def test_mixed_levels_per_row_in_one_launch(dtype, row_numel):
    rng = random.Random(row_numel)
    rows = 6
    levels = [LEVELS[rng.choice(LEVEL_NAMES)] for _ in range(rows)]
    g = torch.Generator().manual_seed(row_numel)
    for kind in ("randn", "relu", "nan"):
        x = torch.randn(rows, row_numel, generator=g) if kind == "randn" else special(
            kind, (rows, row_numel), g)
        assert_exact(x.to(dtype), levels, seed=rng.randrange(2**64))


@pytest.mark.parametrize("group_size", [32, 96, 128, 512, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_other_group_sizes(group_size, dtype):
    g = torch.Generator().manual_seed(group_size)
    for level in LEVEL_NAMES:
        for kind in ("randn", "relu", "constant", "nan"):
            x = torch.randn(3, 1500, generator=g) if kind == "randn" else special(kind, (3, 1500), g)
            assert_exact(x.to(dtype), [LEVELS[level]] * 3, seed=7, group_size=group_size)
    mixed = [LEVELS[LEVEL_NAMES[i % 7]] for i in range(5)]
    assert_exact(torch.randn(5, 1111, generator=g).to(dtype), mixed, seed=3, group_size=group_size)


def test_misaligned_row_starts_and_storage_offsets():
    g = torch.Generator().manual_seed(5)
    for level in LEVEL_NAMES:
        assert_exact(torch.randn(9, 333, generator=g), [LEVELS[level]] * 9, seed=2)
        base = torch.randn(4 * 1000 + 1, generator=g).cuda()
        rows = base[1:].view(4, 1000)  # data pointer 4 bytes past an allocation
        payload, meta = kernels.compress_rows(rows, [LEVELS[level]] * 4, 5, 256)
        ref = reference.compress_rows(rows.cpu(), [LEVELS[level]] * 4, 5, 256)
        assert torch.equal(payload.cpu(), ref[0]) and same_bits(meta, ref[1])
        out_base = torch.empty(4 * 1000 + 1, device="cuda")
        out = out_base[1:].view(4, 1000)
        kernels.decompress_rows(payload, meta, [LEVELS[level]] * 4, 256, out)
        expected = torch.empty(4, 1000)
        reference.decompress_rows(ref[0], ref[1], [LEVELS[level]] * 4, 256, expected)
        assert same_bits(out, expected)


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**63 + 11, 2**64 - 1])
def test_seeds_across_the_64_bit_range(seed):
    x = torch.randn(2, 3000, generator=torch.Generator().manual_seed(seed % 1000))
    for level in ("1", "4", "aq0.5"):
        assert_exact(x, [LEVELS[level]] * 2, seed=seed)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "expanded"])
def test_public_api_matches_cpu_for_strided_inputs(layout):
    g = torch.Generator().manual_seed(1)
    if layout == "channels_last":
        x = torch.randn(4, 6, 9, 7, generator=g).to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = torch.randn(40, 50, generator=g).t()
    elif layout == "sliced":
        x = torch.randn(8, 300, generator=g)[:, 7:250:2]
    else:
        x = torch.randn(1, 500, generator=g).expand(4, 500)
    per_row = [LEVEL_NAMES[r % len(LEVEL_NAMES)] for r in range(x.shape[0])]
    for level in ("2", "aq0.25", per_row):
        on_gpu = aqcore.compress(x.cuda(), level, seed=9)
        on_cpu = aqcore.compress(x, level, seed=9)
        assert on_gpu.perm == on_cpu.perm and on_gpu.levels == on_cpu.levels
        assert torch.equal(on_gpu.payload.cpu(), on_cpu.payload)
        assert same_bits(on_gpu.meta, on_cpu.meta)
        y_gpu, y_cpu = aqcore.decompress(on_gpu), aqcore.decompress(on_cpu)
        assert y_gpu.is_cuda and y_gpu.stride() == y_cpu.stride()
        assert same_bits(y_gpu, y_cpu)
        assert same_bits(aqcore.decompress(on_gpu.to("cpu")), y_cpu)
        assert same_bits(aqcore.decompress(on_cpu.to("cuda")), y_cpu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decompress_into_caller_buffer(dtype):
    x = torch.randn(3, 5000, device="cuda").to(dtype)
    for level in ("4", "aq1"):
        ct = aqcore.compress(x, level, seed=4)
        out = torch.full_like(x, float("nan"))
        result = aqcore.decompress(ct, out=out)
        assert result.data_ptr() == out.data_ptr()
        assert same_bits(out, aqcore.decompress(ct.to("cpu")))


def test_non_contiguous_out_rows():
    x = torch.randn(4, 1000, device="cuda")
    payload, meta = kernels.compress_rows(x, [LEVELS["2"]] * 4, 1, 256)
    wide = torch.full((4, 2000), float("nan"), device="cuda")
    out = wide[:, ::2]
    kernels.decompress_rows(payload, meta, [LEVELS["2"]] * 4, 256, out)
    expected = torch.empty(4, 1000, device="cuda")
    kernels.decompress_rows(payload, meta, [LEVELS["2"]] * 4, 256, expected)
    assert same_bits(out, expected) and torch.isnan(wide[:, 1::2]).all()


def test_every_output_element_is_written():
    x = torch.randn(7, 3001, device="cuda")
    for level in LEVEL_NAMES:
        ct = aqcore.compress(x, [level] * 7, seed=1)
        out = torch.full_like(x, float("nan"))
        aqcore.decompress(ct, out=out)
        assert not torch.isnan(out).any()


def test_kernels_run_on_the_current_stream():
    x = torch.randn(1 << 20, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ct = aqcore.compress(x, "2", seed=3)
        y = aqcore.decompress(ct)
    torch.cuda.current_stream().wait_stream(stream)
    expected = aqcore.decompress(aqcore.compress(x.cpu(), "2", seed=3))
    assert same_bits(y, expected)
