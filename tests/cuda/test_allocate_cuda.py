"""The allocation kernel reproduces aqcore/allocate.py's reference, and the allocated path
runs without a single host synchronization."""
import numpy as np
import pytest
import torch

import aqcore
from aqcore import kernels
from aqcore.allocate import reference_allocate_rows, reference_row_table
from aqcore.format import row_budget, slot_bytes

pytestmark = pytest.mark.cuda

LADDER = ("8", "4", "2", "1", "aq1", "aq0.5", "aq0.25")


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert kernels.available(), "the CUDA kernels must build on a GPU machine"


def instance(rng, rows, levels, ties, per_row):
    steps = rng.random((1 if ties else rows, levels)) * 4 + 0.1
    weighted = np.cumsum(steps, 1) * (1 if ties else rng.lognormal(0, 3, (rows, 1)))
    weighted = np.ascontiguousarray(np.broadcast_to(weighted, (rows, levels)))
    costs = np.sort(rng.choice(np.arange(1, 5000), levels, replace=False))[::-1].copy()
    if per_row:
        costs = costs[None, :] * rng.integers(1, 5, (rows, 1))
    return torch.tensor(weighted, dtype=torch.float32), torch.tensor(costs)


@pytest.mark.parametrize("rows", [1, 2, 31, 128, 1023, 1024, 1025, 5000])
@pytest.mark.parametrize("levels", [1, 3, 7, 8])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_kernel_allocation_matches_reference(rows, levels, ties, per_row):
    rng = np.random.default_rng(rows * 31 + levels)
    weighted, costs = instance(rng, rows, levels, ties, per_row)
    full = costs.expand(rows, -1) if costs.dim() == 1 else costs
    low, high = int(full.min(1).values.sum()), int(full.max(1).values.sum())
    for fraction in (0.0, 0.13, 0.5, 0.97, 1.0, 1.5):
        budget = int(low + fraction * (high - low))
        expected = reference_allocate_rows(weighted, costs, budget)
        got = kernels.allocate_rows(weighted.cuda(), costs.cuda(), budget)
        assert torch.equal(got.cpu(), expected), (fraction, (got.cpu() != expected).sum())


@pytest.mark.parametrize("rows", [1, 7, 128, 2000])
def test_kernel_table_matches_reference(rows):
    rng = np.random.default_rng(rows)
    weighted, _ = instance(rng, rows, len(LADDER), False, False)
    levels = [aqcore.parse_level(name) for name in LADDER]
    slots = [slot_bytes(level, 4096, 256) for level in levels]
    codes = [aqcore.QUANTIZED_LEVELS.index(level) for level in levels]
    totals, payloads = [s[1] for s in slots], [s[0] for s in slots]
    budget = int(rows * 4096 * 1.25 / 8)
    choice, table = kernels.allocate_layout(weighted.cuda(), budget, codes, totals, payloads)
    expected = reference_allocate_rows(weighted, torch.tensor(totals), budget)
    assert torch.equal(choice.cpu(), expected)
    assert torch.equal(table.cpu(), reference_row_table(expected, codes, totals, payloads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [0.3, 1.25, 2.5])
def test_compress_allocated_on_cuda_matches_cpu(dtype, bits):
    torch.manual_seed(0)
    x = (torch.relu(torch.randn(64, 16, 14, 14)) * torch.rand(64, 1, 1, 1)).to(dtype)
    weights = torch.rand(64)
    cpu, cpu_errors = aqcore.compress_allocated(x, LADDER, weights, bits, seed=11)
    errors = cpu_errors.cuda()  # the same prices on both devices: the same allocation
    gpu, _ = aqcore.compress_allocated(x.cuda(), LADDER, weights.cuda(), bits, seed=11, errors=errors)
    assert torch.equal(gpu.table.cpu(), cpu.table)
    assert torch.equal(gpu.payload.cpu(), cpu.payload)
    y = aqcore.decompress(gpu)
    assert torch.equal(y.cpu(), aqcore.decompress(cpu))
    assert torch.equal(aqcore.decompress(gpu.to("cpu")), aqcore.decompress(cpu))


def test_allocated_path_never_synchronizes():
    x = torch.relu(torch.randn(128, 64, 28, 28, device="cuda")).to(memory_format=torch.channels_last)
    weights = torch.rand(128, device="cuda")
    aqcore.compress_allocated(x, LADDER, weights, 1.25)  # warm caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ct, _ = aqcore.compress_allocated(x, LADDER, weights, 1.25)
        y = aqcore.decompress(ct)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.shape == x.shape
    assert ct.payload.numel() <= 128 * row_budget(ct.levels, x[0].numel(), 256, 1.25) + 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_level_errors_on_cuda_come_from_the_fused_pass(dtype):
    torch.manual_seed(0)
    x = (torch.randn(6, 3000) * torch.rand(6, 1) * 4).to(dtype)
    ladder = tuple(aqcore.parse_level(name) for name in LADDER[2:])
    found = aqcore.level_errors(x.cuda(), 256, ladder)
    expected = aqcore.level_errors(x, 256, ladder)
    assert found.device.type == "cuda" and found.shape == (6, len(ladder))
    torch.testing.assert_close(found.cpu(), expected, rtol=2e-3, atol=1e-4)
