"""The saved-tensor hooks: what is compressed, deduplication, and what the graph holds.

pack(x) runs when autograd saves x for backward and returns what the graph keeps instead;
unpack(...) runs when backward needs x. Policy (docs/frameworks.md; the published rules
and what we changed):

* floating activations (fp32/fp16/bf16, ndim >= 2) that require grad get a tensor id in
  save order, and are compressed at the level the plan gives that id when they hold at
  least `min_numel` values (ids do not depend on sizes, so a smaller backprop() batch
  sees the same ids as training);
* what the producer's own backward does with its saved output decides what a level may
  do to it: a ReLU output keeps its exact zero pattern (its backward tests result > 0:
  1-bit and AQ levels become their zero-keeping forms, aqcore.zero_safe), a log-softmax
  output is kept exact (its backward exponentiates it: an error e scales a probability
  by exp(e)), and a fused attention's output and normalizer are recomputed from its
  stored q, k, v in backward instead of stored (attention.py);
* an activation that is a cheap function of what its producer saves (a LayerNorm, GELU,
  SiLU, BatchNorm output, a product) is not stored but recomputed when its consumer's
  backward needs it (derived.py);
* bool tensors (dropout masks on CUDA) and, on CPU, two-valued {0, c} float tensors that do
  not require grad (CPU dropout saves its mask as floats) are packed at 1 bit, losslessly;
* a cast of a leaf (autocast's bf16 / fp16 copy of a weight) or a view of one is not held:
  the graph keeps the leaf, which it holds anyway, and unpack casts it again, bit for bit
  (leaf_cast, Recast); a leaf modified in place in between raises, as autograd does;
* everything else is kept as it is: parameters, buffers and other views or casts of them,
  leaves, tensors that do not require grad (SDPA's logsumexp, batch statistics: their
  exactness matters), integers, tiny tensors.

A tensor saved several times (same storage, offset, shape, strides, dtype, version) is
compressed once: every save returns a reference to the same Unit. The graph owns the Units,
so a Unit is freed when the last node that saved it has run (or the graph is freed), and
retain_graph / a second unpack just decompress again. Nothing is kept between iterations.
"""
from __future__ import annotations

import abc

import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef

import aqcore
from aqcore import CompressedTensor, Level

from . import attention, derived
from .derived import Derived
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

# producers whose backward reads their own saved output nonlinearly (docstring above)
KEEP_RESULT = frozenset({"LogSoftmaxBackward0"})
ZERO_RESULT = frozenset({"ReluBackward0", "ThresholdBackward0", "ThresholdBackward1"})

FLOAT, ZEROS, MASK, SCALED_MASK, RECAST = "float", "zeros", "mask", "scaled_mask", "recast"
FLOAT_KINDS = (FLOAT, ZEROS)
EXACT = aqcore.parse_level("32")


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


def leaf_cast(x: torch.Tensor) -> Optional[torch.Tensor]:
    """The leaf that x is a dtype cast of (or a view of such a cast), when casting the leaf
    again gives x's bytes exactly: the cast is untouched since (version 0), on the leaf's
    device and in its layout. Autocast saves these: its low-precision weight copies, as they
    are or transposed (F.linear saves weight.t())."""
    cast = x if x._base is None else x._base
    node = cast.grad_fn
    if node is None or type(node).__name__ != "ToCopyBackward0" or cast._version != 0:
        return None
    source = node.next_functions[0][0]
    if type(source).__name__ != "AccumulateGrad":
        return None
    leaf = source.variable
    same_layout = (cast.shape == leaf.shape and cast.stride() == leaf.stride()
                   and cast.storage_offset() == 0 and cast.device == leaf.device)
    return leaf if same_layout and x.dtype == cast.dtype else None


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
    """(FLOAT or ZEROS, 1.0) for an activation (compressed if it has min_numel values),
    (MASK or SCALED_MASK, the mask's nonzero value) for a mask of min_numel values,
    (RECAST, 1.0) for a cast of a leaf (leaf_cast), (None, 1.0) for what is kept as it is.
    protected: the storages of the model's parameters and buffers."""
    keep = (None, 1.0)
    if x.layout != torch.strided or x.numel() == 0:
        return keep
    if StorageWeakRef(x.untyped_storage()) in protected:
        return keep
    if x.dtype == torch.bool:
        return (MASK, 1.0) if x.numel() >= min_numel else keep
    if x.dtype not in FLOAT_DTYPES:
        return keep
    if not x.requires_grad:
        scale = _two_valued_scale(x) if x.numel() >= min_numel else None
        return keep if scale is None else (SCALED_MASK, scale)
    if leaf_cast(x) is not None:
        return RECAST, 1.0
    if x.dim() < 2 or derives_from_leaf(x):
        return keep
    producer = type(x.grad_fn).__name__
    if producer in KEEP_RESULT:
        return keep
    return (ZEROS if producer in ZERO_RESULT else FLOAT), 1.0


