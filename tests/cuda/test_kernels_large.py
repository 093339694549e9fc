"""Sizes past 2^31 bytes and 2^33 values: 64-bit indexing and the per-2^32-pair noise keys."""
import pytest
import torch

from aqcore import kernels, noise, reference
from aqcore.format import groups_per_row, row_layout
from aqcore.levels import LEVELS
from kernel_checks import same_bits

pytestmark = pytest.mark.cuda

GIB = 1 << 30


def free_memory() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


def expected_group(rows, row, group, level, seed, group_size=256):
    """Payload bytes, meta and values of one group, re-derived from reference pieces with the
    group's absolute noise indices (the full reference would need ~20x the tensor in memory)."""
    n_rows, row_numel = rows.shape
    first = group * group_size * level.avg
    values = rows[row, first:first + group_size * level.avg].float().cpu().unsqueeze(0)
    if level.avg > 1:
        values = reference.average_runs(values, level.avg)
    codes_count = values.shape[1]
    values = reference._pad_groups(values, group_size)
    meta = reference.group_meta(values, level.bits)
    index = row * row_numel + group * group_size + torch.arange(group_size)
    u = noise.uniform(seed, index, n_rows * row_numel).view(values.shape)
    codes = reference.quantize_groups(values, meta, level.bits, u).view(1, -1)
    codes[:, codes_count:] = 0
    decoded = reference.dequantize_groups(codes.view(values.shape), meta, level.bits)
    return reference.pack_codes(codes, level.bits)[0], meta.view(2).bfloat16(), decoded.view(-1)


def check_groups(rows, level, seed, groups):
    n_rows, row_numel = rows.shape
    levels = [level] * n_rows
    payload, meta = kernels.compress_rows(rows, levels, seed, 256)
    out = torch.empty_like(rows)
    kernels.decompress_rows(payload, meta, levels, 256, out)
    layout = row_layout(levels, row_numel, 256)
    group_bytes = 256 * level.bits // 8
    for row, group in groups:
        packed, group_meta, decoded = expected_group(rows, row, group, level, seed)
        start = layout.byte_offsets[row] + group * group_bytes
        assert torch.equal(payload[start:start + group_bytes].cpu(), packed), (row, group)
        assert same_bits(meta[layout.group_offsets[row] + group], group_meta), (row, group)
        first = group * 256 * level.avg
        span = min(256 * level.avg, row_numel - first)
        got = out[row, first:first + span]
        want = decoded.repeat_interleave(level.avg)[:span].to(rows.dtype)
        assert same_bits(got, want), (row, group)


@pytest.mark.parametrize("level", ["1", "aq0.25"])
def test_more_than_2_gib_of_float32_matches_the_reference_on_the_gpu(level):
    numel = (1 << 29) + 12345  # 2 GiB + 48 KiB
    if free_memory() < 40 * GIB:
        pytest.skip("needs ~40 GiB of free GPU memory for the reference")
    x = torch.randn(1, numel, device="cuda")
    levels = [LEVELS[level]]
    payload, meta = kernels.compress_rows(x, levels, 17, 256)
    ref_payload, ref_meta = reference.compress_rows(x, levels, 17, 256)
    assert torch.equal(payload, ref_payload) and torch.equal(meta.view(torch.int16),
                                                              ref_meta.view(torch.int16))
    out = torch.empty_like(x)
    kernels.decompress_rows(payload, meta, levels, 256, out)
    expected = torch.empty_like(x)
    reference.decompress_rows(ref_payload, ref_meta, levels, 256, expected)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("level", ["2", "aq1"])
def test_more_than_2_to_the_33_values_use_the_per_block_noise_keys(level):
    row_numel = (1 << 32) + 1000  # two rows: row 1 crosses index 2^33 (pair 2^32) in a group
    if free_memory() < 40 * GIB:
        pytest.skip("needs ~40 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(2, row_numel, device="cuda", dtype=torch.bfloat16, generator=g)
    lvl = LEVELS[level]
    per_row = groups_per_row(lvl, row_numel, 256)
    groups = [(0, 0), (0, per_row - 1), (1, 0), (1, per_row - 1), (1, per_row // 2)]
    crossing = ((1 << 33) - row_numel) // 256  # noise indices are code indices r * F + j
    if crossing < per_row:
        groups += [(1, crossing - 1), (1, crossing), (1, crossing + 1)]
    check_groups(x, lvl, 2**63 + 99, groups)
