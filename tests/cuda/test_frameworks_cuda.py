"""gact_aq and actnn_aq on a GPU: the kernels behind them give the gradients the CPU
reference gives (the format is device-independent), memory really shrinks, bf16 trains."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actnn_aq
import gact_aq
from gact_aq.controller import Controller

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def ieee_float32():
    """TF32 convolutions differ from the CPU's by ~1e-3, enough to move values across
    rounding thresholds; compare the compression, not the convolution precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def batch(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    return x.to(device), y.to(device)


def grads(model, device, wrap):
    model = model.to(device)
    x, y = batch(device)
    with wrap(model) as m:
        F.cross_entropy(m(x), y).backward()
    return torch.cat([p.grad.flatten().cpu() for p in model.parameters()])


class gact_fixed:
    def __init__(self, model):
        gact_aq.set_optimization_level("L1.2")  # every tensor at 2 bits, fixed seeds
        self.ctl = Controller(model)
        self.model = model

    def __enter__(self):
        self.ctl.install_hook()
        return self.model

    def __exit__(self, *exc):
        self.ctl.uninstall_hook()


class actnn_fixed:
    def __init__(self, model):
        actnn_aq.set_optimization_level("L2", bit=2)
        self.model = actnn_aq.QModule(model)

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        pass


@pytest.mark.parametrize("wrap", [gact_fixed, actnn_fixed])
def test_compressed_gradients_match_the_cpu_reference(wrap):
    base = cnn()
    cpu = grads(copy.deepcopy(base), "cpu", wrap)
    gpu = grads(copy.deepcopy(base), "cuda", wrap)
    exact = grads(copy.deepcopy(base), "cpu", lambda m: _Plain(m))
    # same rounding noise on both devices: the two compressed gradients agree far more
    # closely than either agrees with the exact one
    assert (gpu - cpu).norm() < 0.1 * (cpu - exact).norm()


class _Plain:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        pass


def activation_bytes(model, x, y):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    loss = F.cross_entropy(model(x), y)
    held = torch.cuda.memory_allocated() - before
    loss.backward()
    return held


def test_memory_shrinks_on_the_gpu():
    x, y = batch("cuda")
    x = x.repeat(8, 1, 1, 1)
    y = y.repeat(8)
    exact = activation_bytes(cnn().cuda(), x, y)
    gact_aq.set_optimization_level("L1.2")
    model = cnn().cuda()
    with Controller(model):
        gact = activation_bytes(model, x, y)
    actnn_aq.set_optimization_level("L2", bit=2)
    actnn = activation_bytes(actnn_aq.QModule(cnn().cuda()), x, y)
    # small tensors, BN statistics and pooling indices stay exact in this small CNN
    assert gact < exact / 5 and actnn < exact / 5


@pytest.mark.parametrize("framework", ["gact_aq", "actnn_aq"])
def test_bf16_autocast_training_converges(framework):
    x, y = batch("cuda")
    model = cnn().cuda()
    if framework == "gact_aq":
        gact_aq.set_optimization_level("L2.2", bit=1.5, aq_bit=0.5)
        ctl = Controller(model)
        ctl.install_hook()
    else:
        actnn_aq.set_optimization_level("L3", bit=1.5, aq_bit=0.5)
        model = actnn_aq.QModule(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
        if framework == "gact_aq":
            def backprop():
                opt.zero_grad()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    F.cross_entropy(model(x[:8]), y[:8]).backward()
            ctl.iterate(backprop)
    if framework == "gact_aq":
        ctl.uninstall_hook()
    assert losses[-1] < 0.3 * losses[0]