@dataclass(eq=False)
class Unit:
    """One saved activation as the graph holds it (shared by all saves of the tensor)."""

    tid: Optional[int]          # position in the save order (float units only)
    kind: str                   # FLOAT, ZEROS (exact zeros kept), MASK or SCALED_MASK
    shape: torch.Size
    dtype: torch.dtype
    level: Optional[Level]
    data: "CompressedTensor | Swapped"
    scale: float = 1.0          # SCALED_MASK: the nonzero value
    memory_format: Optional[torch.memory_format] = None  # stored in logical order (AQ)

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
        if self.memory_format is not None:
            return x.contiguous(memory_format=self.memory_format)
        return x


class Recast:
    """What the graph holds for a cast of a leaf: the leaf, its version, and where x lay in
    the cast. Restoring casts the leaf again (the cast is deterministic: the same bytes), so
    the copy, half a weight's size for every weight under autocast, is not held. Several
    saves of one cast (autocast caches a weight's cast for its region) all hold nothing."""

    nbytes = 0

    def __init__(self, leaf: torch.Tensor, x: torch.Tensor) -> None:
        self.leaf, self.version, self.dtype = leaf, leaf._version, x.dtype
        self.view = (x.shape, x.stride(), x.storage_offset())

    def restore(self) -> torch.Tensor:
        leaf = self.leaf
        if leaf._version != self.version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: [{leaf.type()} {list(leaf.shape)}] is at version "
                f"{leaf._version}; expected version {self.version} instead. gact_aq holds no "
                f"{self.dtype} copy of this leaf (autocast's cast of a weight) but casts it "
                f"again in backward: modify parameters only after backward")
        cast = torch.empty_strided(leaf.shape, leaf.stride(), dtype=self.dtype, device=leaf.device)
        cast.copy_(leaf.detach())
        return cast.as_strided(*self.view)


class Recomputed:
    """What the graph holds for a fused attention's output: nothing (attention.py)."""

    nbytes = 0


