"""Counter-based rounding noise, identical on every device.

The uniform noise of stochastic rounding is a hash of (seed, code index), not the state
of a generator, so the CUDA kernels and this reference produce the same bytes and a
compressed tensor can be checked or decompressed anywhere (docs/format.md).

One 32-bit hash serves the two codes of a pair (index i and its neighbour i ^ 1), 16 bits
each: the hash is the costliest part of compressing a code, and 16 bits of noise are far
finer than any level's step. With p = i >> 1 (the pair):

    key(seed, hi) = mix32(seed_lo ^ mix32(seed_hi ^ mix32(hi ^ 0x9E3779B9)))
    h(seed, p)    = mix32(p_lo ^ key(seed, p_hi))
    u(seed, i)    = (half + 0.5) * 2**-16 in (0, 1),  half = h >> 16 (i even), h & 0xFFFF (i odd)

p_lo, p_hi: the low and high 32 bits of p; tensors of at most 2**33 code slots use key(seed,
0) throughout. The + 0.5 centres each of the 2**16 values in its cell, so the rounding
floor(t + u) has expectation t to within 2**-17 of a step (without it, up to 2**-16 low).
mix32 is the "lowbias32" integer finalizer (Wellons): xorshift-multiply rounds.
"""
from __future__ import annotations

from typing import Sequence

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


def mix32(x: torch.Tensor) -> torch.Tensor:
    """mix32 on an int32 tensor holding the 32-bit values (two's complement).

    torch's int32 multiply wraps modulo 2**32 on every backend, which is the unsigned
    product's low word; right shifts are masked to make them logical.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _signed32(MIX_MUL1)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _signed32(MIX_MUL2)
    return x ^ ((x >> 16) & 0xFFFF)


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def stream_key(seed: int, hi: int = 0) -> int:
    """The per-2**32-block key of a seed (a Python int, computed once per block)."""
    seed &= (1 << 64) - 1
    inner = mix32_int((seed >> 32) ^ mix32_int(hi ^ GOLDEN))
    return mix32_int((seed & MASK32) ^ inner)


def _pair_hash(seed: int, pair: torch.Tensor, index_bound: int) -> torch.Tensor:
    """h(seed, p) as int32 for int64 pair indices p."""
    lo = (pair & MASK32).to(torch.int32)
    if index_bound > 1 << 33:
        hi = pair >> 32
        key = torch.zeros_like(lo)
        for h in hi.unique().tolist():
            key = torch.where(hi == h, _signed32(stream_key(seed, h)), key)
    else:
        key = _signed32(stream_key(seed))
    return mix32(lo ^ key)


def _to_unit(half: torch.Tensor) -> torch.Tensor:
    return (half.to(torch.float32) + 0.5) * (2.0 ** -16)


def uniform(seed: int, index: torch.Tensor, index_bound: int) -> torch.Tensor:
    """Uniform noise in (0, 1) as float32, one value per code index < index_bound (int64,
    or int32 when index_bound <= 2**31)."""
    h = _pair_hash(seed, index.long() >> 1, index_bound)
    half = torch.where((index & 1) == 0, (h >> 16) & 0xFFFF, h & 0xFFFF)
    return _to_unit(half)


def row_uniform(seed: int, starts: Sequence[int], width: int, index_bound: int,
                device: "torch.device | str" = "cpu") -> torch.Tensor:
    """uniform(seed, starts[:, None] + arange(width), index_bound) as (rows, width), hashing
    each pair once (half the work of uniform on the same indices)."""
    first = torch.tensor([start >> 1 for start in starts], device=device)
    pairs = first.unsqueeze(1) + torch.arange(width // 2 + 2, device=device)
    h = _pair_hash(seed, pairs, index_bound)
    halves = torch.stack([(h >> 16) & 0xFFFF, h & 0xFFFF], -1).view(len(starts), -1)
    if not any(start & 1 for start in starts):
        return _to_unit(halves[:, :width])
    shift = torch.tensor([start & 1 for start in starts], device=device)
    return _to_unit(halves.gather(1, shift.unsqueeze(1) + torch.arange(width, device=device)))
