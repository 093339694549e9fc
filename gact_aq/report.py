"""What a Controller holds right now: one row per compressed saved tensor, and totals."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .packing import Packer

NOTHING_HELD = ("nothing held: no saved activation is alive (a forward stores them, its "
                "backward frees them)")


@dataclass(frozen=True)
class Row:
    tid: Optional[int]          # None for 1-bit masks
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    level: str
    nbytes: int                 # bytes held, metadata included
    exact_nbytes: int           # bytes the tensor itself would take
    swapped: bool               # held in host memory
    sensitivity: Optional[float]  # None: not measured yet (no adaptation covered it), or a mask


@dataclass(frozen=True)
class Report:
    rows: tuple[Row, ...]

    @classmethod
    def build(cls, packer: Packer, sensitivity: np.ndarray) -> "Report":
        rows = []
        for unit in sorted(packer.units, key=_order):
            known = unit.tid is not None and unit.tid < len(sensitivity)
            rows.append(Row(
                unit.tid, unit.kind, tuple(unit.shape), unit.dtype,
                unit.level.name if unit.level is not None else "mask",
                unit.nbytes, unit.shape.numel() * unit.dtype.itemsize, unit.swapped,
                float(sensitivity[unit.tid]) if known else None))
        return cls(tuple(rows))

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    @property
    def exact_nbytes(self) -> int:
        return sum(r.exact_nbytes for r in self.rows)

    def __str__(self) -> str:
        if not self.rows:
            return NOTHING_HELD
        header = f"{'tid':>4} {'shape':<22} {'dtype':<9} {'level':>6} {'bytes':>11} " \
                 f"{'exact':>11} {'sensitivity':>12}"
        lines = [header, "-" * len(header)]
        for r in self.rows:
            tid = "-" if r.tid is None else str(r.tid)
            where = " host" if r.swapped else ""
            lines.append(f"{tid:>4} {str(list(r.shape)):<22} {str(r.dtype)[6:]:<9} "
                         f"{r.level:>6} {r.nbytes:>11,} {r.exact_nbytes:>11,} "
                         f"{_sensitivity(r):>12}{where}")
        lines.append(f"total: {self.nbytes:,} bytes held for {self.exact_nbytes:,} exact "
                     f"({self.exact_nbytes / self.nbytes:.1f}x smaller)")
        return "\n".join(lines)


def _sensitivity(row: Row) -> str:
    if row.sensitivity is not None:
        return f"{row.sensitivity:.3g}"
    return "-" if row.tid is None else "not measured"


def _order(unit) -> tuple:
    return (unit.tid is None, unit.tid if unit.tid is not None else 0)
