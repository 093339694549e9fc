"""Optimization levels and the configuration in force.

Levels are data: LEVELS maps a level name to the fields it sets,
and set_optimization_level builds a fresh QuantizationConfig from the defaults, that row
and the bit / aq_bit overrides. Nothing carries over from an earlier call.

`config` is the only module-level mutable state. QModule (and a Q-layer built on its own)
copies it when it converts the model; changing `config` later does not touch models that
are already converted.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import aqcore
from aqcore import Level

PLAIN_BITS = (8, 4, 2, 1)
AQ_BITS = (1.0, 0.5, 0.25)


@dataclass
class QuantizationConfig:
    """What a converted model stores for backward.

    compress: quantize saved activations (False: keep them exact; masks/indices still compact).
    bit: target average bits per value (adaptive) or the one fixed level (1, 2, 4, 8).
    aq_bit: 0 (no AQ), or the lowest AQ level the allocator may use (1, 0.5, 0.25).
    adaptive: per-sample levels chosen by the solver (docs/frameworks.md); False: one level.
    per_layer: every 10th backward, re-split the budget across layers (docs/frameworks.md).
    convert_bn: convert BatchNorm layers (L1 keeps them stock).
    swap: move what is saved to CPU memory until backward (L4, L5, swap).
    expandable_segments: switch the CUDA caching allocator to expandable segments (L5).
    use_gradient: per-sample gradient memory over dataset indices (see actnn_aq.DataLoader).
    group_size: values per quantization group.
    guard: watch the gradients; after a bad step (non-finite, or far above the recent
        peak) bar the lowest precision (scheme.py, aqcore/guard.py).
    attention_bit: the level of the q, k, v that F.scaled_dot_product_attention keeps
        (8, 4 or 2; 32: exact), ops/attention.py; 8 by default: at 4, a small BERT at
        1.25 bits lost 2.3 points of held-out accuracy, at 8 0.2.
    """

    level: str = "L3"
    compress: bool = True
    bit: float = 2.0
    aq_bit: float = 0.0
    adaptive: bool = True
    per_layer: bool = True
    convert_bn: bool = True
    swap: bool = False
    expandable_segments: bool = False
    use_gradient: bool = False
    group_size: int = 256
    guard: bool = True
    attention_bit: int = 8

    @property
    def ladder(self) -> tuple[Level, ...]:
        """The levels the allocator chooses from: 8, 4, 2, 1 bits, then AQ down to aq_bit."""
        plain = tuple(aqcore.parse_level(b) for b in PLAIN_BITS)
        aq = tuple(aqcore.aq_level(a) for a in AQ_BITS if self.aq_bit and a >= self.aq_bit)
        return plain + aq

    @property
    def fixed_level(self) -> Level:
        """The one level of a non-adaptive config: `bit` bits, or AQ when bit == aq_bit."""
        if self.aq_bit and self.bit == self.aq_bit:
            return aqcore.aq_level(self.aq_bit)
        return aqcore.parse_level(self.bit)

    def validate(self) -> None:
        """ValueError if the fields do not describe something we can run."""
        if self.aq_bit not in (0, *AQ_BITS):
            raise ValueError(f"aq_bit must be 0 (off), 1, 0.5 or 0.25 (got {self.aq_bit!r})")
        if not self.compress:
            return
        if self.adaptive:
            low = self.aq_bit or 1
            if not low <= self.bit <= 8:
                raise ValueError(f"bit must lie in [{low:g}, 8] at level {self.level} with "
                                 f"aq_bit={self.aq_bit:g} (got {self.bit!r}); set aq_bit to go below 1")
        elif self.bit not in PLAIN_BITS and not (self.aq_bit and self.bit == self.aq_bit):
            raise ValueError(f"level {self.level} stores one fixed level: bit must be 1, 2, 4 or 8, "
                             f"or equal to aq_bit for AQ (got bit={self.bit!r}, aq_bit={self.aq_bit!r})")
        if self.attention_bit not in (8, 4, 2, 32):
            raise ValueError(f"attention_bit must be 8, 4, 2 or 32 (exact), got {self.attention_bit!r}")
        if not isinstance(self.group_size, int) or self.group_size < 32 or self.group_size % 32:
            raise ValueError(f"group_size must be a positive multiple of 32 (got {self.group_size!r})")


_FIXED = dict(adaptive=False, per_layer=False)
_OFF = dict(compress=False, **_FIXED)

# ActNN's levels and the AQ release's (docs/frameworks.md). The release's levels also emptied the
# CUDA cache in the middle of its split/concat copies ("remove_cache"); our one-buffer
# mixed-row format makes no such copies, so L3_ is L3. L3.1's cuDNN/cache/pipeline knobs
# tuned the same fragmentation and are not carried over either: L3.1 is L3.
LEVELS: dict[str, dict] = {
    "L0": _OFF,
    "L1": dict(bit=4, convert_bn=False, **_FIXED),
    "L2": dict(bit=4, **_FIXED),
    "L3": {},
    "L3.1": {},
    "L4": dict(swap=True),
    "L5": dict(swap=True, expandable_segments=True),
    "swap": dict(swap=True, **_OFF),
    "L3_": {},
    # The release's 'L3-aq1.0-1.5b' and 'L3-aq1.0-1.25b', extended to the published grid
    # of target bits x AQ precision.
    **{f"L3-aq{aq}-{bits:g}b": dict(bit=bits, aq_bit=aq) for aq in AQ_BITS for bits in (2, 1.5, 1.25, 1)},
}

config = QuantizationConfig()


def set_optimization_level(level: str, bit: float = 0, aq_bit: float = 0) -> QuantizationConfig:
    """Make `config` the defaults plus LEVELS[level], with bit / aq_bit (when non-zero)
    overriding the level's own. Returns `config`."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; valid: {', '.join(LEVELS)}")
    row = LEVELS[level]
    if not row.get("compress", True) and (bit or aq_bit):
        raise ValueError(f"level {level} does not compress; bit and aq_bit do not apply to it")
    fresh = replace(QuantizationConfig(), level=level, **row)
    if bit:
        fresh.bit = float(bit)
    if aq_bit:
        fresh.aq_bit = float(aq_bit)
    fresh.validate()
    for f in fields(fresh):
        setattr(config, f.name, getattr(fresh, f.name))
    return config


def snapshot() -> QuantizationConfig:
    """A validated copy of `config`, the one a model keeps from its conversion on."""
    config.validate()
    return replace(config)
