"""compress / decompress: the public entry points, dispatching to kernel or reference."""
from __future__ import annotations

import functools
import numbers
import operator
from typing import Sequence

import torch

from . import reference
from .allocate import allocate_layout
from . import errors as error_model
from .errors import ERROR_LEVELS
from .format import (KIND_BITS, KIND_CODES, KIND_RAW, CompressedTensor, aligned, row_budget,
                     slot_bytes)
from .levels import QUANTIZED_LEVELS, Level, parse_level

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_GROUP_SIZE = 256

LevelSpec = "Level | str | int | float"


def _need_tensor(function: str, name: str, value, optional: bool = False) -> None:
    """A TypeError naming what `function` takes, where `value` is not a tensor (lists and
    arrays would otherwise fail later with an AttributeError)."""
    if isinstance(value, torch.Tensor) or (optional and value is None):
        return
    raise TypeError(f"aqcore.{function} takes a torch.Tensor as {name}"
                    f"{' (or None)' if optional else ''}, got {type(value).__name__}; "
                    "torch.as_tensor converts lists and arrays")


def _seed(function: str, seed) -> int:
    """seed as a 64-bit unsigned int; TypeError for anything but an integer."""
    try:
        return operator.index(seed) & ((1 << 64) - 1)
    except TypeError:
        raise TypeError(f"aqcore.{function} takes an integer seed, got "
                        f"{type(seed).__name__} {seed!r}") from None


def _backend(device: torch.device):
    """The CUDA kernels for CUDA tensors when they can be built, else the reference."""
    if device.type == "cuda":
        from . import kernels

        if kernels.available():
            return kernels
    return reference


