"""Convolution (1/2/3-d, transposed, grouped, dilated, any padding mode) and linear.

Forward is the exact torch op; only the input is kept, compressed, and only when the
weight needs a gradient (the input gradient needs the weight alone). Backward is
aten.convolution_backward / matmuls on the decompressed input (docs/frameworks.md),
in the dtype the forward computed in (autocast's), gradients cast back like autocast's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..saved import Packed, Plan, restore, save
from ..scheme import Observation
from ..sensitivity import mean_deviation, mean_deviation_price, run_gain

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class ConvSpec:
    """One convolution call, with padding made explicit: the input is F.pad-ed by pre_pad
    (None: not at all) in pad_mode, then convolved with integer padding."""

    dims: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    pre_pad: tuple[int, ...] | None = None
    pad_mode: str = "constant"

    def forward(self, x, weight, bias):
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        if self.transposed:
            return _CONV_T[self.dims](x, weight, bias, self.stride, self.padding, self.output_padding,
                                      self.groups, self.dilation)
        return _CONV[self.dims](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def padded_shape(self, shape: torch.Size) -> list[int]:
        sizes = list(shape)
        for i in range(len(self.pre_pad or ()) // 2):
            sizes[-1 - i] += self.pre_pad[2 * i] + self.pre_pad[2 * i + 1]
        return sizes

    def unpad_grad(self, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The gradient through F.pad: a crop for zeros, autograd of the pad for the other
        modes (it is linear, so it is taken at zeros)."""
        if self.pad_mode == "constant":
            return F.pad(grad, [-p for p in self.pre_pad])
        with torch.enable_grad():
            leaf = torch.zeros(shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
            return torch.autograd.grad(F.pad(leaf, self.pre_pad, mode=self.pad_mode), leaf, grad)[0]


def _keep(ctx, x: torch.Tensor, plan: Plan | None, *tensors) -> None:
    """Save x as the plan says (or not at all when plan is None) plus exact tensors."""
    ctx.held = Packed(x, plan) if plan is not None else None
    ctx.input_shape = x.shape
    ctx.input_dtype = x.dtype
    save(ctx, ctx.held.stored(x) if ctx.held is not None else None, *tensors)


class ConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: ConvSpec, plan: Plan | None, obs: Observation | None):
        y = spec.forward(x, weight, bias)
        _keep(ctx, x, plan, weight)
        ctx.spec, ctx.obs = spec, obs
        ctx.along_last = not spec.transposed and _innermost_is_last(x)
        ctx.means = None  # runs across channels: the deviation's means (sensitivity.py)
        if obs is not None and obs.full and not spec.transposed:
            runs = obs.scheme.controller.aq_runs
            if runs and not ctx.along_last:
                ctx.means = mean_deviation(x, runs, 1, spec.groups)
            if obs.measure:
                obs.scheme.controller.offer(y, _conv_weight_grad(spec, x.detach(), weight.detach()))
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        kept, weight = restore(ctx)
        spec = ctx.spec
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.obs is not None:
            price = None
            if ctx.means is not None:
                kernel = weight[0, 0].numel()
                price = lambda: mean_deviation_price(grad_out, ctx.means, 1, kernel, spec.groups)
            ctx.obs.backward(grad_out, gain=_gain(ctx, grad_out) if ctx.along_last else None, price=price)
        dtype = grad_out.dtype
        with torch.autocast(grad_out.device.type, enabled=False):
            if ctx.held is not None:
                x = ctx.held.unpack(kept).to(dtype)
                if spec.pre_pad is not None:
                    x = F.pad(x, spec.pre_pad, mode=spec.pad_mode)
            else:  # no weight gradient: convolution_backward reads only the input's sizes
                x = grad_out.new_empty(1).expand(spec.padded_shape(ctx.input_shape))
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad_out, x, weight.to(dtype), ctx.bias_sizes, spec.stride, spec.padding, spec.dilation,
                spec.transposed, spec.output_padding or [0] * spec.dims, spec.groups, [need_x, need_w, need_b])
            if gx is not None and spec.pre_pad is not None:
                gx = spec.unpad_grad(gx, ctx.input_shape)
        return (_cast(gx, ctx.input_dtype), _cast(gw, ctx.param_dtypes[0]), _cast(gb, ctx.param_dtypes[1]),
                None, None, None)


def _conv_weight_grad(spec: ConvSpec, x: torch.Tensor, weight: torch.Tensor):
    """g -> the weight gradient of this call for output gradient g, float32 (Controller.offer)."""
    def weight_grad(g: torch.Tensor) -> torch.Tensor:
        with torch.autocast(g.device.type, enabled=False):
            inp = x.float() if spec.pre_pad is None else F.pad(x.float(), spec.pre_pad, mode=spec.pad_mode)
            return torch.ops.aten.convolution_backward(
                g.float(), inp, weight.float(), None, spec.stride, spec.padding, spec.dilation, False,
                [0] * spec.dims, spec.groups, [False, True, False])[1]
    return weight_grad


def _linear_weight_grad(x: torch.Tensor):
    """g -> g^T x over all leading dims, float32 (Controller.offer)."""
    def weight_grad(g: torch.Tensor) -> torch.Tensor:
        with torch.autocast(g.device.type, enabled=False):
            return g.reshape(-1, g.shape[-1]).float().t().mm(x.reshape(-1, x.shape[-1]).float())
    return weight_grad


def _innermost_is_last(x: torch.Tensor) -> bool:
    """Whether x's memory order runs along its last dim (a conv's last spatial dim: NCHW,
    not channels_last), so that an AQ run of k values meets neighbouring outputs."""
    sized = [d for d in range(x.dim()) if x.shape[d] > 1]
    return x.dim() > 2 and bool(sized) and min(sized, key=lambda d: x.stride(d)) == x.dim() - 1


def _gain(ctx, grad_out: torch.Tensor):
    """The run gain of the ladder's AQ levels (sensitivity.run_gain), computed on demand."""
    runs = ctx.obs.scheme.controller.aq_runs
    if not runs:
        return None
    return lambda: run_gain(grad_out.detach(), runs, ctx.spec.stride[-1])


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class LinearFunction(torch.autograd.Function):
    """y = x W^T + b for inputs of any rank (the original handled 2-D only, docs/frameworks.md)."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: Plan | None, obs: Observation | None):
        y = F.linear(x, weight, bias)
        _keep(ctx, x, plan, weight)
        ctx.obs = obs
        runs = obs.scheme.controller.aq_runs if obs is not None and obs.full and x.dim() > 1 else []
        ctx.means = mean_deviation(x, runs, -1) if runs else None  # runs cross the features
        if obs is not None and obs.measure:
            obs.scheme.controller.offer(y, _linear_weight_grad(x.detach()))
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        kept, weight = restore(ctx)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.obs is not None:
            price = None
            if ctx.means is not None:
                price = lambda: mean_deviation_price(grad_out, ctx.means, -1, 1)
            ctx.obs.backward(grad_out, price=price)
        dtype = grad_out.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gx = gw = gb = None
        with torch.autocast(grad_out.device.type, enabled=False):
            if need_x:
                gx = g.mm(weight.to(dtype)).view(ctx.input_shape)
            if need_w:
                x = ctx.held.unpack(kept).to(dtype)
                gw = g.t().mm(x.reshape(-1, x.shape[-1]))
            if need_b:
                gb = g.sum(0)
        return (_cast(gx, ctx.input_dtype), _cast(gw, ctx.param_dtypes[0]), _cast(gb, ctx.param_dtypes[1]),
                None, None)
