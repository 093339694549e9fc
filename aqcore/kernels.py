"""CUDA kernels for compress_rows / decompress_rows / pack_bits / unpack_bits.

Same signatures and bytes as reference.py. The sources in aqcore/csrc are compiled with
ninja on first use, for the GPU present, and cached (the build's name hashes the sources,
the target and the PyTorch/CUDA versions, so edits rebuild). Processes starting together
share one build through PyTorch's lock file in the build directory (DDP ranks).
Without a GPU, a CUDA toolkit or ninja, available() is False, aqcore uses the reference
implementation and one warning says why.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Sequence

import torch

from . import noise
from .errors import ERROR_LEVELS, level_errors
from .format import aligned, groups_per_row, row_bytes
from .levels import QUANTIZED_LEVELS, Level

CSRC = Path(__file__).resolve().parent / "csrc"
FAST_GROUP_SIZE = 256   # the group size the fast kernels (and fused error statistics) serve
TILE_GROUPS = 8         # a kernel tile: 8 groups of raw values of one row
_LEVEL_IDS = {(8, 1): 0, (4, 1): 1, (2, 1): 2, (1, 1): 3, (2, 2): 4, (2, 4): 5, (2, 8): 6}
_STAT_COLUMN = {key: column for column, key in enumerate(_LEVEL_IDS)}  # kernel column order


@dataclass(frozen=True)
class BuildInfo:
    """What build() produced: the extension's name, CUDA targets, directory and time."""

    name: str
    arch: str
    directory: Path
    seconds: float
    cached: bool


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built here, or None; cheap (never compiles)."""
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "the CUDA toolkit (nvcc) was not found; install it or set CUDA_HOME"
    if not cpp_extension.is_ninja_available():
        return "ninja was not found; pip install ninja"
    return None


def _arch() -> str:
    """TORCH_CUDA_ARCH_LIST if the user set it, else the current GPU's compute capability."""
    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if chosen:
        return chosen
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _build_name(arch: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h", ".cpp"):
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(f"{arch}|{torch.__version__}|{torch.version.cuda}".encode())
    return f"aqcore_kernels_{digest.hexdigest()[:16]}"


def build(verbose: bool = False):
    """Compile (or load the cached build of) the extension; returns (module, BuildInfo)."""
    from torch.utils import cpp_extension

    arch = _arch()
    name = _build_name(arch)
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    cached = any(directory.glob(f"{name}*.so")) or any(directory.glob(f"{name}*.pyd"))
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(p) for p in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=str(directory),
            verbose=verbose,
        )
    finally:
        if previous is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous
    return module, BuildInfo(name, arch, directory, time.perf_counter() - start, cached)


def _last_lines(text: str, count: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-count:])


@functools.lru_cache(maxsize=None)
def _extension():
    """The loaded extension, or None after warning once why the reference path is used."""
    reason = unavailable_reason()
    if reason is None:
        try:
            return build()[0]
        except Exception as exc:  # any build or load failure falls back to the reference
            reason = f"building the CUDA kernels failed:\n{_last_lines(str(exc))}"
    warnings.warn(f"aqcore uses its reference implementation on CUDA tensors: {reason} "
                  "(`python -m aqcore.build` reports the details)", RuntimeWarning, stacklevel=3)
    return None


def available() -> bool:
    """Whether the kernels are built and loadable here (builds them on first call)."""
    return _extension() is not None


def _level_id(level: Level) -> int:
    try:
        return _LEVEL_IDS[(level.bits, level.avg)]
    except KeyError:
        raise ValueError(f"the kernels compress quantized levels only, not {level}") from None


# The shared Level objects of levels.LEVELS by identity: hashing a frozen dataclass costs
# ~0.5 us, and per-row level lists have a level per sample.
_SHARED_IDS = {id(level): _LEVEL_IDS[(level.bits, level.avg)] for level in QUANTIZED_LEVELS}
_LEVEL_OF_ID = {i: next(l for l in QUANTIZED_LEVELS if (l.bits, l.avg) == key)
                for key, i in _LEVEL_IDS.items()}


def _level_ids(levels: Sequence[Level]) -> bytes:
    ids = [_SHARED_IDS.get(id(level)) for level in levels]
    if None in ids:
        ids = [_level_id(level) for level in levels]
    return bytes(ids)


