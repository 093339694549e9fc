"""The one compressed format, shared by the reference implementation and the kernels.

A tensor is viewed in its memory order as R rows of F values (R = 1: the whole tensor is
one row; R = shape[0]: one row per sample, each with its own level). A row with a
quantized level (b bits, k values per code) holds ceil(F / k) codes, cut into groups of
`group_size` codes; the last group of a row is padded with zero codes. Groups never
cross rows.

payload (uint8): rows one after another, each starting on a 16-byte boundary; inside a
row, groups one after another, group_size * b / 8 bytes each; code j of a group takes
bits [j*b, j*b + b) of the group, least significant bit first.

meta (bfloat16, shape (groups, 2)): per group (m0, m1).
  m0 <  m1  plain group:      value(c) = m0 + c * ((m1 - m0) / B)
  m0 >= m1  zero-keeping:     value(0) = 0, value(c) = m1 + (c - 1) * ((m0 - m1) / (B - 1))
  NaN       non-finite group: every value is NaN
with B = 2**b - 1, all arithmetic in float32, each operation rounded on its own.
The zero-keeping form serves groups whose minimum is exactly 0 (ReLU and dropout outputs,
b >= 2) and groups holding one constant.

Zero-keeping AQ levels (aq1z, aq0.5z, aq0.25z; whole tensors only): payload and meta are
those of the AQ level for the tensor whose zeros are replaced by the mean of the nonzeros
of their run (reference.fill_zeros), and `mask` (uint8) holds one bit per value, 1 for a
nonzero, value i at bit i % 8 of byte i // 8, in memory order. Decompression decodes the
AQ level and sets the masked-out values to exactly 0. m0/m1 are the group's range rounded
outward to bfloat16, so the grid always covers the group (plain rounding can bias a whole
group). docs/format.md has the bytes in full.

Allocated layout (api.compress_allocated: levels chosen on the device, unknown to the
host): one payload buffer of a fixed capacity, no separate meta. Rows lie in slots sorted
by level code (the level's index in levels.QUANTIZED_LEVELS; rows in order within a level),
each slot = the row's codes (16-byte aligned) then its (m0, m1) words (16-byte aligned).
`table` (R, 4) int64 on the payload's device says per slot: (level code, byte offset of the
codes, offset of the metadata in 4-byte words, row).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .levels import QUANTIZED_LEVELS, Level

ROW_ALIGN = 16
KIND_CODES = "codes"  # quantized rows, payload + meta as described above
KIND_RAW = "raw"      # the tensor (or its 16-bit copy) held as is
KIND_BITS = "bits"    # a 0/1 tensor packed at one bit per value, LSB first (as `mask` below)


@dataclass(frozen=True)
class RowLayout:
    """Where each row's codes and metadata live (per-row Python ints; rows are few)."""

    byte_offsets: tuple[int, ...]
    group_offsets: tuple[int, ...]
    total_bytes: int
    total_groups: int


def aligned(nbytes: int) -> int:
    """nbytes rounded up to a whole number of ROW_ALIGN-byte blocks."""
    return -(-nbytes // ROW_ALIGN) * ROW_ALIGN


def codes_per_row(level: Level, row_numel: int) -> int:
    return math.ceil(row_numel / level.avg)


def groups_per_row(level: Level, row_numel: int, group_size: int) -> int:
    return math.ceil(codes_per_row(level, row_numel) / group_size)


def row_bytes(level: Level, row_numel: int, group_size: int) -> int:
    return groups_per_row(level, row_numel, group_size) * group_size * level.bits // 8


def slot_bytes(level: Level, row_numel: int, group_size: int) -> tuple[int, int]:
    """A row's slot in the allocated layout: (aligned code bytes, aligned code + meta bytes)."""
    codes = aligned(row_bytes(level, row_numel, group_size))
    meta = 4 * groups_per_row(level, row_numel, group_size)
    return codes, codes + aligned(meta)


def row_budget(ladder: Sequence[Level], row_numel: int, group_size: int, bits: float) -> int:
    """Bytes a row may hold in the allocated layout at `bits` per value, counted like the fixed
    levels: codes only, metadata and padding on top. Linear between the ladder's levels
    (slots counted whole), so a target of a level's bits always affords that level."""
    points: dict[float, int] = {}
    for level in ladder:
        slot = slot_bytes(level, row_numel, group_size)[1]
        points[level.bits_per_value] = max(points.get(level.bits_per_value, 0), slot)
    xs = sorted(points)
    ys = [max(points[b] for b in xs[: i + 1]) for i in range(len(xs))]
    if bits <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if bits <= x1:
            return int(y0 + (bits - x0) / (x1 - x0) * (y1 - y0))
    return ys[-1]


def row_layout(levels: Sequence[Level], row_numel: int, group_size: int) -> RowLayout:
    byte_offsets, group_offsets = [], []
    nbytes = ngroups = 0
    for level in levels:
        byte_offsets.append(nbytes)
        group_offsets.append(ngroups)
        size = row_bytes(level, row_numel, group_size)
        nbytes += aligned(size)
        ngroups += groups_per_row(level, row_numel, group_size)
    return RowLayout(tuple(byte_offsets), tuple(group_offsets), nbytes, ngroups)


TENSOR_FIELDS = ("payload", "meta", "table", "mask")  # CompressedTensor's tensors


@dataclass(frozen=True)
class CompressedTensor:
    """A compressed activation: everything needed to rebuild it, and nothing else.

    perm is the memory order of the original dims (identity for contiguous tensors,
    e.g. (0, 2, 3, 1) for channels_last), so the rebuilt tensor gets the same strides.
    """

    kind: str
    payload: torch.Tensor
    meta: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    levels: tuple[Level, ...]
    seed: int
    group_size: int
    perm: tuple[int, ...]
    table: torch.Tensor | None = None  # allocated layout only (levels = the ladder offered)
    mask: torch.Tensor | None = None   # zero-keeping AQ levels only: the nonzeros, 1 bit each

    @property
    def rows(self) -> int:
        return len(self.levels) if self.table is None else self.table.shape[0]

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape) // max(self.rows, 1)

    @property
    def device(self) -> torch.device:
        return self.payload.device

    @property
    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """Its tensors, in TENSOR_FIELDS order (None where absent): what with_tensors takes."""
        return tuple(getattr(self, name) for name in TENSOR_FIELDS)

    def with_tensors(self, tensors: "Sequence[torch.Tensor | None]") -> "CompressedTensor":
        """The same compressed tensor over other tensors (moved, or handed to autograd and back)."""
        return replace(self, **dict(zip(TENSOR_FIELDS, tensors)))

    @property
    def nbytes(self) -> int:
        """Every byte this object holds in tensors: payload, per-group metadata, row table, mask."""
        return sum(t.numel() * t.element_size() for t in self.tensors if t is not None)

    def row_levels(self) -> tuple[Level, ...]:
        """The level of each row (one level for a tensor stored whole). The allocated
        layout reads its table back from the device for this."""
        if self.table is None:
            return self.levels
        slots = sorted(self.table.tolist(), key=lambda entry: entry[3])
        return tuple(QUANTIZED_LEVELS[code] for code, *_ in slots)

    def layout(self) -> RowLayout:
        return row_layout(self.levels, self.row_numel, self.group_size)

    def to(self, device: "torch.device | str", non_blocking: bool = False) -> "CompressedTensor":
        return self.with_tensors([None if t is None else t.to(device, non_blocking=non_blocking)
                                  for t in self.tensors])
