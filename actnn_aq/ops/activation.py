"""ReLU and dropout (a 1-bit mask), GELU and SiLU (the input, compressed).

ReLU keeps the mask "y <= 0", what torch's threshold_backward tests, so NaN inputs pass
their gradient through as in torch.
Dropout runs aten.native_dropout (what F.dropout runs, same RNG draws) and keeps its mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import aqcore

from ..saved import Packed, Plan, restore, save
from ..scheme import Observation
from ..sensitivity import gelu_noise, silu_noise


class ReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inplace: bool):
        y = torch.relu_(x) if inplace else torch.relu(x)
        if inplace:
            ctx.mark_dirty(x)
        save(ctx, aqcore.pack_mask(y <= 0))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        zeroed = aqcore.decompress(*restore(ctx))
        return torch.where(zeroed, 0, grad_out), None  # one pass, in grad_out's layout


class DropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, inplace: bool):
        y, mask = torch.native_dropout(x, p, True)
        save(ctx, aqcore.pack_mask(mask))
        ctx.scale = 1.0 / (1.0 - p)
        if inplace:
            ctx.mark_dirty(x)
            return x.copy_(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        mask = aqcore.decompress(*restore(ctx))
        return torch.ops.aten.native_dropout_backward(grad_out, mask, ctx.scale), None, None


def _pointwise_forward(ctx, x, y_fn, inplace: bool, plan: Plan, obs: Observation | None):
    """y = y_fn(x) keeping x as planned (a copy when exact and x is about to be overwritten)."""
    source = x.clone() if inplace and plan.exact else x
    ctx.held = Packed(source, plan)
    save(ctx, ctx.held.stored(source))
    ctx.obs = obs
    if inplace:
        ctx.mark_dirty(x)
        return x.copy_(y_fn(x))
    return y_fn(x)


def _pointwise_input(ctx, grad_out, noise_fn) -> torch.Tensor:
    """The decompressed input; records the observation (no weights: noise only)."""
    (kept,) = restore(ctx)
    x = ctx.held.unpack(kept)
    if ctx.obs is not None:
        ctx.obs.backward(grad_out, lambda: noise_fn(grad_out, x))
    return x


class GELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approximate: str, plan: Plan, obs: Observation | None):
        ctx.approximate = approximate
        return _pointwise_forward(ctx, x, lambda t: F.gelu(t, approximate=approximate), False, plan, obs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x = _pointwise_input(ctx, grad_out, gelu_noise)
        return torch.ops.aten.gelu_backward(grad_out, x, approximate=ctx.approximate), None, None, None


class SiLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inplace: bool, plan: Plan, obs: Observation | None):
        return _pointwise_forward(ctx, x, F.silu, inplace, plan, obs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x = _pointwise_input(ctx, grad_out, silu_noise)
        return torch.ops.aten.silu_backward(grad_out, x), None, None, None
