"""Fused attention under compression: its backward reads what the stored q, k, v give.

The fused kernels behind F.scaled_dot_product_attention (flash and memory-efficient on
CUDA, cuDNN, flash on the CPU) save q, k, v, their output O and the row log-sum-exp L of
the scores, and their backward rebuilds the probabilities as P = exp(q k^T s - L) and uses
D = rowsum(dO * O). With q, k, v stored compressed but L and O exact, the rebuilt rows no
longer sum to one and an error d in a score multiplies P by e^d: measured on a small
Llama, one 2-bit q makes the gradient 10^5 times too large, and even 4 bits give 50%
error (docs/frameworks.md).

So O and L are not stored: at unpack they are recomputed from the decompressed q, k, v
by the same kernel (forward, no gradient), and the backward is the exact gradient of
attention at the stored inputs, as for every other op (a linear layer's weight gradient
is exact at its stored input). With dropout the recomputation replays the kernel's own
random stream (the seed and offset it saved) on CUDA. O is often also the input of the
next projection; that save is a separate tensor (a transposed copy) or, when it is the
same tensor, compressed as usual.

A node type here is recognised by the name of its autograd node; `recompute` returns
(O, L) for it. Anything else stays as it was saved.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

Recompute = Callable[[object, torch.Tensor, torch.Tensor, torch.Tensor], tuple]


def _scalar(node, name: str, default=None):
    return getattr(node, f"_saved_{name}", default)


def _cpu_flash(node, q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, _scalar(node, "is_causal"), attn_mask=_scalar(node, "attn_mask"),
        scale=_scalar(node, "scale"))[:2]


def _cuda_flash(node, q, k, v):
    with _replayed_dropout(node):
        result = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, _scalar(node, "dropout_p"), _scalar(node, "is_causal"), False,
            scale=_scalar(node, "scale"))
    return result[0], result[1]


def _efficient(node, q, k, v):
    with _replayed_dropout(node):
        result = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, _scalar(node, "attn_bias"), True, _scalar(node, "dropout_p"),
            _scalar(node, "is_causal"), scale=_scalar(node, "scale"))
    return result[0], result[1]


def _cudnn(node, q, k, v):
    with _replayed_dropout(node):
        result = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, _scalar(node, "attn_bias"), True, _scalar(node, "dropout_p"),
            _scalar(node, "is_causal"), False, scale=_scalar(node, "scale"))
    return result[0], result[1]


@contextlib.contextmanager
def _replayed_dropout(node):
    """With dropout, run the kernel on the random stream position it used in forward (the
    philox seed and offset it saved: rng_state for flash, philox_seed / philox_offset for
    the others); the generator's state is put back afterwards."""
    if not _scalar(node, "dropout_p"):
        yield
        return
    if _scalar(node, "rng_state") is not None:  # flash: one (seed, offset) uint64 pair
        seed, offset = _scalar(node, "rng_state").view(torch.int64).tolist()
    else:
        seed, offset = int(_scalar(node, "philox_seed")), int(_scalar(node, "philox_offset"))
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    state = generator.get_state()
    generator.manual_seed(seed)
    generator.set_offset(offset)
    try:
        yield
    finally:
        generator.set_state(state)


# node type -> (recompute, name of the saved log-sum-exp)
NODES: dict[str, tuple[Recompute, str]] = {
    "ScaledDotProductFlashAttentionForCpuBackward0": (_cpu_flash, "logsumexp"),
    "ScaledDotProductFlashAttentionBackward0": (_cuda_flash, "logsumexp"),
    "ScaledDotProductEfficientAttentionBackward0": (_efficient, "log_sumexp"),
    "ScaledDotProductCudnnAttentionBackward0": (_cudnn, "logsumexp"),
}
INPUTS = ("query", "key", "value")


def recognised(node) -> bool:
    """Whether node is a fused attention whose output and normalizer can be recomputed."""
    entry = NODES.get(type(node).__name__)
    return entry is not None and all(
        hasattr(node, f"_raw_saved_{name}") for name in (*INPUTS, "output", entry[1]))


class Rebuild:
    """Serves the output and normalizer slots of a fused attention node's backward from one
    recomputation per node call, with the q, k, v the node itself unpacks (kept for the
    call, so nothing is decompressed twice)."""

    def __init__(self) -> None:
        self._inputs: tuple = ()                 # the packed q, k, v of the call in progress
        self._values: dict[int, torch.Tensor] = {}
        self._pending: set[int] = set()          # recomputed slots not yet served

    def unpack(self, node, packed, restore: Callable[[object], torch.Tensor]) -> torch.Tensor:
        recompute, lse_name = NODES[type(node).__name__]
        inputs = tuple(getattr(node, f"_raw_saved_{name}").data for name in INPUTS)
        if len(inputs) != len(self._inputs) or any(a is not b for a, b in zip(inputs, self._inputs)):
            self._reset(inputs)
        if id(packed) in self._values:
            return self._serve(id(packed))
        outputs = (node._raw_saved_output.data, getattr(node, f"_raw_saved_{lse_name}").data)
        if all(packed is not slot for slot in outputs):
            value = restore(packed)
            if any(packed is slot for slot in inputs):
                self._values[id(packed)] = value
            return value
        q, k, v = (self._values.get(id(slot)) for slot in inputs)
        q, k, v = (restore(slot) if value is None else value
                   for slot, value in zip(inputs, (q, k, v)))
        with torch.no_grad():
            out, lse = recompute(node, q, k, v)
        self._values.update({id(outputs[0]): out, id(outputs[1]): lse})
        self._pending = {id(outputs[0]), id(outputs[1])}
        return self._serve(id(packed))

    def _serve(self, key: int) -> torch.Tensor:
        value = self._values[key]
        self._pending.discard(key)
        if not self._pending:  # the call has what it needs: drop every reference
            self._reset(())
        return value

    def _reset(self, inputs: tuple) -> None:
        self._inputs = inputs
        self._values = {}
        self._pending = {-1}  # nothing recomputed yet: keep the inputs until then
