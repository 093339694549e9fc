"""actnn_aq keeps fused attention's q, k, v compressed (ops/attention.py): the backward
recomputes attention from what is stored, so it is the exact gradient at the stored
inputs; dropout drops the same positions; what is held shrinks."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actnn_aq
from actnn_aq.ops.attention import routed
from actnn_aq.saved import EXACT


class Attention(nn.Module):
    def __init__(self, width=64, heads=4, dropout=0.0, causal=True):
        super().__init__()
        self.heads, self.dropout, self.causal = heads, dropout, causal
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


def grads_of(model, x, g, seed=0):
    model.zero_grad()
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    model(x).backward(g)
    return [x.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention_gradients_match_exact_at_8_bits_and_degrade_gracefully(dropout):
    torch.manual_seed(0)
    ref = Attention(dropout=dropout)
    x, g = torch.randn(4, 32, 64), torch.randn(4, 32, 64)
    exact = grads_of(ref, x, g)
    errors = {}
    for bits in (8, 4, 2):
        actnn_aq.set_optimization_level("L2", bit=8)
        actnn_aq.config.attention_bit = bits
        q = actnn_aq.QModule(copy.deepcopy(ref))
        got = grads_of(q, x, g)
        errors[bits] = max(float((a - b).norm() / b.norm()) for a, b in zip(got, exact))
    assert errors[8] < 0.02 and errors[8] < errors[4] < errors[2] < 0.6


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recomputed_attention_is_torch_s_own_and_a_second_backward_fails_like_torch(dropout):
    """Stored exact, the recomputing backward gives torch's gradients, dropout included
    (the forward's random state is replayed)."""
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 4, 16, 8)
    results = []
    for route in (contextlib.nullcontext(), routed(lambda call: EXACT)):
        torch.manual_seed(5)
        with route:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        results.append((out, torch.autograd.grad(out, (q, k, v), g, retain_graph=True)))
    (out_ref, grads_ref), (out, grads) = results
    assert torch.equal(out, out_ref)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ref))
    torch.autograd.grad(out, (q, k, v), g)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(out, (q, k, v), g)


def test_q_k_v_are_held_compressed():
    torch.manual_seed(0)
    model = Attention()
    x = torch.randn(8, 64, 64, requires_grad=True)
    sizes = []
    for setting in (32, 4):
        actnn_aq.set_optimization_level("L2", bit=4)
        actnn_aq.config.attention_bit = setting
        q = actnn_aq.QModule(copy.deepcopy(model))
        held = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            q(x)
        sizes.append(sum(held))
    qkv_bytes = 3 * x.numel() * 4
    assert sizes[0] - sizes[1] > 0.8 * qkv_bytes  # q, k, v at 4 bits instead of 32


def test_attention_bit_is_validated():
    actnn_aq.config.attention_bit = 3
    with pytest.raises(ValueError, match="attention_bit"):
        actnn_aq.QModule(Attention())


def saved_bytes(run, params) -> tuple[int, object]:
    """Bytes of the storages autograd saves during run(), parameters left out (references)."""
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), out


def test_a_transformers_bert_holds_over_ten_times_less_than_exact():
    """BertForSequenceClassification with SDPA attention: its linear layers, LayerNorms,
    GELUActivation (converted like nn.GELU), dropouts and attention are all compressed."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=1024, num_labels=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ids, labels = torch.randint(0, 1000, (4, 128)), torch.randint(0, 2, (4,))
    held = []
    for level in ("L0", "L3"):
        actnn_aq.set_optimization_level(level, bit=1.25, aq_bit=0.5) if level == "L3" else \
            actnn_aq.set_optimization_level(level)
        model = transformers.BertForSequenceClassification(config)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        q = actnn_aq.QModule(model)
        step = lambda: F.cross_entropy(q(input_ids=ids).logits, labels)  # noqa: E731
        step().backward()  # the first re-allocation
        nbytes, loss = saved_bytes(step, params)
        loss.backward()
        held.append(nbytes)
    assert held[0] > 10 * held[1]