def _memory_order(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x as a contiguous tensor in its memory order, and that order of dims.

    Dense permuted layouts (channels_last, transposes) are read in place; anything else
    (slices, expanded views) is copied. With several rows, dim 0 must be outermost.
    """
    identity = tuple(range(x.dim()))
    if x.is_contiguous():
        return x, identity
    perm = tuple(sorted(identity, key=lambda d: -x.stride(d)))
    permuted = x.permute(perm)
    if permuted.is_contiguous() and (rows == 1 or perm[0] == 0 or x.shape[0] == 1):
        return permuted, perm
    return x.contiguous(), identity


def sample_rows(x: torch.Tensor) -> torch.Tensor:
    """x as (x.shape[0], F) rows in memory order, exactly as compress_allocated (and a
    per-row level list) groups it: price levels on these rows (level_errors)."""
    _need_tensor("sample_rows", "x", x)
    if x.dim() == 0:
        raise ValueError("sample_rows needs a tensor with a dim 0 of rows, got a scalar")
    return _memory_order(x, x.shape[0])[0].view(x.shape[0], -1)


def level_errors(rows: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                 levels: Sequence[Level] = ERROR_LEVELS) -> torch.Tensor:
    """(R, F) values -> (R, len(levels)) float32 expected squared error per row and level
    (errors.py's model). On CUDA with group_size 256, from one fused kernel pass."""
    _need_tensor("level_errors", "rows", rows)
    if rows.dim() != 2:
        raise ValueError(f"level_errors takes (rows, values) 2-D rows, got shape "
                         f"{tuple(rows.shape)}; x.reshape(1, -1) is one row, "
                         "aqcore.sample_rows(x) one row per sample")
    if not rows.is_floating_point():
        raise TypeError(f"level_errors takes floating rows, got {rows.dtype}")
    levels = tuple(levels)
    if (rows.is_cuda and group_size == DEFAULT_GROUP_SIZE and rows.dtype in FLOAT_DTYPES
            and rows.dim() == 2 and rows.numel() > 0
            and all(not (l.is_raw or l.zeros) for l in levels)):
        backend = _backend(rows.device)
        if backend is not reference:
            return backend.fused_level_errors(rows, levels)
    return error_model.level_errors(rows, group_size, levels)


def _check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 32 or group_size % 32:
        raise ValueError(f"group_size must be a positive multiple of 32 (got {group_size!r})")


def _parse_levels(level, x: torch.Tensor) -> tuple[Level, ...]:
    if isinstance(level, (list, tuple)):
        levels = tuple(parse_level(l) for l in level)
        if x.dim() == 0 or len(levels) != x.shape[0]:
            raise ValueError(
                f"a per-row level list needs one level per row of dim 0: got {len(levels)} "
                f"levels for shape {tuple(x.shape)}")
        whole = [str(l) for l in levels if l.is_raw or l.zeros]
        if whole:
            raise ValueError(f"per-row levels must be quantized levels, not {whole[0]!r}; "
                             "raw and zero-keeping levels store whole tensors")
        return levels
    return (parse_level(level),)


def _raw(x: torch.Tensor, level: Level | None, seed: int, group_size: int) -> CompressedTensor:
    held = x
    if level is not None and level.bits == 16 and x.dtype == torch.float32:
        held = x.to(torch.bfloat16)
    levels = (level,) if level is not None else ()
    return CompressedTensor(KIND_RAW, held, torch.empty(0), x.shape, x.dtype, levels, seed,
                            group_size, tuple(range(x.dim())))


def pack_mask(mask: torch.Tensor) -> CompressedTensor:
    """Pack a 0/1 tensor (bool, or uint8 dropout masks) at one bit per value, losslessly
    for 0/1 data (any nonzero byte reads back as 1), in its memory order: a channels_last
    mask is packed without a copy and unpacks channels_last."""
    _need_tensor("pack_mask", "mask", mask)
    if mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"pack_mask takes bool or uint8 0/1 tensors, not {mask.dtype}")
    ordered, perm = _memory_order(mask, 1)
    packed = _backend(mask.device).pack_bits(ordered if ordered.dtype == torch.bool else ordered != 0)
    return CompressedTensor(KIND_BITS, packed, torch.empty(0), mask.shape, mask.dtype, (),
                            0, DEFAULT_GROUP_SIZE, perm)


def _compress_rows(rows: torch.Tensor, levels: tuple[Level, ...], seed: int, group_size: int,
                   errors: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(payload, meta, errors or None) from the backend of rows' device."""
    backend = _backend(rows.device)
    if not errors:
        return (*backend.compress_rows(rows, levels, seed, group_size), None)
    if backend is reference:
        payload, meta = reference.compress_rows(rows, levels, seed, group_size)
        return payload, meta, level_errors(rows, group_size)
    return backend.compress_rows_with_errors(rows, levels, seed, group_size)


def compress(x: torch.Tensor, level: "LevelSpec | Sequence[LevelSpec]", seed: int = 0,
             group_size: int = DEFAULT_GROUP_SIZE, *, errors: bool = False
             ) -> "CompressedTensor | tuple[CompressedTensor, torch.Tensor | None]":
    """Compress x at a level ("aq0.25" ... "32"), or one level per row of dim 0.

    Floating tensors (fp32/fp16/bf16) are quantized; bool tensors are packed at one bit;
    other tensors (integer, complex, sparse) and empty ones are held as they are.

    errors=True returns (CompressedTensor, errors): errors.level_errors of x's rows (in
    memory order, one row per level given), a (rows, len(ERROR_LEVELS)) float32 tensor the
    bit-allocation solver prices levels with, or None for tensors that are not floating.
    On CUDA with group_size 256 they come from the compression pass itself.
    """
    _need_tensor("compress", "x", x)
    _check_group_size(group_size)
    levels = _parse_levels(level, x)
    seed = _seed("compress", seed)
    if x.layout != torch.strided or x.dtype not in FLOAT_DTYPES:
        if x.layout == torch.strided and x.dtype == torch.bool:
            ct = pack_mask(x)
        else:
            ct = _raw(x, None, seed, group_size)
        return (ct, None) if errors else ct
    if x.numel() == 0 or (len(levels) == 1 and levels[0].is_raw):
        ct = _raw(x, levels[0] if len(levels) == 1 else None, seed, group_size)
        if not errors:
            return ct
        if x.numel() == 0:
            return ct, torch.zeros(len(levels), len(ERROR_LEVELS), device=x.device)
        return ct, level_errors(_memory_order(x, 1)[0].reshape(1, -1), group_size)
    ordered, perm = _memory_order(x, len(levels))
    rows = ordered.view(len(levels), -1)
    mask = None
    if levels[0].zeros:
        mask = _backend(x.device).pack_bits(rows.reshape(-1) != 0)
        errs = level_errors(rows, group_size) if errors else None
        payload, meta, _ = _compress_rows(reference.fill_zeros(rows, levels[0].avg),
                                          (levels[0].codes_level,), seed, group_size, False)
    else:
        payload, meta, errs = _compress_rows(rows, levels, seed, group_size, errors)
    ct = CompressedTensor(KIND_CODES, payload, meta, x.shape, x.dtype, levels, seed,
                          group_size, perm, mask=mask)
    return (ct, errs) if errors else ct


def _ladder(ladder: Sequence[LevelSpec]) -> tuple[Level, ...]:
    if isinstance(ladder, (str, bytes, Level)) or not isinstance(ladder, Sequence):
        raise TypeError(f"aqcore.compress_allocated takes a ladder: a list of levels from the "
                        f"most to the least bits per value, e.g. ['8', '4', '2'], got {ladder!r}")
    return _parsed_ladder(tuple(ladder))


@functools.lru_cache(maxsize=256)
def _parsed_ladder(ladder: tuple) -> tuple[Level, ...]:
    """The checked levels of a ladder, cached: a layer compresses with the same ladder on
    every call, and parsing and checking it took longer than the kernels of a small layer."""
    levels = tuple(parse_level(l) for l in ladder)
    if not 1 <= len(levels) <= 8 or any(l.is_raw or l.zeros for l in levels):
        raise ValueError(f"a ladder holds 1 to 8 per-row levels (no raw or zero-keeping ones), "
                         f"got {[str(l) for l in levels]}")
    if len(set(levels)) < len(levels) or any(
            a.bits_per_value < b.bits_per_value for a, b in zip(levels, levels[1:])):
        raise ValueError("a ladder runs from the most to the least bits per value, each level "
                         f"once, got {[str(l) for l in levels]}")
    return levels


def compress_allocated(x: torch.Tensor, ladder: Sequence[LevelSpec], weights: torch.Tensor,
                       bits: float, seed: int = 0, group_size: int = DEFAULT_GROUP_SIZE,
                       errors: torch.Tensor | None = None, budget: int | None = None
                       ) -> tuple[CompressedTensor, torch.Tensor]:
    """Compress x with a level per row of dim 0 chosen on x's device, with no host sync.

    Row n gets the level of `ladder` (most to least bits per value) that minimises
    sum_n weights[n] * errors[n, level] within a byte budget (allocate.py): `bits` per value
    counted like the fixed levels (format.row_budget per row), or `budget` bytes for all
    rows when given; raised to the cheapest level, lowered to the dearest. errors: (rows,
    len(ladder)) expected squared errors, level_errors(rows) when None (NaN/Inf and negative
    products count as 0). The result holds exactly the budget (format.py's allocated
    layout). Returns (CompressedTensor, errors).
    """
    _need_tensor("compress_allocated", "x", x)
    _need_tensor("compress_allocated", "weights", weights)
    _need_tensor("compress_allocated", "errors", errors, optional=True)
    if not isinstance(bits, numbers.Real) or not (budget is None or isinstance(budget, numbers.Integral)):
        raise TypeError(f"aqcore.compress_allocated takes bits per value as a number and budget "
                        f"as an integer number of bytes or None, got bits={bits!r}, budget={budget!r}")
    seed = _seed("compress_allocated", seed)
    _check_group_size(group_size)
    levels = _ladder(ladder)
    if x.layout != torch.strided or x.dtype not in FLOAT_DTYPES or x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"compress_allocated takes a non-empty floating tensor with a dim 0 "
                         f"of rows, got {tuple(x.shape)} {x.dtype} {x.layout}")
    ordered, perm = _memory_order(x, x.shape[0])
    rows = ordered.view(x.shape[0], -1)
    if weights.shape != (rows.shape[0],):
        raise ValueError(f"weights needs one value per row: shape ({rows.shape[0]},), got "
                         f"{tuple(weights.shape)}")
    if errors is None:
        errors = level_errors(rows, group_size, levels)
    weighted = weights.to(rows.device, torch.float32).unsqueeze(1) * errors.float()
    ids, totals, codes, per_row = _layout_sizes(levels, rows.shape[1], group_size, float(bits))
    if budget is None:
        budget = rows.shape[0] * per_row
    budget = min(max(int(budget), rows.shape[0] * min(totals)), rows.shape[0] * max(totals))
    _, table = allocate_layout(weighted, budget, ids, totals, codes)
    payload = torch.zeros(aligned(budget), dtype=torch.uint8, device=x.device)
    _backend(x.device).compress_table(rows, table, payload, seed, group_size)
    ct = CompressedTensor(KIND_CODES, payload, payload.new_empty(0), x.shape, x.dtype, levels,
                          seed, group_size, perm, table)
    return ct, errors


@functools.lru_cache(maxsize=4096)
def _layout_sizes(levels: tuple[Level, ...], row_numel: int, group_size: int, bits: float
                  ) -> tuple[list[int], list[int], list[int], int]:
    """Per ladder level: its QUANTIZED_LEVELS index, a row's slot bytes and code bytes; and
    a row's budget at `bits` (format.row_budget). Cached per layer shape."""
    slots = [slot_bytes(level, row_numel, group_size) for level in levels]
    return ([QUANTIZED_LEVELS.index(l) for l in levels], [total for _, total in slots],
            [codes for codes, _ in slots], row_budget(levels, row_numel, group_size, bits))


def _in_original_order(ordered: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """A tensor in memory order (dims permuted by perm) viewed in the original dim order."""
    return ordered.permute(sorted(range(len(perm)), key=lambda d: perm[d]))


def _permuted_empty(ct: CompressedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An output in the original layout, and its contiguous memory-order view."""
    ordered = torch.empty([ct.shape[d] for d in ct.perm], dtype=ct.dtype, device=ct.device)
    return _in_original_order(ordered, ct.perm), ordered


def decompress(ct: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rebuild the tensor: same shape, dtype, device (and layout) as the original.

    out: an optional contiguous buffer of the original shape and dtype to write into.
    """
    if not isinstance(ct, CompressedTensor):
        raise TypeError(f"aqcore.decompress takes the CompressedTensor that aqcore.compress "
                        f"returned, got {type(ct).__name__}")
    _need_tensor("decompress", "out", out, optional=True)
    if ct.kind == KIND_RAW:
        result = ct.payload if ct.payload.dtype == ct.dtype else ct.payload.to(ct.dtype)
        return out.copy_(result) if out is not None else result
    if ct.kind == KIND_BITS:
        ordered = _backend(ct.device).unpack_bits(ct.payload, ct.shape.numel())
        values = _in_original_order(ordered.view([ct.shape[d] for d in ct.perm]), ct.perm).to(ct.dtype)
        return out.copy_(values) if out is not None else values
    if out is None:
        result, ordered = _permuted_empty(ct)
    else:
        if out.shape != ct.shape or out.dtype != ct.dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {ct.dtype} tensor of shape "
                             f"{tuple(ct.shape)}")
        if ct.perm != tuple(range(len(ct.perm))):
            return out.copy_(decompress(ct))
        result = ordered = out
    rows = ordered.view(ct.rows, -1)
    backend = _backend(ct.device)
    if ct.table is not None:
        backend.decompress_table(ct.payload, ct.table, ct.group_size, rows)
    else:
        codes = tuple(level.codes_level for level in ct.levels)
        backend.decompress_rows(ct.payload, ct.meta, codes, ct.group_size, rows)
    if ct.mask is not None:
        rows.masked_fill_(~backend.unpack_bits(ct.mask, rows.numel()).view(rows.shape), 0)
    return result