class Plan(abc.ABC):
    """Which level and seed a float unit gets; the Controller swaps plans between passes.
    A ZEROS unit stores aqcore.zero_safe of the level given. Units under min_numel values
    are kept as they are, unless the plan measures (sensitivity passes measure them all)."""

    measures = False

    @abc.abstractmethod
    def level(self, tid: int, x: torch.Tensor, zeros: bool) -> Level: ...

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
        self.kinds: list[str] = []               # FLOAT or ZEROS of this pass's units, by tid
        self.derived_numel = 0                   # values of this pass recomputed, not stored
        self._dedup: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
        self._next_tid = 0
        self._backward_seen = False
        self._attention = attention.Rebuild()
        self._attention_seen = False
        self.after_backward: Optional[Callable[[], None]] = None  # end of each backward
        self._backward_task: Optional[int] = None

    def new_pass(self) -> None:
        """Restart tensor ids (a new forward)."""
        self._next_tid = 0
        self._backward_seen = False
        self.seen = []
        self.kinds = []
        self.derived_numel = 0
        self._dedup = weakref.WeakValueDictionary()
        self._attention = attention.Rebuild()

    def pack(self, x: torch.Tensor):
        if self.tracer is not None and self.tracer.bypass:
            return x
        if self._backward_seen and not _in_backward():
            self.new_pass()
        if self.active and self.compress and _attention_output(x):
            self._attention_seen = True
            return Recomputed()
        kind, scale = classify(x, self.min_numel, self.protected) if self.active else (None, 1.0)
        if kind == RECAST:
            if self.tracer is not None:
                self.tracer.on_pack(x, None, False)
            return Recast(leaf_cast(x), x)
        unit, new = None, False
        if kind is not None:
            key = _dedup_key(x)
            unit = self._dedup.get(key)
            if unit is None:
                producer = derived.producer_of(x) if kind in FLOAT_KINDS and self.compress else None
                if producer is not None:
                    unit = Derived(producer, x)
                    self.derived_numel += x.numel()
                else:
                    unit = self._make_unit(x, kind, scale)
                    self.units.add(unit)
                new = True
                self._dedup[key] = unit
            if isinstance(unit, Derived):
                if self.tracer is not None:
                    self.tracer.on_pack(x, None, False)
                return unit
        if self.tracer is not None:
            self.tracer.on_pack(x, unit, new)
        if unit is None:
            return x.detach()  # x itself: an output saved by its own node would hold that node
        return unit if x.shape == unit.shape else (unit, x.shape)

    def unpack(self, packed):
        self._backward_seen = True
        if self.after_backward is not None:
            self._queue_after_backward()
        if self._attention_seen:
            node = torch._C._current_autograd_node()
            if node is not None and type(node).__name__ in attention.NODES:
                return self._attention.unpack(node, packed, self._restore)
        return self._restore(packed)

    def _queue_after_backward(self) -> None:
        """Run after_backward once per backward pass, after every callback queued before it
        has run (DDP's gradient reduction queues one), by queueing it from a callback."""
        task = torch._C._current_graph_task_id()
        if task == self._backward_task or task == -1:
            return
        self._backward_task = task
        engine = torch.autograd.Variable._execution_engine
        callback = self.after_backward
        engine.queue_callback(lambda: engine.queue_callback(callback))

    def _restore(self, packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, Derived):
            return packed.value()
        if isinstance(packed, Recast):
            return packed.restore()
        if isinstance(packed, Recomputed):
            raise RuntimeError("gact_aq: a fused attention output was unpacked outside its "
                               "own backward node")
        unit, shape = packed if isinstance(packed, tuple) else (packed, None)
        x = self.tracer.on_unpack(unit) if self.tracer is not None else None
        if x is None:
            x = unit.restore()
        return x if shape is None else x.view(shape)

    @property
    def active(self) -> bool:
        return self.compress or self.swapper is not None

    def _make_unit(self, x: torch.Tensor, kind: str, scale: float) -> Unit:
        tid, level, memory_format = None, None, None
        if kind == MASK:
            ct = aqcore.pack_mask(x)
        elif kind == SCALED_MASK:
            ct = aqcore.pack_mask(x != 0)
        else:
            tid = self._next_tid
            self._next_tid += 1
            level = EXACT
            if self.compress and (x.numel() >= self.min_numel or self.plan.measures):
                level = self.plan.level(tid, x, kind == ZEROS)
                level = aqcore.zero_safe(level) if kind == ZEROS else level
            source, memory_format = (channel_major(x), _layout(x)) if level.is_aq else (x.detach(), None)
            ct = aqcore.compress(source, level, seed=self.plan.seed(tid), group_size=self.group_size)
            self.seen.append(x.shape)
            self.kinds.append(kind)
        data = self.swapper.offload(ct) if self.swapper is not None else ct
        return Unit(tid, kind, x.shape, x.dtype, level, data, scale, memory_format)


def held_units(packed) -> list[Unit]:
    """The units a packed object reads when restored (a derived tensor: its sources')."""
    if isinstance(packed, tuple):
        packed = packed[0]
    if isinstance(packed, Unit):
        return [packed]
    if isinstance(packed, Derived):
        return [unit for source in packed.sources for unit in held_units(source)]
    return []


def _layout(x: torch.Tensor) -> Optional[torch.memory_format]:
    """The channels-last format x is in (channels innermost in memory), or None."""
    if x.is_contiguous():
        return None
    for dims, layout in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.dim() == dims and x.is_contiguous(memory_format=layout):
            return layout
    return None


def channel_major(x: torch.Tensor) -> torch.Tensor:
    """x in the order AQ averages: channels-last tensors copied to their logical order, so
    that a run is neighbouring positions of one channel (in memory order it would mix
    neighbouring channels: measured 10x the error); others as they are."""
    return x.contiguous() if _layout(x) is not None else x


def _dedup_key(x: torch.Tensor) -> tuple:
    """Identity of a saved tensor. Contiguous tensors are keyed by extent, so x and a view
    of it with another shape share one unit. The storage is held weakly: its address
    cannot be reused while the key lives, and an expired key never matches."""
    storage = StorageWeakRef(x.untyped_storage())
    layout = (x.numel(),) if x.is_contiguous() else (tuple(x.shape), x.stride())
    return storage, x.storage_offset(), layout, x.dtype, x._version


def _attention_output(x: torch.Tensor) -> bool:
    """Whether this save is a fused attention node saving its own output (its output slot
    is still empty while it does; a later save of the same tensor elsewhere is not)."""
    node = x.grad_fn
    return (node is not None and type(node).__name__ in attention.NODES
            and attention.recognised(node) and node._raw_saved_output.data is None)


def _in_backward() -> bool:
    """Whether autograd's engine is running (saves during backward: reentrant checkpoint)."""
    return torch._C._current_graph_task_id() != -1
