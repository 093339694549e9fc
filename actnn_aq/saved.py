"""How a Q-layer keeps a tensor for backward: exact, compressed through aqcore, or in CPU memory.

Exact tensors go through ctx.save_for_backward (autograd's version check stays on); the
others are copies held on the ctx. All bit-packing and quantization is aqcore's.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, fields
from typing import Sequence, Union

import torch

import aqcore
from aqcore import CompressedTensor, Level
from aqcore.format import TENSOR_FIELDS

LevelChoice = Union[Level, Sequence[Level], None]


@dataclass(frozen=True)
class Allocation:
    """Levels per sample chosen on the device (aqcore.compress_allocated): the ladder, the
    weights S_n, the target bits, the errors e_n(l) (N, len(ladder)), and the layer's budget
    in bytes when it has a share of its own."""

    ladder: tuple[Level, ...]
    weights: torch.Tensor
    bits: float
    errors: torch.Tensor
    budget: int | None = None


@dataclass(frozen=True)
class Plan:
    """How one call of a layer stores its input.

    level: one level, one level per sample (row of dim 0), or None: keep the tensor exact
    unless `allocation` chooses levels per sample.
    swap: hold what is stored in (pinned) CPU memory until backward.
    """

    level: LevelChoice = None
    seed: int = 0
    group_size: int = 256
    swap: bool = False
    allocation: Allocation | None = None

    @property
    def exact(self) -> bool:
        return self.level is None and self.allocation is None


EXACT = Plan()


def seed_for(*keys: int) -> int:
    """A 63-bit rounding seed from integer keys (iteration, layer, rank): a hash, so nearby
    keys give unrelated noise (the published GACT reused seeds across tensors,
    docs/frameworks.md)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(keys)}q", *keys), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Copy to CPU; from CUDA the non-blocking copy lands in pinned memory."""
    return t.to("cpu", non_blocking=True)


class Packed:
    """What one call keeps of a tensor, and how to get the tensor back."""

    def __init__(self, x: torch.Tensor, plan: Plan):
        self.device = x.device
        self.shape = x.shape
        self._data: CompressedTensor | torch.Tensor | None = None
        if not plan.exact:
            if plan.allocation is not None:
                a = plan.allocation
                rows = x if x.dim() > 1 else x.reshape(1, -1)
                ct, _ = aqcore.compress_allocated(rows, a.ladder, a.weights, a.bits, plan.seed,
                                                  plan.group_size, a.errors, a.budget)
            else:
                ct = aqcore.compress(x, plan.level, seed=plan.seed, group_size=plan.group_size)
            self._data = ct.to("cpu", non_blocking=True) if plan.swap and x.device.type != "cpu" else ct
        elif plan.swap and x.device.type != "cpu":
            self._data = _to_host(x)
        data = self._data
        self.nbytes = data.nbytes if isinstance(data, CompressedTensor) else \
            0 if data is None else data.numel() * data.element_size()  # held beside x; 0: x itself

    def stored(self, x: torch.Tensor) -> StoredItem:
        """What to hand to save() (x itself when nothing was copied); Packed keeps no
        reference to it, so autograd alone decides when it is freed."""
        data, self._data = self._data, None
        return x if data is None else data

    def unpack(self, stored: StoredItem) -> torch.Tensor:
        """The tensor back on its device (decompressed); stored: what stored() gave, restored."""
        data = stored if stored.device == self.device else stored.to(self.device, non_blocking=True)
        return aqcore.decompress(data).view(self.shape) if isinstance(data, CompressedTensor) else data


StoredItem = Union[torch.Tensor, CompressedTensor, None]


def save(ctx, *items: StoredItem) -> None:
    """ctx.save_for_backward for tensors and compressed tensors alike. A compressed tensor's
    own tensors go to autograd, which frees them once their backward has run (unless
    retain_graph) and raises its usual error on a second backward, as for any saved
    tensor; ctx keeps only its other fields, which rebuild it."""
    flat, rests = [], []
    for item in items:
        compressed = isinstance(item, CompressedTensor)
        rests.append({f.name: getattr(item, f.name) for f in fields(item) if f.name not in TENSOR_FIELDS}
                     if compressed else None)
        flat += item.tensors if compressed else (item,)
    ctx.saved_rests = rests
    ctx.save_for_backward(*flat)


def restore(ctx) -> list[StoredItem]:
    """The items given to save(), in order."""
    saved = iter(ctx.saved_tensors)
    return [next(saved) if rest is None else
            CompressedTensor(**rest, **{name: next(saved) for name in TENSOR_FIELDS})
            for rest in ctx.saved_rests]
