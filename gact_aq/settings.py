"""The configuration of gact_aq and its optimization levels (docs/frameworks.md).

Levels are data: OPTIMIZATION_LEVELS maps each level name of GACT and of the AQ release to
the config fields it sets. `set_optimization_level` starts from the defaults every time,
applies the row, then the `bit` / `aq_bit` arguments, so the result never depends on an
earlier call and no level silently ignores an argument (as published levels did).

The published "...GN..." levels and "L2.2_" also switched on `fast_mem_check`, which gives
every tensor but one a random sensitivity (docs/frameworks.md), and "GN" switched the probe
statistic to per-parameter gradient norms. Neither is reproduced: here those names are
auto precision with real sensitivities, at the bit / aq_bit their names give.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import aqcore
from aqcore import Level

SENSITIVITY_METHODS = ("propagate", "probe")
AQ_BITS = (0.0, 1.0, 0.5, 0.25)
FIXED_BITS = (1, 2, 4, 8, 16, 32)


@dataclass
class QuantizationConfig:
    """What to compress and how. A Controller copies it when it is built.

    compress: quantize saved activations (False: keep them as they are; L0, swap).
    bit: with auto_prec, the target average bits per saved value (fractional allowed);
         without, the one fixed level of every tensor (1, 2, 4, 8, 16, 32, or aq_bit).
    aq_bit: the lowest Average Quantization level allowed (1, 0.5, 0.25; 0 = no AQ).
    auto_prec: choose a level per tensor from measured sensitivities (AutoPrecision).
    adapt_interval: re-allocate every this many iterations, and before that at iterations
         0, 1, 2, 4, 8, ... (sensitivities move most early in training).
    guard: watch the gradients and recover from a bad step (controller.py, aqcore/guard.py);
         turn off with fp16 and a GradScaler, whose overflowing steps are normal.
    group_size: values (AQ: averages) per quantization group.
    swap: move what is saved to (pinned) CPU memory until backward needs it.
    sensitivity: "propagate" (default: one extra pass plus local recomputation, whatever
         the number of tensors) or "probe" (published GACT, three passes per tensor).
    min_numel: tensors smaller than this are kept as they are (compressing does not pay).
    """

    compress: bool = True
    bit: float = 4.0
    aq_bit: float = 0.0
    auto_prec: bool = True
    adapt_interval: int = 1000
    group_size: int = 256
    swap: bool = False
    sensitivity: str = "propagate"
    min_numel: int = 1024
    guard: bool = True

    def validate(self) -> "QuantizationConfig":
        if float(self.aq_bit) not in AQ_BITS:
            raise ValueError(f"aq_bit must be one of 0 (off), 1, 0.5, 0.25 (got {self.aq_bit!r})")
        lowest = float(self.aq_bit) if self.aq_bit else 1.0
        if self.auto_prec and not lowest <= float(self.bit) <= 32:
            hint = "" if self.aq_bit else " (set aq_bit to 1, 0.5 or 0.25 to go below 1 bit)"
            raise ValueError(f"bit must lie in [{lowest:g}, 32] with auto precision, got "
                             f"{self.bit!r}{hint}")
        if not self.auto_prec:
            fixed_level(self)
        if self.sensitivity not in SENSITIVITY_METHODS:
            raise ValueError(f"unknown sensitivity method {self.sensitivity!r}; valid: "
                             f"{', '.join(SENSITIVITY_METHODS)}")
        if not isinstance(self.adapt_interval, int) or self.adapt_interval < 1:
            raise ValueError(f"adapt_interval must be a positive integer (got {self.adapt_interval!r})")
        if not isinstance(self.group_size, int) or self.group_size < 32 or self.group_size % 32:
            raise ValueError(f"group_size must be a positive multiple of 32 (got {self.group_size!r})")
        if not isinstance(self.min_numel, int) or self.min_numel < 1:
            raise ValueError(f"min_numel must be a positive integer (got {self.min_numel!r})")
        return self


OPTIMIZATION_LEVELS: dict[str, dict] = {
    "L0": dict(compress=False),
    "L1": dict(bit=4, auto_prec=False),
    "L1.1": dict(bit=8, auto_prec=False),
    "L1.2": dict(bit=2, auto_prec=False),
    "L2": dict(bit=4),
    "L2.1": dict(bit=3),
    "L2.2": dict(bit=2),
    "L3": dict(bit=4, swap=True),
    "swap": dict(compress=False, swap=True),
    "L4bit-swap": dict(bit=4, auto_prec=False, swap=True),
    "L2.2_": dict(bit=2),
    "L2.2_GN": dict(bit=2),
    "L2.2_GN_AQ0.5": dict(bit=2, aq_bit=0.5),
    "L2.2_GN_AQ0.5_1.5b": dict(bit=1.5, aq_bit=0.5),
    "L2.2_GN_AQ0.5_1.0b": dict(bit=1.0, aq_bit=0.5),
}

config = QuantizationConfig()


def build_config(level: str, bit: float = 0, aq_bit: float = 0) -> QuantizationConfig:
    """A fresh config: defaults, then the level's row, then non-zero bit / aq_bit."""
    if level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"unknown optimization level {level!r}; valid: "
                         f"{', '.join(OPTIMIZATION_LEVELS)}")
    if bit < 0:
        raise ValueError(f"bit must be positive (0 keeps the level's), got {bit!r}")
    fresh = QuantizationConfig(**OPTIMIZATION_LEVELS[level])
    if bit:
        fresh.bit = float(bit)
    if aq_bit:
        fresh.aq_bit = float(aq_bit)
    return fresh.validate()


