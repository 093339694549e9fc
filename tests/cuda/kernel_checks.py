"""Shared checks for the CUDA kernel tests: the reference on the CPU is the specification."""
from __future__ import annotations

import torch

from aqcore import kernels, reference
from aqcore.levels import Level


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two float tensors, any NaN matching any NaN."""
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a[~nan_a].view(ints), b[~nan_b].view(ints))


def compress_both(rows: torch.Tensor, levels: list[Level], seed: int, group_size: int):
    """(CUDA payload, meta) and (CPU reference payload, meta) of the same rows."""
    cuda = kernels.compress_rows(rows.cuda(), levels, seed, group_size)
    cpu = reference.compress_rows(rows.cpu(), levels, seed, group_size)
    return cuda, cpu


def assert_exact(rows: torch.Tensor, levels: list[Level], seed: int = 0, group_size: int = 256):
    """Kernel bytes == reference bytes; both decompressions agree bit for bit, crosswise."""
    (payload, meta), (ref_payload, ref_meta) = compress_both(rows, levels, seed, group_size)
    assert torch.equal(payload.cpu(), ref_payload), "payload bytes differ from the reference"
    assert same_bits(meta, ref_meta), "metadata differs from the reference"
    expected = torch.empty(rows.shape, dtype=rows.dtype)
    reference.decompress_rows(ref_payload, ref_meta, levels, group_size, expected)
    out = torch.empty(rows.shape, dtype=rows.dtype, device="cuda")
    kernels.decompress_rows(ref_payload.cuda(), ref_meta.cuda(), levels, group_size, out)
    assert same_bits(out, expected), "CUDA decompression of reference bytes differs"
    on_cpu = torch.empty(rows.shape, dtype=rows.dtype)
    reference.decompress_rows(payload.cpu(), meta.cpu(), levels, group_size, on_cpu)
    assert same_bits(on_cpu, expected), "CPU decompression of CUDA bytes differs"
