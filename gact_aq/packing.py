"""The saved-tensor hooks: what is compressed, deduplication, and what the graph holds.

pack(x) runs when autograd saves x for backward and returns what the graph keeps instead;
unpack(...) runs when backward needs x. Policy (ALGORITHMS.md C.3, fixed per section F):

* floating activations (fp32/fp16/bf16, ndim >= 2, at least `min_numel` values) that
  require grad are compressed at the level the plan gives their tensor id;
* bool tensors (dropout masks on CUDA) and, on CPU, two-valued {0, c} float tensors that do
  not require grad (CPU dropout saves its mask as floats) are packed at 1 bit, losslessly;
* everything else is kept as it is: parameters, buffers and views or casts of them (autocast's
  weight copies), leaves, tensors that do not require grad (SDPA's logsumexp, batch
  statistics: their exactness matters), integers, tiny tensors.

A tensor saved several times (same storage, offset, shape, strides, dtype, version) is
compressed once: every save returns a reference to the same Unit. The graph owns the Units,
so a Unit is freed when the last node that saved it has run (or the graph is freed), and
retain_graph / a second unpack just decompress again. Nothing is kept between iterations.
"""
from __future__ import annotations

import abc

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef

import aqcore
from aqcore import CompressedTensor, Level

from .swap import Swapped, Swapper

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# grad_fn types that only view or cast their input: a chain of them ending in AccumulateGrad
# means the tensor is a parameter (or leaf) in disguise, e.g. autocast's bf16 weight copy
_VIEW_OR_CAST = frozenset({
    "AliasBackward0", "AsStridedBackward0", "CloneBackward0", "ExpandBackward0",
    "NumpyTBackward0", "PermuteBackward0", "ReshapeAliasBackward0", "SelectBackward0",
    "SliceBackward0", "SplitBackward0", "SplitWithSizesBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "TBackward0", "ToCopyBackward0", "TransposeBackward0",
    "UnbindBackward0", "UnsafeViewBackward0", "UnsqueezeBackward0", "ViewBackward0",
})

FLOAT, MASK, SCALED_MASK = "float", "mask", "scaled_mask"


def derives_from_leaf(x: torch.Tensor, max_depth: int = 8) -> bool:
    """Whether x is a leaf, or a view / cast of one (walking grad_fn, no data access)."""
    node = x.grad_fn
    for _ in range(max_depth):
        if node is None:
            return True
        name = type(node).__name__
        if name == "AccumulateGrad":
            return True
        if name not in _VIEW_OR_CAST:
            return False
        node = next((fn for fn, _ in node.next_functions if fn is not None), None)
    return False


def _two_valued_scale(x: torch.Tensor) -> Optional[float]:
    """c if every value of x is 0 or c (a CPU dropout mask), else None. CPU only: on CUDA
    the scan would synchronize, and CUDA dropout saves bool masks anyway."""
    if x.device.type != "cpu":
        return None
    top = x.max()
    if not torch.isfinite(top) or top <= 0 or not ((x == 0) | (x == top)).all():
        return None
    return top.item()


def classify(x: torch.Tensor, min_numel: int,
             protected: "set[StorageWeakRef]") -> tuple[Optional[str], float]:
    """(FLOAT, MASK or SCALED_MASK, the mask's nonzero value) for what is compressed,
    (None, 1.0) for what is kept as it is. protected: the storages of the model's
    parameters and buffers."""
    keep = (None, 1.0)
    if x.layout != torch.strided or x.numel() < min_numel:
        return keep
    if StorageWeakRef(x.untyped_storage()) in protected:
        return keep
    if x.dtype == torch.bool:
        return MASK, 1.0
    if x.dtype not in FLOAT_DTYPES:
        return keep
    if not x.requires_grad:
        scale = _two_valued_scale(x)
        return keep if scale is None else (SCALED_MASK, scale)
    if x.dim() < 2 or derives_from_leaf(x):
        return keep
    return FLOAT, 1.0


@dataclass(eq=False)
class Unit:
    """One saved activation as the graph holds it (shared by all saves of the tensor)."""

    tid: Optional[int]          # position in the save order (float units only)
    kind: str
    shape: torch.Size
    dtype: torch.dtype
    level: Optional[Level]
    data: "CompressedTensor | Swapped"
    scale: float = 1.0          # SCALED_MASK: the nonzero value

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def swapped(self) -> bool:
        return isinstance(self.data, Swapped)

    def restore(self) -> torch.Tensor:
        ct = Swapper.restore(self.data) if self.swapped else self.data
        x = aqcore.decompress(ct)
        if self.kind == SCALED_MASK:
            return x.to(self.dtype) * self.scale
        return x