def set_optimization_level(level: str, bit: float = 0, aq_bit: float = 0) -> QuantizationConfig:
    """Set gact_aq.config (in place, so references to it stay valid) and return it."""
    fresh = build_config(level, bit, aq_bit)
    for field in fields(QuantizationConfig):
        setattr(config, field.name, getattr(fresh, field.name))
    return config


def set_adapt_interval(n: int) -> None:
    """Re-allocate bits every n iterations (reset by set_optimization_level)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"adapt interval must be a positive integer (got {n!r})")
    config.adapt_interval = n


def ladder(cfg: QuantizationConfig) -> tuple[Level, ...]:
    """The levels AutoPrecision chooses from: 32 (kept as is), 8, 4, 2, 1, then AQ down to
    aq_bit and its zero-keeping forms (for ReLU outputs, autoprec.allowed) (docs/levels.md)."""
    levels = [aqcore.parse_level(b) for b in ("32", "8", "4", "2", "1")]
    if cfg.aq_bit:
        aq = [b for b in (1.0, 0.5, 0.25) if b >= cfg.aq_bit]
        levels += [aqcore.aq_level(b) for b in aq] + [aqcore.aq_level(b, zeros=True) for b in aq]
    return tuple(levels)


def fixed_level(cfg: QuantizationConfig) -> Level:
    """The one level of every tensor without auto precision: bit, or AQ when bit == aq_bit
    (as in GACT-AQ, where bit 1 with AQ on means AQ 1-bit)."""
    if cfg.aq_bit and float(cfg.bit) == float(cfg.aq_bit):
        return aqcore.aq_level(cfg.aq_bit)
    if float(cfg.bit) not in FIXED_BITS:
        raise ValueError(f"a fixed level needs bit in {', '.join(map(str, FIXED_BITS))} or "
                         f"bit == aq_bit (got bit={cfg.bit!r}, aq_bit={cfg.aq_bit!r})")
    return aqcore.parse_level(int(cfg.bit))


def may_take(level: Level, zeros: bool) -> bool:
    """Whether a tensor may be stored at level: one whose zeros must stay exact only at a
    level that keeps them (aqcore.zero_safe), any other only at a level without a mask."""
    return aqcore.zero_safe(level) is level if zeros else not level.zeros


def start_level(cfg: QuantizationConfig, zeros: bool = False) -> Level:
    """The level of a tensor before the first adaptation: the finest ladder level it may take
    whose bits per value fit the budget (so iteration 0 already honours it), else the
    cheapest it may take. zeros: a tensor whose zeros must stay exact (a ReLU output)."""
    if not cfg.auto_prec:
        level = fixed_level(cfg)
        return aqcore.zero_safe(level) if zeros else level
    usable = [l for l in ladder(cfg) if may_take(l, zeros)]
    fitting = [l for l in usable if l.bits_per_value <= cfg.bit]
    return fitting[0] if fitting else min(usable, key=lambda l: l.bits_per_value)
