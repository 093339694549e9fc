"""gact_aq under autocast: the low-precision weight copies autocast saves are not held but
cast again from the parameter in backward (packing.leaf_cast, packing.Recast) (CPU)."""
import contextlib
import math
from typing import Iterator, Optional

import pytest
import torch
from torch import nn

import gact_aq
from gact_aq import packing, settings
from gact_aq.controller import Controller
from gact_aq.packing import Recast

DTYPES = [torch.bfloat16, torch.float16]


class Attention(nn.Module):
    """A small HF-style self-attention block: q, k, v and output projections, explicit
    softmax(q k^T / sqrt(d)) v (matmuls of activations), residual and LayerNorm."""

    def __init__(self, width: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        b, n, w = x.shape

        def split(t):
            return t.view(b, n, self.heads, w // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(w // self.heads)
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
        return self.norm(x + self.out(context))


def problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), Attention(64),
                          nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 8))
    return model, torch.randn(4, 16, 32)


def no_recast(monkeypatch) -> None:
    """gact_aq as before: autocast's weight copies kept as they are."""
    monkeypatch.setattr(packing, "leaf_cast", lambda x: None)


def gradients(model: nn.Module, x: torch.Tensor, dtype: torch.dtype,
              level: Optional[str] = None) -> list[torch.Tensor]:
    """Parameter gradients of one step under autocast, with a Controller at level (or none)."""
    model.zero_grad()
    with Controller(model, settings.build_config(level)) if level else contextlib.nullcontext():
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        out.float().square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def packed_objects(root) -> Iterator[object]:
    """What the graph from root holds for backward: each saved slot's packed object."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_raw_saved_"):
                slots = getattr(node, name)
                for slot in slots if isinstance(slots, (tuple, list)) else (slots,):
                    if slot is not None and slot.data is not None:
                        yield slot.data
        stack.extend(fn for fn, _ in node.next_functions)


def held_bytes(out: torch.Tensor, model: nn.Module) -> int:
    """Bytes the graph of out holds, each storage or unit once, the parameters left out
    (the model holds them anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = {}
    for packed in packed_objects(out.grad_fn):
        packed = packed[0] if isinstance(packed, tuple) else packed
        if isinstance(packed, torch.Tensor):
            storage = packed.untyped_storage()
            if storage.data_ptr() not in params:
                held[storage.data_ptr()] = storage.nbytes()
        else:
            held[id(packed)] = packed.nbytes
    return sum(held.values())


def weight_copies(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the low-precision copies of the weights the Linear layers save: all but
    the first layer's (its input needs no gradient, so its weight is not saved)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)][1:]
    return sum(m.weight.numel() for m in linears) * dtype.itemsize


def test_what_autocast_saves_for_a_linear_layer():
    """F.linear saves weight.t(), a view of autocast's cast of the parameter, cached for
    the region: two uses save one cast, and both are recast from the parameter."""
    lin = nn.Linear(32, 48)
    saved = []
    x = torch.randn(8, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x), lin(x * 2)
    weights = [t for t in saved if t.shape == (32, 48)]
    assert len(weights) == 2 and weights[0].untyped_storage().data_ptr() == \
        weights[1].untyped_storage().data_ptr()
    w = weights[0]
    assert w.dtype == torch.bfloat16 and type(w.grad_fn).__name__ == "TBackward0"
    assert type(w._base.grad_fn).__name__ == "ToCopyBackward0"
    assert all(packing.leaf_cast(t) is lin.weight for t in weights)
    assert packing.leaf_cast(saved[0]) is x  # the input: a leaf here, cast too
    assert torch.equal(Recast(lin.weight, w).restore(), w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_are_bit_identical_with_the_recast(dtype, monkeypatch):
    model, x = problem()
    exact = gradients(model, x, dtype)
    assert all(torch.equal(a, b) for a, b in zip(exact, gradients(model, x, dtype, "swap")))
    compressed = gradients(model, x, dtype, "L1.2")
    no_recast(monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(compressed, gradients(model, x, dtype, "L1.2")))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_weight_copies_are_not_held(dtype, monkeypatch):
    model, x = problem()
    held = {}
    for recast in (True, False):
        if not recast:
            no_recast(monkeypatch)
        with Controller(model, settings.build_config("L1.2")) as ctl, \
                torch.autocast("cpu", dtype=dtype):
            out = model(x)
            held[recast] = held_bytes(out, model), ctl.report().nbytes
            assert any(isinstance(p, Recast) for p in packed_objects(out.grad_fn)) == recast
        out.float().sum().backward()
    assert held[False][0] - held[True][0] == weight_copies(model, dtype) > 0
    assert held[False][1] == held[True][1]  # the report counts compressed tensors only


def test_a_parameter_modified_between_forward_and_backward_raises():
    model, x = problem()
    weight = model[-1].weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x.requires_grad_()).float().sum()
    with torch.no_grad():
        weight.mul_(2)  # fine without gact_aq: autograd holds its own bf16 copy
    loss.backward()
    gact_aq.set_optimization_level("L1.2")
    with Controller(model), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().sum()
        loss.backward(retain_graph=True)  # a second unpack casts again
        with torch.no_grad():
            weight.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation.*is at version"):
            loss.backward()
    # the same as autograd's own check on a saved fp32 parameter
    loss = model(x).sum()
    with torch.no_grad():
        weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation.*is at version"):
        loss.backward()


def test_without_autocast_nothing_changes(monkeypatch):
    model, x = problem()
    x.requires_grad_()
    held, grads = {}, {}
    for recast in (True, False):
        if not recast:
            no_recast(monkeypatch)
        model.zero_grad()
        with Controller(model, settings.build_config("L1.2")):
            out = model(x)
            held[recast] = held_bytes(out, model)
            assert not any(isinstance(p, Recast) for p in packed_objects(out.grad_fn))
            out.square().mean().backward()
        grads[recast] = [p.grad.clone() for p in model.parameters()]
    assert held[True] == held[False] > 0
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))
