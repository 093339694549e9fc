"""Max-pool keeping only each output's argmax offset within its window; avg-pool keeping nothing.

torch's max_pool2d finds the argmax (so dilation, padding and ceil_mode are torch's own);
we store where it sits inside its window, kh * kW + kw, in the smallest integer type that
holds kH * kW offsets (uint8 up to 256: 1 byte per output instead of 8), and rebuild the
flat indices for aten.max_pool2d_with_indices_backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _offset_dtype(window: int) -> torch.dtype:
    if window <= 256:
        return torch.uint8
    return torch.int16 if window <= 1 << 15 else torch.int32


def _window_starts(out_size: int, stride: int, padding: int, device) -> torch.Tensor:
    return torch.arange(out_size, device=device) * stride - padding


class MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode: bool):
        y, index = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        width = x.shape[-1]
        row, col = index // width, index % width
        rows0 = _window_starts(y.shape[-2], stride[0], padding[0], x.device).view(-1, 1)
        cols0 = _window_starts(y.shape[-1], stride[1], padding[1], x.device)
        offset = ((row - rows0) // dilation[0]) * kernel[1] + (col - cols0) // dilation[1]
        ctx.save_for_backward(offset.to(_offset_dtype(kernel[0] * kernel[1])))
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        ctx.input_shape, ctx.width = x.shape, width
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        kernel, stride, padding, dilation, ceil_mode = ctx.args
        (offset,) = ctx.saved_tensors
        offset = offset.long()
        kh, kw = offset // kernel[1], offset % kernel[1]
        rows0 = _window_starts(grad_out.shape[-2], stride[0], padding[0], grad_out.device).view(-1, 1)
        cols0 = _window_starts(grad_out.shape[-1], stride[1], padding[1], grad_out.device)
        index = (rows0 + kh * dilation[0]) * ctx.width + cols0 + kw * dilation[1]
        shape_only = grad_out.new_empty(1).expand(ctx.input_shape)  # read for its sizes only
        grad = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out, shape_only, kernel, stride, padding, dilation, ceil_mode, index)
        return grad, None, None, None, None, None


class AvgPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, ceil_mode: bool, count_include_pad: bool, divisor_override):
        ctx.args = (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
        ctx.input_shape = x.shape
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        shape_only = grad_out.new_empty(1).expand(ctx.input_shape)  # read for its sizes only
        grad = torch.ops.aten.avg_pool2d_backward(grad_out, shape_only, *ctx.args)
        return grad, None, None, None, None, None, None
