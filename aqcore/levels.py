"""Precision levels: how many bits each stored value costs and how it is made.

A level is either a plain quantizer (b bits per value, b in 1, 2, 4, 8), an Average
Quantization level (k consecutive values averaged, the average stored at 2 bits, so 2/k
bits per value), a zero-keeping AQ level (the same plus a 1-bit mask of the nonzeros, the
averages taken over the nonzeros only: for ReLU outputs, whose backward needs the exact
zero pattern), or a raw copy (16 or 32 bits). docs/levels.md.
"""
from __future__ import annotations

from dataclasses import dataclass

AQ_BITS = 2  # AQ stores its averages with the ordinary 2-bit quantizer (docs/levels.md)


@dataclass(frozen=True)
class Level:
    """One precision level.

    bits: bits per stored code (1, 2, 4, 8), or 16/32 for a raw copy.
    avg: how many consecutive values one code stands for (1 for plain and raw levels).
    zeros: a 1-bit mask marks the nonzero values; zeros decompress to exactly 0 and each
        code stands for the mean of the nonzero values of its run (AQ levels only).
    """

    name: str
    bits: int
    avg: int = 1
    zeros: bool = False

    @property
    def bits_per_value(self) -> float:
        return self.bits / self.avg + (1 if self.zeros else 0)

    @property
    def codes_level(self) -> "Level":
        """The level whose codes this level stores (itself, or the AQ level under the mask)."""
        return LEVELS[self.name[:-1]] if self.zeros else self

    @property
    def is_raw(self) -> bool:
        return self.bits >= 16

    @property
    def is_aq(self) -> bool:
        return self.avg > 1

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    def __str__(self) -> str:
        return self.name


LEVELS: dict[str, Level] = {
    level.name: level
    for level in (
        Level("32", 32),
        Level("16", 16),
        Level("8", 8),
        Level("4", 4),
        Level("2", 2),
        Level("1", 1),
        Level("aq1", AQ_BITS, 2),
        Level("aq0.5", AQ_BITS, 4),
        Level("aq0.25", AQ_BITS, 8),
        Level("aq1z", AQ_BITS, 2, zeros=True),
        Level("aq0.5z", AQ_BITS, 4, zeros=True),
        Level("aq0.25z", AQ_BITS, 8, zeros=True),
    )
}

# the levels a row of the compressed format can hold (format.py); the zero-keeping levels
# are these codes plus a mask, for whole tensors only
QUANTIZED_LEVELS: tuple[Level, ...] = tuple(l for l in LEVELS.values() if not (l.is_raw or l.zeros))
ZERO_LEVELS: tuple[Level, ...] = tuple(l for l in LEVELS.values() if l.zeros)


def _canonical_name(spec: str) -> str:
    text = spec.strip().lower()
    if text.startswith("aq"):
        zeros = "z" if text.endswith("z") else ""
        number = float(text[2:len(text) - len(zeros)])
        return f"aq{number:g}{zeros}"
    number = float(text)
    if number != int(number):
        raise ValueError
    return str(int(number))


def parse_level(spec: "Level | str | int | float") -> Level:
    """Turn "aq0.5", "2", 8, Level(...) into a Level; ValueError listing the valid ones."""
    if isinstance(spec, Level):
        return spec
    try:
        name = _canonical_name(str(spec))
    except ValueError:
        name = None
    if name not in LEVELS:
        raise ValueError(f"unknown precision level {spec!r}; valid: {', '.join(LEVELS)}")
    return LEVELS[name]


def aq_level(aq_bit: float, zeros: bool = False) -> Level:
    """The AQ level of a given precision (1, 0.5 or 0.25 bits per value), zero-keeping or not."""
    try:
        return parse_level(f"aq{float(aq_bit):g}{'z' if zeros else ''}")
    except ValueError:
        raise ValueError(f"aq_bit must be one of 1, 0.5, 0.25 (got {aq_bit!r})") from None


def zero_safe(level: Level) -> Level:
    """The level to use instead of `level` where exact zeros must survive (a ReLU output,
    whose backward tests result > 0): plain levels of 2 bits and more keep zeros as they
    are (format.py's zero-keeping groups), 1 bit becomes 2 bits, AQ its zero-keeping form."""
    if level.is_raw or level.zeros or (not level.is_aq and level.bits >= 2):
        return level
    if level.is_aq:
        return LEVELS[level.name + "z"]
    return LEVELS["2"]
