"""gact_aq and the fused CUDA attention kernels (flash, memory-efficient, cuDNN): the
output and normalizer are recomputed in backward from the stored q, k, v (with dropout,
on the kernel's own random stream), so at 32 bits the gradients equal exact training's
and at low bits they stay bounded."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import gact_aq
from gact_aq import attention
from gact_aq.controller import Controller

pytestmark = pytest.mark.cuda

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def attention_grads(backend, dropout, level=None, bit=0, seed=0):
    torch.manual_seed(0)
    proj = nn.Linear(64, 3 * 64).cuda()
    with torch.no_grad():
        proj.weight[:128] *= 3  # peaked softmax rows, as in a trained model
    x = torch.randn(4, 128, 64, device="cuda")
    ctl = None
    if level is not None:
        gact_aq.set_optimization_level(level, bit=bit)
        ctl = Controller(proj).__enter__()
    try:
        torch.manual_seed(seed)
        with sdpa_kernel(BACKENDS[backend]), torch.autocast("cuda", dtype=torch.bfloat16):
            q, k, v = proj(x).view(4, 128, 3, 4, 16).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            node = type(out.grad_fn).__name__
        out.float().square().sum().backward()
    finally:
        if ctl is not None:
            ctl.__exit__(None, None, None)
            gact_aq.set_optimization_level("L2")
    grads = torch.cat([proj.weight.grad.flatten(), proj.bias.grad.flatten()]).float()
    return grads, node


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_recomputed_attention_gives_exact_gradients_at_32_bits(backend, dropout):
    try:
        exact, node = attention_grads(backend, dropout)
    except RuntimeError as error:  # a kernel this GPU / build does not have
        pytest.skip(f"{backend} attention unavailable: {error}")
    g, _ = attention_grads(backend, dropout, "L1", 32)
    assert node in attention.NODES, node
    assert torch.allclose(g, exact, rtol=1e-3, atol=1e-3 * exact.abs().max()), (g - exact).abs().max()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_compressed_attention_gradients_stay_bounded(backend, dropout):
    try:
        exact, _ = attention_grads(backend, dropout)
    except RuntimeError as error:
        pytest.skip(f"{backend} attention unavailable: {error}")
    for level, bit, bound in (("L1", 4, 0.3), ("L1.2", 2, 1.0)):
        g, _ = attention_grads(backend, dropout, level, bit)
        assert torch.isfinite(g).all()
        assert (g - exact).norm() < bound * exact.norm(), (level, (g - exact).norm() / exact.norm())


def test_bf16_bert_with_sdpa_trains_under_compression():
    """The issue's case: BERT, SDPA attention with dropout, bf16 autocast, 1.25 bits with AQ:
    every gradient finite from the first step on, and the loss falls like exact's."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=128, num_labels=2)
    config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (32, 128), generator=g).cuda()
    labels = (ids[:, 1] % 2).cuda()
    losses = {}
    for mode in ("exact", "gact"):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        ctl = None
        if mode == "gact":
            gact_aq.set_optimization_level("L2.2", bit=1.25, aq_bit=0.5)
            ctl = Controller(model).__enter__()
        try:
            for step in range(30):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=labels).loss
                opt.zero_grad()
                loss.backward()
                assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), step
                opt.step()
                if ctl is not None:
                    def backprop():
                        opt.zero_grad()
                        with torch.autocast("cuda", dtype=torch.bfloat16):
                            model(input_ids=ids[:8], labels=labels[:8]).loss.backward()
                    ctl.iterate(backprop)
            losses[mode] = loss.item()
        finally:
            if ctl is not None:
                ctl.__exit__(None, None, None)
    assert losses["gact"] < 1.5 * losses["exact"] + 0.05, losses
