"""Activations that need not be stored: cheap functions of what their producer stores.

A LayerNorm output that the next linear layer saves is a function of the LayerNorm's own
saved input and exact statistics; so is a GELU / SiLU output (of the saved GELU / SiLU
input), a BatchNorm output in training mode, and a product (SwiGLU's up * silu(gate),
of the two saved factors). Storing such a tensor a second time, compressed or not, buys
nothing: when its consumer's backward needs it, it is recomputed from the producer's
saved tensors, which are still alive then (backward reaches the consumer before the
producer). What the consumer gets is the function of the stored (compressed) input, as
the producer's own backward sees it.

This holds whole tensors of a transformer block out of storage (the normalised inputs of
the attention and MLP projections, the MLP's activation output: 6 of about 15 values per
token and channel in a BERT or Llama block), so at the same memory the tensors that are
stored get correspondingly more bits. The memory target counts the recomputed tensors
too (at zero bits).

A derived tensor is recognised at pack time from its grad_fn: a producer of FORMULAS,
reached through view and dtype-cast nodes only (autocast's copies), with every input it
needs saved. Its value at unpack: the formula, cast and reshaped like the saved tensor.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

# nodes that only reshape or cast: a derived tensor may be saved through a chain of them
RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                      "ToCopyBackward0"})


def saved(node, name: str):
    """A saved tensor of node (unpacked through the hooks that packed it)."""
    return getattr(node, f"_saved_{name}")


def _layer_norm(node) -> torch.Tensor:
    x = saved(node, "input")
    y = (x.float() - saved(node, "result1")) * saved(node, "result2")
    weight, bias = saved(node, "weight"), saved(node, "bias")
    y = y * weight if weight is not None else y
    return (y + bias if bias is not None else y).to(x.dtype)


def _batch_norm(node, invstd: str) -> torch.Tensor:
    x = saved(node, "input")
    view = (1, -1, *([1] * (x.dim() - 2)))
    y = (x.float() - saved(node, "result1").view(view)) * saved(node, invstd).view(view)
    weight, bias = saved(node, "weight"), saved(node, "bias")
    y = y * weight.view(view) if weight is not None else y
    return (y + bias.view(view) if bias is not None else y).to(x.dtype)


FORMULAS: dict[str, tuple[tuple[str, ...], Callable]] = {
    # node type: (saved float inputs it reads, the output from the node)
    "NativeLayerNormBackward0": (("input",), _layer_norm),
    "GeluBackward0": (("self",), lambda n: F.gelu(saved(n, "self"), approximate=n._saved_approximate)),
    "SiluBackward0": (("self",), lambda n: F.silu(saved(n, "self"))),
    "MulBackward0": (("self", "other"), lambda n: saved(n, "self") * saved(n, "other")),
    "NativeBatchNormBackward0": (("input",), lambda n: _batch_norm(n, "result2")),
}


class Derived:
    """What the graph holds for a tensor recomputed at unpack: its producer and form."""

    nbytes = 0

    def __init__(self, producer, like: torch.Tensor) -> None:
        self.producer = producer
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.sources = tuple(getattr(producer, f"_raw_saved_{name}").data
                             for name in FORMULAS[type(producer).__name__][0])

    def value(self) -> torch.Tensor:
        with torch.no_grad():
            y = FORMULAS[type(self.producer).__name__][1](self.producer)
        return y.to(self.device, self.dtype).reshape(self.shape)


def producer_of(x: torch.Tensor) -> Optional[object]:
    """The FORMULAS node x is a (reshaped, cast) output of, if its inputs are all saved."""
    if not x.is_contiguous() or x.grad_fn is None:
        return None
    node = x.grad_fn
    while type(node).__name__ in RESHAPES:
        node = node.next_functions[0][0]
        if node is None:
            return None
    entry = FORMULAS.get(type(node).__name__)
    if entry is None or (type(node).__name__ == "NativeBatchNormBackward0" and not node._saved_training):
        return None
    slots = [getattr(node, f"_raw_saved_{name}", None) for name in entry[0]]
    if any(slot is None or slot.data is None for slot in slots):
        return None
    return node
