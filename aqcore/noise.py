"""Counter-based rounding noise, identical on every device.

The uniform noise of stochastic rounding is a hash of (seed, code index), not the state
of a generator, so the CUDA kernels and this reference produce the same bytes and a
compressed tensor can be checked or decompressed anywhere (DESIGN.md section 2).

    key(seed, hi) = mix32(seed_lo ^ mix32(seed_hi ^ mix32(hi ^ 0x9E3779B9)))
    u(seed, i)    = (mix32(i_lo ^ key(seed, i_hi)) >> 8) * 2**-24        in [0, 1)

mix32 is the "lowbias32" integer finalizer (Wellons): xorshift-multiply rounds.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B
GOLDEN = 0x9E3779B9


def mix32_int(x: int) -> int:
    """mix32 on a Python int (for per-call constants)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_MUL1) & MASK32
    x ^= x >> 15
    x = (x * MIX_MUL2) & MASK32
    x ^= x >> 16
    return x


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 in int64, without signed overflow."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """mix32 on an int64 tensor holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_MUL2)
    return x ^ (x >> 16)


def stream_key(seed: int, hi: int = 0) -> int:
    """The per-2**32-block key of a seed (a Python int, computed once per block)."""
    seed &= (1 << 64) - 1
    inner = mix32_int((seed >> 32) ^ mix32_int(hi ^ GOLDEN))
    return mix32_int((seed & MASK32) ^ inner)


def uniform(seed: int, index: torch.Tensor, index_bound: int) -> torch.Tensor:
    """Uniform noise in [0, 1) as float32, one value per int64 code index < index_bound."""
    lo = index & MASK32
    if index_bound > 1 << 32:
        hi = index >> 32
        keys = {h: stream_key(seed, h) for h in hi.unique().tolist()}
        key = torch.zeros_like(index)
        for h, k in keys.items():
            key = torch.where(hi == h, k, key)
    else:
        key = stream_key(seed)
    h = mix32(lo ^ key)
    return (h >> 8).to(torch.float32) * (2.0 ** -24)
