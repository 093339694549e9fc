"""Fused attention (F.scaled_dot_product_attention) keeping q, k, v compressed.

The fused kernels save q, k, v, their output O and the row log-sum-exp L, and their
backward rebuilds the probabilities as exp(q k^T s - L): from compressed q, k but exact
L the rows no longer sum to one and the gradient can be off by orders of magnitude
(docs/frameworks.md, "What a saved tensor's producer decides"). So this op keeps only
q, k, v (compressed at config.attention_bit, an attention mask exact) and its backward
runs the attention forward again on the decompressed inputs, then its backward: the exact
gradient of attention at the stored inputs, as for every other layer. With dropout, the
random state of the forward is restored around the recomputation, as activation
checkpointing does, so the same positions are dropped.

`routed(controller)` sends every F.scaled_dot_product_attention call made inside it
(transformers' SDPA attention, nn.MultiheadAttention's fast path excepted) through this op.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import get_device_states, set_device_states

from ..saved import Packed, Plan, restore, save

ATTENTION_LAYER = 1 << 20  # seed keys of attention calls, apart from the Q-layers' indices


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, options: dict, plan: Plan):
        ctx.rng = (torch.get_rng_state(), *get_device_states(q, k, v)) \
            if options.get("dropout_p", 0.0) > 0 else None
        out = _SDPA(q, k, v, attn_mask=attn_mask, **options)
        ctx.held = [Packed(t, plan) for t in (q, k, v)]
        save(ctx, *(h.stored(t) for h, t in zip(ctx.held, (q, k, v))), attn_mask)
        ctx.options = options
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        *stored, attn_mask = restore(ctx)
        inputs = [h.unpack(s).detach().requires_grad_(need)
                  for h, s, need in zip(ctx.held, stored, ctx.needs_input_grad[:3])]
        replay = ctx.rng is not None  # the forward's random state, as activation checkpointing does
        with torch.enable_grad(), torch.random.fork_rng(devices=ctx.rng[1] if replay else [], enabled=replay):
            if replay:
                cpu_state, devices, states = ctx.rng
                torch.set_rng_state(cpu_state)
                set_device_states(devices, states)
            out = _SDPA(*inputs, attn_mask=attn_mask, **ctx.options)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
        return (*(next(grads) if t.requires_grad else None for t in inputs), None, None, None)


_SDPA = F.scaled_dot_product_attention


@contextlib.contextmanager
def routed(plan_for) -> Iterator[None]:
    """Inside: F.scaled_dot_product_attention stores q, k, v as plan_for(call index) says
    (call index: the order of the calls in this forward). Calls that need no gradient, or
    with a mask that needs one, run the plain function."""
    calls = iter(range(1 << 62))

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **more):
        options = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, **more)
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in (query, key, value)) \
                or (attn_mask is not None and attn_mask.requires_grad):
            return _SDPA(query, key, value, attn_mask=attn_mask, **options)
        return AttentionFunction.apply(query, key, value, attn_mask, options, plan_for(next(calls)))

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA

