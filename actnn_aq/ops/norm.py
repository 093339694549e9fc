"""BatchNorm, SyncBatchNorm and LayerNorm: input compressed, statistics kept exact.

Forward runs the op torch.nn runs (so outputs and running-stat updates are identical);
backward is the aten backward of that op on the decompressed input with the exact saved
mean / inverse std (docs/frameworks.md, "What each layer keeps"). SyncBatchNorm's
synchronised path is plain tensor math plus collectives, so it runs on CPU (gloo) as well
as CUDA.

Batch norms compress their input normalized, (x - mean) * invstd with the exact batch
statistics, and rebuild x from it in backward. Backward reads the input only through
xhat, and stored raw a channel's error is set by the range of its quantization group:
in channels_last a group of 256 values spans many channels, so a channel of small
variance gets the noise of the widest one, times its invstd (16 channels with standard
deviations 1e-3..1 at 2 bits: input gradient 489x its norm off, 0.6% in NCHW); and a
channel whose mean is large against its spread loses it to the bfloat16 group bounds.
Normalized, every channel's error is relative to its own spread.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..saved import EXACT, Packed, Plan, restore, save
from ..scheme import LayerScheme, Observation
from ..sensitivity import batch_norm_noise, layer_norm_noise, norm_coef


def _keep(ctx, x: torch.Tensor, plan: Plan, *tensors) -> None:
    ctx.held = Packed(x, plan)
    save(ctx, ctx.held.stored(x), *tensors)


def _sample_numel(x: torch.Tensor) -> int:
    return x[0].numel() if x.dim() > 1 else x.numel()


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


def _keep_normalized(ctx, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                     scheme: LayerScheme | None, *tensors) -> Observation | None:
    """Plan and keep a batch norm's input: normalized when it is compressed (module
    docstring), x itself otherwise. Returns the observation of the plan."""
    ctx.normalized = scheme is not None and scheme.controller.config.compress
    if scheme is None:
        plan, obs = EXACT, None
    elif not ctx.normalized:
        plan, obs = scheme.plan(x, batch_norm=True)
    else:
        shape = _channel_shape(x)
        stored = torch.addcmul((-mean * invstd).view(shape), x, invstd.view(shape)).to(x.dtype)
        plan, obs = scheme.plan(stored, batch_norm=True, produced=x, invstd=invstd)
        x = stored
    _keep(ctx, x, plan, mean, invstd, *tensors)
    ctx.input_dtype = x.dtype
    if obs is not None:  # errors are priced on what is stored: xhat when normalized
        numel = _sample_numel(x)
        obs.coef = 1.0 / max(numel, 1) if ctx.normalized else norm_coef(numel, invstd)
    return obs


def _unpack_normalized(ctx, kept: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """The input again (x = xhat / invstd + mean, in its dtype and layout)."""
    stored = ctx.held.unpack(kept)
    if not ctx.normalized:
        return stored
    shape = _channel_shape(stored)
    return torch.addcmul(mean.view(shape), stored, invstd.reciprocal().view(shape)).to(ctx.input_dtype)


class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float,
                scheme: LayerScheme | None):
        y, mean, invstd, reserve, backend = torch.ops.aten._batch_norm_impl_index(
            x, weight, bias, running_mean, running_var, True, momentum, eps, torch.backends.cudnn.enabled)
        ctx.obs = _keep_normalized(ctx, x, mean, invstd, scheme, weight, reserve)
        ctx.eps, ctx.cudnn = eps, backend == CUDNN
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        kept, mean, invstd, weight, reserve = restore(ctx)
        x = _unpack_normalized(ctx, kept, mean, invstd)
        if ctx.obs is not None:
            ctx.obs.backward(grad_out, lambda: batch_norm_noise(grad_out, x, mean, invstd, weight,
                                                                normalized=ctx.normalized))
        if ctx.cudnn:  # cuDNN's backward, as autograd would run it (3x faster than native)
            grad_out = grad_out.contiguous(memory_format=_memory_format(x))
            gx, gw, gb = torch.ops.aten.cudnn_batch_norm_backward(
                x, grad_out, weight, None, None, mean, invstd, ctx.eps, reserve)
        else:
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]))
        return gx, gw, gb, None, None, None, None, None


CUDNN = 1  # _batch_norm_impl_index's backend number for cuDNN


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2)))


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch statistics over all ranks of `group`. Local mean and M2 per channel are
    all-gathered and merged (Chan et al.'s parallel variance), as exact as one big batch;
    backward all-reduces (sum dy, sum dy*(x - mean)) like torch's SyncBatchNorm."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, group,
                scheme: LayerScheme | None):
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = x.numel() // x.shape[1]
        local_mean = xf.mean(dims) if count else xf.new_zeros(x.shape[1])
        local_m2 = (xf - _channel_view(local_mean, x)).square().sum(dims)
        local = torch.cat([local_mean, local_m2, xf.new_tensor([count])])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        means, m2s, counts = torch.stack(gathered).split([x.shape[1], x.shape[1], 1], dim=1)
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        m2 = (m2s + counts * (means - mean).square()).sum(0)
        invstd = torch.rsqrt(m2 / total + eps)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = m2 / (total - 1).clamp_min(1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        y = (xf - _channel_view(mean, x)) * _channel_view(invstd, x)
        if weight is not None:
            y = y * _channel_view(weight.float(), x)
        if bias is not None:
            y = y + _channel_view(bias.float(), x)
        out_dtype = x.dtype
        ctx.obs = _keep_normalized(ctx, x, mean, invstd, scheme, weight)
        ctx.total, ctx.group = total.item(), group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        kept, mean, invstd, weight = restore(ctx)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x = _unpack_normalized(ctx, kept, mean, invstd)
        dims = [0, *range(2, x.dim())]
        g = grad_out.float()
        xmu = x.float() - _channel_view(mean, x)
        sum_dy = g.sum(dims)
        sum_dy_xmu = (g * xmu).sum(dims)
        gw = (sum_dy_xmu * invstd).to(weight.dtype) if need_w else None
        gb = sum_dy.to(ctx.bias_dtype) if need_b else None
        gx = None
        if need_x:
            both = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(both, group=ctx.group)
            sum_dy, sum_dy_xmu = both.chunk(2)
            scale = invstd if weight is None else invstd * weight.float()
            gx = (g - _channel_view(sum_dy / ctx.total, x)
                  - xmu * _channel_view(invstd.square() * sum_dy_xmu / ctx.total, x))
            gx = (gx * _channel_view(scale, x)).to(x.dtype)
        if ctx.obs is not None:
            ctx.obs.backward(grad_out, lambda: batch_norm_noise(grad_out, x, mean, invstd, weight,
                                                                sum_dy_xmu, ctx.total, ctx.normalized))
        return gx, gw, gb, None, None, None, None, None, None


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps: float, plan: Plan, obs: Observation | None):
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
        _keep(ctx, x, plan, weight, bias, mean, rstd)
        ctx.normalized_shape, ctx.obs = normalized_shape, obs
        ctx.input_dtype = x.dtype
        if obs is not None:
            obs.coef = norm_coef(_sample_numel(x), rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        kept, weight, bias, mean, rstd = restore(ctx)
        x = ctx.held.unpack(kept).to(grad_out.dtype)
        if ctx.obs is not None:
            ctx.obs.backward(grad_out, lambda: layer_norm_noise(grad_out, x, mean, rstd, weight,
                                                                len(ctx.normalized_shape)))
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        with torch.autocast(grad_out.device.type, enabled=False):
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                grad_out, x, ctx.normalized_shape, mean, rstd, weight, bias, mask)
        if gx is not None:
            gx = gx.to(ctx.input_dtype)
        return gx, None, gw, gb, None, None, None
