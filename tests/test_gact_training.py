"""gact_aq: gradients and training (CPU): unbiasedness, AQ, convergence, autocast, SDPA."""
import pytest
import torch
from torch import nn

import gact_aq
from gact_aq.controller import Controller
from test_gact_models import (SmallCNN, backprop_fn, cnn_problem, digits, encoder_problem,
                              grads)


@pytest.fixture(autouse=True)
def default_config():
    yield
    gact_aq.set_optimization_level("L2")


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def gradient_samples(model, backprop, steps, seed=5):
    """Flat gradients of `steps` compressed steps on one batch (fresh rounding each step)."""
    samples = []
    with Controller(model) as ctl:
        for _ in range(steps):
            torch.manual_seed(seed)  # same dropout masks: only quantization differs
            backprop()
            samples.append(flat(grads(model)))
            ctl.iterate()
    return torch.stack(samples)


def exact_gradient(model, backprop, seed=5):
    torch.manual_seed(seed)
    backprop()
    return flat(grads(model))


@pytest.mark.parametrize("problem", [cnn_problem, encoder_problem], ids=["cnn", "encoder"])
def test_fixed_levels_are_unbiased(problem):
    """The mean of K compressed gradients approaches the exact one like 1/K: its squared
    error is about the single-step error / K. A bias would keep it at bias^2 (ratio -> K)."""
    model, x, y = problem()
    backprop = backprop_fn(model, x, y)
    exact = exact_gradient(model, backprop)
    gact_aq.set_optimization_level("L1.2")  # 2 bits everywhere
    steps = 32
    g = gradient_samples(model, backprop, steps)
    single = (g - exact).square().sum(1).mean()
    of_mean = (g.mean(0) - exact).square().sum()
    assert single > 1e-3 * exact.square().sum()  # the noise is real
    assert of_mean * steps / single < 2.0


@pytest.mark.parametrize("aq_bit", [1.0, 0.5, 0.25])
def test_aq_levels_match_the_group_average_model(aq_bit):
    """AQ = average runs of k = 2/aq_bit values (memory order), then unbiased 2-bit rounding:
    for a backward linear in the saved tensor, compressed gradients average to the gradient
    of the model whose saved tensor is replaced by its run averages, not to the exact one."""
    torch.manual_seed(0)
    pre, post = nn.Linear(64, 128), nn.Linear(128, 32)
    x, target = torch.randn(64, 64), torch.randn(64, 32)
    model = nn.Sequential(pre, post)

    def backprop():
        model.zero_grad()
        (model(x) * target).sum().backward()  # post.weight.grad = target^T h_saved

    k = int(2 / aq_bit)
    with torch.no_grad():
        h = pre(x)
        averaged = h.reshape(-1, k).mean(1).repeat_interleave(k).view_as(h)
    model_average, exact = target.t() @ averaged, target.t() @ h
    gact_aq.set_optimization_level("L1.2", bit=aq_bit, aq_bit=aq_bit)
    steps = 32
    g = torch.stack([s[pre.weight.numel() + pre.bias.numel():][:post.weight.numel()]
                     for s in gradient_samples(model, backprop, steps)]).view(steps, 32, 128)
    single = (g - model_average).square().sum((1, 2)).mean()
    of_mean = (g.mean(0) - model_average).square().sum()
    assert of_mean * steps / single < 2.0
    assert (g.mean(0) - exact).square().sum() > 10 * of_mean  # it is not the exact gradient


def train_digits(level=None, steps=150, **levels):
    images, labels = digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1500], order[1500:]
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pick = torch.Generator().manual_seed(1)
    ctl = None
    if level is not None:
        gact_aq.set_optimization_level(level, **levels)
        gact_aq.set_adapt_interval(50)
        ctl = Controller(model).__enter__()
    try:
        for _ in range(steps):
            batch = train[torch.randint(0, len(train), (64,), generator=pick)]
            x, y = images[batch], labels[batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if ctl is not None:
                ctl.iterate(backprop_fn(model, x[:16], y[:16]))
    finally:
        if ctl is not None:
            ctl.__exit__(None, None, None)
    model.eval()
    with torch.no_grad():
        return (model(images[test]).argmax(1) == labels[test]).float().mean().item(), ctl


@pytest.mark.slow
def test_training_at_1_25_bits_with_aq_converges_like_exact():
    exact, _ = train_digits()
    compressed, ctl = train_digits("L2.2", bit=1.25, aq_bit=0.5)
    assert exact > 0.95
    assert compressed >= exact - 0.02
    levels = {level.name for level in ctl.levels}
    assert "aq0.5" in levels and levels & {"2", "4", "8"}  # mixed precision was used
    uniform, _ = train_digits("L1.2", bit=1)  # the same budget without AQ / allocation
    assert uniform < compressed - 0.03


def test_bf16_autocast_compresses_activations_and_gradients_stay_close():
    model, x, y = cnn_problem()

    def autocast_backprop():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        model.zero_grad()
        nn.functional.cross_entropy(out.float(), y).backward()

    exact = exact_gradient(model, autocast_backprop)
    gact_aq.set_optimization_level("L1.1")  # 8 bits
    with Controller(model) as ctl:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        rows = ctl.report().rows
        model.zero_grad()
        nn.functional.cross_entropy(out.float(), y).backward()
    g = flat(grads(model))
    assert len(rows) >= 8 and {r.dtype for r in rows} == {torch.bfloat16}
    assert torch.isfinite(g).all()
    assert torch.nn.functional.cosine_similarity(g, exact, dim=0) > 0.99
    gact_aq.set_optimization_level("L2.2", bit=1.5, aq_bit=0.5)
    with Controller(model) as ctl:
        autocast_backprop()
        ctl.iterate(autocast_backprop)
        autocast_backprop()
        assert torch.isfinite(flat(grads(model))).all()
        assert len(ctl.levels) == len(rows)


def test_sdpa_saves_are_compressed_except_the_exact_logsumexp():
    """torch's CPU flash attention saves q, k, v, out and the logsumexp. The four float
    tensors are compressed; the logsumexp does not require grad and stays exact, so the
    backward recomputes softmax(q k^T - lse) with exact normalizers."""
    torch.manual_seed(0)
    proj = nn.Linear(32, 3 * 32)
    x = torch.randn(8, 64, 32)  # logsumexp (8, 2, 64): large enough to be compressed

    def attention():
        q, k, v = proj(x).view(8, 64, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def backprop():
        proj.zero_grad()
        attention().square().sum().backward()

    exact = exact_gradient(proj, backprop)
    gact_aq.set_optimization_level("L1.1")
    proj.zero_grad()
    with Controller(proj) as ctl:
        out = attention()
        shapes = sorted(r.shape for r in ctl.report().rows)
        out.square().sum().backward()
    assert shapes == [(8, 2, 64, 16)] * 4  # q, k, v, out (x needs no grad: kept)
    assert torch.allclose(flat(grads(proj)), exact, rtol=0.05, atol=0.05 * exact.abs().max())
    # attention's backward is nonlinear in the saved q and k (softmax of their product), so
    # rounding noise leaves a bias of second order: at 4 bits about 1% of the gradient
    gact_aq.set_optimization_level("L1")
    g = gradient_samples(proj, backprop, steps=16)
    assert (g.mean(0) - exact).norm() < 0.03 * exact.norm()