@dataclass(frozen=True)
class _Plan:
    """Where the kernels find each row (format.row_layout), and the buffers' sizes.

    One level for all rows: strides, no table. Mixed levels: level -1 and a device table of
    (level id, byte offset, group offset, row) per row, sorted by level: the kernels take the
    rows in that order, so that each SM mostly runs one level's code.
    """

    total_bytes: int
    total_groups: int
    padded: bool  # some row is shorter than its 16-byte aligned slot: zero the payload
    table: "torch.Tensor | None"
    level: int
    row_bytes: int
    row_groups: int


_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()
_PLAN_CACHE_SIZE = 256


def _make_plan(ids: bytes, row_numel: int, group_size: int, device: torch.device) -> _Plan:
    sizes = {}
    for i in set(ids):
        level = _LEVEL_OF_ID[i]
        nbytes = row_bytes(level, row_numel, group_size)
        slot = aligned(nbytes)
        sizes[i] = (slot, groups_per_row(level, row_numel, group_size), slot != nbytes)
    padded = any(pad for _, _, pad in sizes.values())
    if len(sizes) == 1:
        slot, groups, _ = sizes[ids[0]]
        return _Plan(slot * len(ids), groups * len(ids), padded, None, ids[0], slot, groups)
    byte_offsets = [0, *accumulate(sizes[i][0] for i in ids)]
    group_offsets = [0, *accumulate(sizes[i][1] for i in ids)]
    order = sorted(range(len(ids)), key=ids.__getitem__)  # rows of one level run together
    table = torch.tensor([[ids[r], byte_offsets[r], group_offsets[r], r] for r in order],
                         dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: no host sync in the forward pass
        table = table.pin_memory().to(device, non_blocking=True)
    else:
        table = table.to(device)
    return _Plan(byte_offsets[-1], group_offsets[-1], padded, table, -1, 0, 0)


def _row_plan(ids: bytes, row_numel: int, group_size: int, device: torch.device) -> _Plan:
    """The plan of these rows, cached: building it takes ~1 us per row in Python, longer than
    the kernels for small tensors. A table is reused on the stream that uploaded it only."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (ids, row_numel, group_size, device, stream)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _make_plan(key[0], row_numel, group_size, device)
        if len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def _signed64(seed: int) -> int:
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _compress(rows: torch.Tensor, ids: bytes, seed: int, group_size: int, errors: bool):
    """ids: _level_ids of the rows' levels."""
    ops = _extension()
    rows = rows.contiguous()
    n_rows, row_numel = rows.shape
    plan = _row_plan(ids, row_numel, group_size, rows.device)
    payload = (torch.zeros if plan.padded else torch.empty)(plan.total_bytes, dtype=torch.uint8,
                                                            device=rows.device)
    meta = torch.empty(plan.total_groups, 2, dtype=torch.bfloat16, device=rows.device)
    fused = errors and group_size == FAST_GROUP_SIZE
    stats = None
    if fused:
        tiles = n_rows * math.ceil(row_numel / (TILE_GROUPS * group_size))
        stats = torch.empty(tiles, len(_LEVEL_IDS), dtype=torch.float32, device=rows.device)
    ops.compress(rows, payload, meta, plan.table, stats, plan.level, group_size, _signed64(seed),
                 noise.stream_key(seed), plan.row_bytes, plan.row_groups)
    if not errors:
        return payload, meta, None
    if fused:
        columns = [_STAT_COLUMN[(l.bits, l.avg)] for l in ERROR_LEVELS]
        return payload, meta, _columns(stats.view(n_rows, -1, len(_LEVEL_IDS)).sum(1), columns)
    return payload, meta, level_errors(rows, group_size)


def compress_rows(rows: torch.Tensor, levels: Sequence[Level], seed: int,
                  group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress (R, F) values, row r at levels[r] -> (payload uint8, meta bfloat16 (groups, 2))."""
    payload, meta, _ = _compress(rows, _level_ids(levels), seed, group_size, errors=False)
    return payload, meta


def compress_rows_with_errors(rows: torch.Tensor, levels: Sequence[Level], seed: int,
                              group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compress_rows plus errors.level_errors(rows, group_size), from the same pass over the
    values when group_size is 256 (else level_errors runs as a second pass)."""
    return _compress(rows, _level_ids(levels), seed, group_size, errors=True)


def fused_level_errors(rows: torch.Tensor, levels: Sequence[Level]) -> torch.Tensor:
    """errors.level_errors(rows, 256, levels) from one fused pass: the statistics of a
    compression at the cheapest level, whose codes are dropped (one launch, no sync)."""
    cheapest = bytes([max(_LEVEL_IDS.values())])
    _, _, stats = _compress(rows, cheapest * rows.shape[0], 0, FAST_GROUP_SIZE, errors=True)
    return _columns(stats, [ERROR_LEVELS.index(level) for level in levels])


def _columns(t: torch.Tensor, columns: list[int]) -> torch.Tensor:
    """t[:, columns]; a run of consecutive columns as a view (a list index is a host copy)."""
    if columns == list(range(columns[0], columns[0] + len(columns))):
        return t[:, columns[0]:columns[0] + len(columns)]
    return t[:, columns]


def decompress_rows(payload: torch.Tensor, meta: torch.Tensor, levels: Sequence[Level],
                    group_size: int, out: torch.Tensor) -> torch.Tensor:
    """Write the (R, F) values of a compress_rows result into out (float32/16, bfloat16)."""
    ops = _extension()
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype,
                                                         device=out.device)
    plan = _row_plan(_level_ids(levels), out.shape[1], group_size, out.device)
    ops.decompress(payload.contiguous(), meta.contiguous(), target, plan.table, plan.level,
                   group_size, plan.row_bytes, plan.row_groups)
    if target is not out:
        out.copy_(target)
    return out


def compress_table(rows: torch.Tensor, table: torch.Tensor, payload: torch.Tensor, seed: int,
                   group_size: int) -> None:
    """reference.compress_table: codes and metadata into one zeroed payload by its table."""
    rows = rows.contiguous()
    _extension().compress(rows, payload, payload.view(torch.bfloat16), table, None, -1, group_size,
                          _signed64(seed), noise.stream_key(seed), 0, 0)


def decompress_table(payload: torch.Tensor, table: torch.Tensor, group_size: int,
                     out: torch.Tensor) -> torch.Tensor:
    """reference.decompress_table; out: contiguous (R, F)."""
    _extension().decompress(payload, payload.view(torch.bfloat16), out, table, -1, group_size, 0, 0)
    return out


def allocate_rows(weighted: torch.Tensor, costs: torch.Tensor, budget: int) -> torch.Tensor:
    """allocate.reference_allocate_rows in one launch."""
    rows = weighted.shape[0]
    choice = torch.empty(rows, dtype=torch.int64, device=weighted.device)
    scratch = torch.empty_like(choice)
    full = costs.expand_as(weighted).contiguous() if costs.dim() == 1 else costs.contiguous()
    _extension().allocate(weighted.contiguous(), full, int(budget), choice, None, scratch, [], [], [])
    return choice


def allocate_layout(weighted: torch.Tensor, budget: int, codes: list[int], slots: list[int],
                    payloads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """allocate.allocate_layout in one launch: (choice, table)."""
    rows = weighted.shape[0]
    choice = torch.empty(rows, dtype=torch.int64, device=weighted.device)
    scratch = torch.empty_like(choice)
    table = torch.empty(rows, 4, dtype=torch.int64, device=weighted.device)
    _extension().allocate(weighted.contiguous(), None, int(budget), choice, table, scratch,
                          list(codes), list(slots), list(payloads))
    return choice, table


def zero_if(flag: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Zero the dense CUDA tensors in place when the one-element bool flag is set, decided
    on the device (a few launches for any number of tensors, no host read)."""
    _extension().zero_if(flag, list(tensors))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flat 0/1 (bool) tensor -> uint8, value i at bit i % 8 of byte i // 8 (nonzero -> 1)."""
    flat = mask.reshape(-1)
    if flat.dtype not in (torch.bool, torch.uint8):
        flat = flat != 0
    flat = flat.contiguous()
    out = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8, device=flat.device)
    _extension().pack_bits(flat, out)
    return out


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of pack_bits -> flat bool tensor of numel values."""
    out = torch.empty(numel, dtype=torch.bool, device=packed.device)
    _extension().unpack_bits(packed.contiguous(), out)
    return out
