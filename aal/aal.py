"""Auxiliary activation learning (docs/aal.md).

ARA (auxiliary residual activation): inside a residual segment a block's input is close
to the segment's first activation plus the residual branches added since, so a
`Conv2d_ARA` computes its weight gradient from that shared activation (the ARA) instead
of its own input, and stores nothing about its input. One stored ARA serves every conv of
the segment; `Distribute_ARA` starts the next segment.

ASA (auxiliary sign activation): `Linear_ASA` adds a small sign activation eps*sign(x) to
its input in the forward pass and trains its weight from that sign, so it stores one bit
per input value.

Unlike the release, the ARA travels as an ordinary tensor (no fake gradients through
autograd), so the chain needs no detached start, may branch, and the conv bias argument
is honoured.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import aqcore


def learning_indicator(auxiliary: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Per sample sum a(2x - a) / (sum x^2 + 1e-6): 1 when the auxiliary activation a equals
    the actual x, lower as it drifts (docs/aal.md, "The learning indicator")."""
    a, x = auxiliary.flatten(1).float(), actual.flatten(1).float()
    return (a * (2 * x - a)).sum(1) / (x.square().sum(1) + 1e-6)


class _ConvWithAuxiliaryInput(torch.autograd.Function):
    """conv2d(x, w, b) whose weight gradient is taken with `auxiliary` in place of x."""

    @staticmethod
    def forward(ctx, x, auxiliary, weight, bias, stride, padding, groups):
        ctx.save_for_backward(auxiliary, weight)
        ctx.conv = dict(stride=stride, padding=padding, groups=groups)
        ctx.input_shape = x.shape
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, **ctx.conv)

    @staticmethod
    def backward(ctx, grad):
        auxiliary, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad, **ctx.conv)
        if ctx.needs_input_grad[2]:
            grad_w = torch.nn.grad.conv2d_weight(auxiliary.to(grad.dtype), weight.shape, grad,
                                                 **ctx.conv)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, None, grad_w, grad_b, None, None, None


class Conv2d_ARA(nn.Conv2d):
    """A Conv2d trained from the segment's ARA: `y, ARA = conv(x, ARA)`.

    The ARA must have the shape of this conv's input. With get_li, `self.li` holds the
    per-sample learning indicator of the last forward.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 groups: int = 1, bias: bool = False, get_li: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=padding, groups=groups, bias=bias)
        self.get_li = get_li
        self.li: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ARA: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ARA.shape != x.shape:
            raise ValueError(f"ARA of shape {tuple(ARA.shape)} does not match the conv input "
                             f"{tuple(x.shape)}; distribute a new ARA where shapes change")
        if self.get_li:
            self.li = learning_indicator(ARA, x).detach()
        if not (torch.is_grad_enabled() and self.training):
            return super().forward(x), ARA
        y = _ConvWithAuxiliaryInput.apply(x, ARA.detach(), self.weight, self.bias,
                                          self.stride, self.padding, self.groups)
        return y, ARA


class Distribute_ARA(nn.Module):
    """Ends a segment: `x, ARA = distribute(x, ARA)` makes x the next segment's ARA."""

    def forward(self, x: torch.Tensor, ARA: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class _LinearWithSign(torch.autograd.Function):
    """y = (x + eps*a) W^T + b with a = sign activation; stores a as a 1-bit mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon, lr_expansion, relu):
        positive = x > 0
        negative = 0.0 if relu else -1.0
        auxiliary = torch.where(positive, 1.0, negative).to(x.dtype)
        ctx.mask = aqcore.pack_mask(positive)
        ctx.save_for_backward(weight)
        ctx.scale, ctx.negative = epsilon * lr_expansion, negative
        return F.linear(x + epsilon * auxiliary, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight.to(grad.dtype)
        if ctx.needs_input_grad[1]:
            positive = aqcore.decompress(ctx.mask)
            auxiliary = torch.where(positive, 1.0, ctx.negative).to(grad.dtype)
            grad_w = ctx.scale * grad.flatten(0, -2).t() @ auxiliary.flatten(0, -2)
        if ctx.needs_input_grad[2]:
            grad_b = grad.flatten(0, -2).sum(0)
        return grad_x, grad_w, grad_b, None, None, None


class Linear_ASA(nn.Linear):
    """A Linear trained from the sign of its input (1 bit stored per input value).

    The forward adds epsilon*sign(x) (+1 for x > 0, else -1, or 0 with relu=True) to the
    input on purpose; the weight gradient is (epsilon*sign)^T g scaled by lr_expansion.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 get_li: bool = False, relu: bool = False, epsilon: float = 0.01,
                 lr_expansion: float = 100.0):
        super().__init__(in_features, out_features, bias=bias)
        self.get_li, self.relu = get_li, relu
        self.epsilon, self.lr_expansion = epsilon, lr_expansion
        self.li: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.get_li:
            negative = 0.0 if self.relu else -1.0
            auxiliary = torch.where(x > 0, 1.0, negative).to(x.dtype)
            self.li = learning_indicator(auxiliary, x).detach()
        return _LinearWithSign.apply(x, self.weight, self.bias, self.epsilon,
                                     self.lr_expansion, self.relu)


Linear_asa = Linear_ASA  # the spelling used in the seed README's example
