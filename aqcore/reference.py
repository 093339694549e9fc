"""Reference implementation of the compressed format: plain, vectorized PyTorch.

This is the specification the CUDA kernels are tested against (format.py describes the
bytes). It runs on any device. Everything is float32 and every operation is rounded on
its own, so a kernel that does the same operations in the same order matches bit for bit.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import noise
from .format import RowLayout, codes_per_row, groups_per_row, row_layout
from .levels import QUANTIZED_LEVELS, Level

_LOW16 = 0xFFFF
_ULP16 = 0x10000


def bf16_round_outward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """Round float32 values to bfloat16, down (up=False) or up; returns float32, no -0."""
    bits = x.view(torch.int32)
    truncated = bits & ~_LOW16  # rounds towards zero
    inexact = truncated != bits
    away = (x > 0) if up else (x < 0)
    rounded = truncated + torch.where(inexact & away, _ULP16, 0).to(torch.int32)
    return rounded.view(torch.float32) + 0.0


def average_runs(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of each run of k consecutive values of each row; a short last run averages
    what it has. Summed left to right, then divided once (the kernels do the same)."""
    n_rows, n = rows.shape
    codes = math.ceil(n / k)
    padded = torch.nn.functional.pad(rows, (0, codes * k - n)).view(n_rows, codes, k)
    total = padded[:, :, 0]
    for j in range(1, k):
        total = total + padded[:, :, j]
    count = torch.full((codes,), float(k), device=rows.device)
    if n % k:
        count[-1] = float(n % k)
    return total / count


def fill_zeros(rows: torch.Tensor, k: int) -> torch.Tensor:
    """(R, F) float32 rows with every zero replaced by the mean of the nonzero values of its
    run of k (a short last run: of the values it has; 0 in a run of zeros). Averaging a run
    of the result gives the mean of its nonzeros: the codes of a zero-keeping AQ level are
    the AQ codes of this tensor (format.py)."""
    n_rows, n = rows.shape
    runs = math.ceil(n / k)
    padded = torch.nn.functional.pad(rows.float(), (0, runs * k - n)).view(n_rows, runs, k)
    nonzero = padded != 0
    total = padded[:, :, 0]
    for j in range(1, k):  # left to right, as average_runs: the same sums on every device
        total = total + padded[:, :, j]
    means = total.unsqueeze(-1) / nonzero.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(nonzero, padded, means).view(n_rows, -1)[:, :n]


def _pad_groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r, n) -> (r, groups, group_size); padding repeats the last group's first value so
    it never changes a group's min/max (its codes are zeroed later)."""
    n_rows, n = values.shape
    groups = math.ceil(n / group_size)
    pad = groups * group_size - n
    if pad:
        filler = values[:, (groups - 1) * group_size].unsqueeze(1).expand(n_rows, pad)
        values = torch.cat([values, filler], dim=1)
    return values.view(n_rows, groups, group_size)