class Plan(abc.ABC):
    """Which level and seed a float unit gets; the Controller swaps plans between passes."""

    @abc.abstractmethod
    def level(self, tid: int, x: torch.Tensor) -> Level: ...

    @abc.abstractmethod
    def seed(self, tid: int) -> int: ...


class Tracer:
    """Watches the saves and unpacks of one pass (sensitivity estimation). While
    `bypass` is true, saves are left as they are and not shown to it."""

    bypass = False

    def on_pack(self, x: torch.Tensor, unit: Optional[Unit], new: bool) -> None:
        """Every save: x exact, unit None when x is kept as it is."""

    def on_unpack(self, unit: Unit) -> Optional[torch.Tensor]:
        """Every unpack of a unit; a tensor returned is used instead of the stored one."""
        return None


class Packer:
    """The pack / unpack pair of one Controller."""

    def __init__(self, min_numel: int, group_size: int, compress: bool, swap: bool) -> None:
        self.min_numel = min_numel
        self.group_size = group_size
        self.compress = compress
        self.swapper = Swapper() if swap else None
        self.plan: Optional[Plan] = None
        self.tracer: Optional[Tracer] = None
        self.protected: set[StorageWeakRef] = set()
        self.seen: list[torch.Size] = []         # shapes of this pass's float units, by tid
        self.units: "weakref.WeakSet[Unit]" = weakref.WeakSet()
        self._dedup: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
        self._next_tid = 0
        self._backward_seen = False

    def new_pass(self) -> None:
        """Restart tensor ids (a new forward)."""
        self._next_tid = 0
        self._backward_seen = False
        self.seen = []
        self._dedup = weakref.WeakValueDictionary()

    def pack(self, x: torch.Tensor):
        if self.tracer is not None and self.tracer.bypass:
            return x
        if self._backward_seen and not _in_backward():
            self.new_pass()
        kind, scale = classify(x, self.min_numel, self.protected) if self.active else (None, 1.0)
        unit, new = None, False
        if kind is not None:
            key = _dedup_key(x)
            unit = self._dedup.get(key)
            if unit is None:
                unit, new = self._make_unit(x, kind, scale), True
                self._dedup[key] = unit
                self.units.add(unit)
        if self.tracer is not None:
            self.tracer.on_pack(x, unit, new)
        if unit is None:
            return x
        return unit if x.shape == unit.shape else (unit, x.shape)

    def unpack(self, packed):
        self._backward_seen = True
        if isinstance(packed, torch.Tensor):
            return packed
        unit, shape = packed if isinstance(packed, tuple) else (packed, None)
        x = self.tracer.on_unpack(unit) if self.tracer is not None else None
        if x is None:
            x = unit.restore()
        return x if shape is None else x.view(shape)

    @property
    def active(self) -> bool:
        return self.compress or self.swapper is not None

    def _make_unit(self, x: torch.Tensor, kind: str, scale: float) -> Unit:
        tid, level = None, None
        if kind == MASK:
            ct = aqcore.pack_mask(x)
        elif kind == SCALED_MASK:
            ct = aqcore.pack_mask(x != 0)
        else:
            tid = self._next_tid
            self._next_tid += 1
            level = self.plan.level(tid, x) if self.compress else aqcore.parse_level("32")
            ct = aqcore.compress(x, level, seed=self.plan.seed(tid), group_size=self.group_size)
            self.seen.append(x.shape)
        data = self.swapper.offload(ct) if self.swapper is not None else ct
        return Unit(tid, kind, x.shape, x.dtype, level, data, scale)


def _dedup_key(x: torch.Tensor) -> tuple:
    """Identity of a saved tensor. Contiguous tensors are keyed by extent, so x and a view
    of it with another shape share one unit. The storage is held weakly: its address
    cannot be reused while the key lives, and an expired key never matches."""
    storage = StorageWeakRef(x.untyped_storage())
    layout = (x.numel(),) if x.is_contiguous() else (tuple(x.shape), x.stride())
    return storage, x.storage_offset(), layout, x.dtype, x._version


def _in_backward() -> bool:
    """Whether autograd's engine is running (saves during backward: reentrant checkpoint)."""
    return torch._C._current_graph_task_id() != -1