def group_meta(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """(m0, m1) per group as float32 (..., 2) following format.py."""
    finite = torch.isfinite(groups).all(-1)
    low = groups.amin(-1)
    high = groups.amax(-1)
    positive_min = torch.where(groups > 0, groups, torch.inf).amin(-1)
    keep_zero = (low == 0) & (bits >= 2)
    low = torch.where(keep_zero & torch.isfinite(positive_min), positive_min, low)
    lo = bf16_round_outward(low, up=False)
    hi = bf16_round_outward(high, up=True)
    zero_form = keep_zero | (lo == hi)
    m0 = torch.where(zero_form, hi, lo)
    m1 = torch.where(zero_form, lo, hi)
    meta = torch.stack([m0, m1], -1)
    return torch.where(finite.unsqueeze(-1), meta, torch.nan)


def _decode_params(meta: torch.Tensor, bits: int):
    """Per group: zero-keeping flag, base, step, first code of the grid."""
    m0, m1 = meta[..., 0].float(), meta[..., 1].float()
    zero_form = m0 >= m1
    base = torch.where(zero_form, m1, m0)
    span = torch.where(zero_form, m0 - m1, m1 - m0)
    levels = (1 << bits) - 1 - zero_form.to(torch.int32)
    return zero_form, base, span, levels


def quantize_groups(groups: torch.Tensor, meta: torch.Tensor, bits: int,
                    u: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of (r, g, G) float32 values onto their group grid -> int32 codes."""
    zero_form, base, span, levels = (t.unsqueeze(-1) for t in _decode_params(meta, bits))
    levels_f = levels.to(torch.float32)
    # an empty span gets scale 0: every value lands on code 0 (u < 1), as the kernels do
    scale = torch.where(span > 0, levels_f / span, 0.0)
    q = torch.floor((groups - base) * scale + u)
    q = torch.minimum(torch.clamp_min(q, 0.0), levels_f)
    codes = q.to(torch.int32) + zero_form.to(torch.int32)
    exact_zero = (zero_form & (groups == 0)) | torch.isnan(meta[..., :1])
    return codes.masked_fill_(exact_zero, 0)


def dequantize_groups(codes: torch.Tensor, meta: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of quantize_groups: (r, g, G) int codes -> float32 values, by a per-group
    table of the 2**bits code values (the same float32 operations for every code)."""
    zero_form, base, span, levels = (t.unsqueeze(-1) for t in _decode_params(meta, bits))
    step = torch.where(levels > 0, span / levels.clamp_min(1).to(torch.float32), 0.0)
    code = torch.arange(1 << bits, device=codes.device, dtype=torch.int32)
    grid = (code - zero_form.to(torch.int32)).to(torch.float32)
    table = torch.where(zero_form & (code == 0), 0.0, base + grid * step)  # (r, g, 2**bits)
    return table.gather(-1, codes.long())


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(r, m) int codes < 2**bits -> (r, m * bits / 8) uint8, LSB first."""
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    lanes = codes.view(codes.shape[0], -1, per_byte) << shifts
    return lanes.sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(r, nbytes) uint8 -> (r, nbytes * 8 / bits) int32 codes."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.int32)
    lanes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return lanes.view(packed.shape[0], -1)


def _rows_by_level(levels: Sequence[Level]) -> dict[Level, list[int]]:
    by_level: dict[Level, list[int]] = {}
    for row, level in enumerate(levels):
        by_level.setdefault(level, []).append(row)
    return by_level


def _row_spans(offsets: Sequence[int], rows: list[int], width: int, device) -> torch.Tensor:
    """Flat indices of `width` consecutive slots starting at offsets[row], per row."""
    starts = torch.tensor([offsets[r] for r in rows], device=device, dtype=torch.int64)
    return starts.unsqueeze(1) + torch.arange(width, device=device)


def compress_rows(rows: torch.Tensor, levels: Sequence[Level], seed: int,
                  group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress (R, F) values, row r at levels[r] -> (payload uint8, meta bfloat16 (groups, 2))."""
    layout = row_layout(levels, rows.shape[1], group_size)
    payload = torch.zeros(layout.total_bytes, dtype=torch.uint8, device=rows.device)
    meta = torch.empty(layout.total_groups, 2, dtype=torch.bfloat16, device=rows.device)
    write_rows(rows, levels, seed, group_size, payload, meta, layout)
    return payload, meta


def write_rows(rows: torch.Tensor, levels: Sequence[Level], seed: int, group_size: int,
               payload: torch.Tensor, meta: torch.Tensor, layout: RowLayout) -> None:
    """compress_rows into given buffers at a given layout (meta: (groups, 2) bfloat16)."""
    n_rows, row_numel = rows.shape
    for level, members in _rows_by_level(levels).items():
        values = rows[members].float() if len(members) < n_rows else rows.float()
        if level.avg > 1:
            values = average_runs(values, level.avg)
        n_codes = codes_per_row(level, row_numel)
        groups = _pad_groups(values, group_size)
        group_m = group_meta(groups, level.bits)
        u = noise.row_uniform(seed, [r * row_numel for r in members],
                              groups.shape[1] * group_size, n_rows * row_numel,
                              rows.device).view(groups.shape)
        codes = quantize_groups(groups, group_m, level.bits, u).view(len(members), -1)
        codes[:, n_codes:] = 0
        packed = pack_codes(codes, level.bits)
        payload[_row_spans(layout.byte_offsets, members, packed.shape[1], rows.device)] = packed
        group_index = _row_spans(layout.group_offsets, members, groups.shape[1], rows.device)
        meta[group_index] = group_m.to(torch.bfloat16)


def decompress_rows(payload: torch.Tensor, meta: torch.Tensor, levels: Sequence[Level],
                    group_size: int, out: torch.Tensor, layout: RowLayout | None = None) -> torch.Tensor:
    """Write the (R, F) values of a compress_rows (or write_rows) result into out (any float dtype)."""
    n_rows, row_numel = out.shape
    layout = layout or row_layout(levels, row_numel, group_size)
    for level, members in _rows_by_level(levels).items():
        n_groups = groups_per_row(level, row_numel, group_size)
        width = n_groups * group_size * level.bits // 8
        packed = payload[_row_spans(layout.byte_offsets, members, width, payload.device)]
        codes = unpack_codes(packed, level.bits).view(len(members), n_groups, group_size)
        group_m = meta[_row_spans(layout.group_offsets, members, n_groups, meta.device)]
        values = dequantize_groups(codes, group_m.float(), level.bits).view(len(members), -1)
        if level.avg > 1:
            values = values.repeat_interleave(level.avg, dim=1)
        values = values[:, :row_numel].to(out.dtype)
        if len(members) == n_rows:
            out.copy_(values)
        else:
            out[members] = values
    return out


def _table_rows(table: torch.Tensor, payload: torch.Tensor
                ) -> tuple[list[Level], RowLayout, torch.Tensor]:
    """Per-row levels, layout and the metadata view of format.py's allocated layout."""
    slots = sorted(table.cpu().tolist(), key=lambda entry: entry[3])
    levels = [QUANTIZED_LEVELS[code] for code, *_ in slots]
    layout = RowLayout(tuple(e[1] for e in slots), tuple(e[2] for e in slots),
                       payload.numel(), payload.numel() // 4)
    return levels, layout, payload.view(torch.bfloat16).view(-1, 2)


def compress_table(rows: torch.Tensor, table: torch.Tensor, payload: torch.Tensor, seed: int,
                   group_size: int) -> None:
    """Compress (R, F) values into a zeroed payload at the allocated layout of `table`."""
    levels, layout, meta = _table_rows(table, payload)
    write_rows(rows, levels, seed, group_size, payload, meta, layout)


def decompress_table(payload: torch.Tensor, table: torch.Tensor, group_size: int,
                     out: torch.Tensor) -> torch.Tensor:
    """Write the (R, F) values of a compress_table result into out."""
    levels, layout, meta = _table_rows(table, payload)
    return decompress_rows(payload, meta, levels, group_size, out, layout)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flat 0/1 (bool) tensor -> uint8, value i at bit i % 8 of byte i // 8."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of pack_bits -> flat bool tensor of numel values."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.view(-1)[:numel].bool()
