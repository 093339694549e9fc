"""QModule on ResNet- and VGG-style models: conversion keeps the model, L0 is exact,
the schemes adapt without interfering across models, and training converges."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actnn_aq
from capture import Capture
import aqcore
from actnn_aq import saved


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
        BasicBlock(8, 8, 1), BasicBlock(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


def vgg(classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, classes))


def step(model, x, y):
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def batch(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("build", [resnet, vgg])
def test_conversion_keeps_the_model(build):
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model)
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append("hook"))
    model[-1].eval()  # a submodule in its own mode
    reference[-1].eval()
    converted = actnn_aq.QModule(model)
    assert converted.model is model
    assert dict(model.named_parameters()) == params  # the very same Parameter objects
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k])
    assert not model[-1].training and model[0].training
    assert all(type(m).__name__.startswith("Q") for m in model.modules()
               if type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Linear, nn.Dropout))
    assert {type(m).__name__ for m in model.modules()} >= {"QConv2d", "QReLU", "QMaxPool2d", "QLinear"}
    x, y = batch()
    torch.manual_seed(1)
    out = converted(x)
    torch.manual_seed(1)
    assert torch.equal(out, reference(x))
    assert calls == ["hook"]
    converted.eval()
    assert torch.equal(converted(x), reference.eval()(x))


def test_avg_pool_stays_an_average():
    pool = actnn_aq.QModule(nn.Sequential(nn.AvgPool2d(2))).model[0]
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert type(pool).__name__ == "QAvgPool2d"
    assert torch.equal(pool(x), F.avg_pool2d(x, 2))


def test_nothing_to_convert():
    with pytest.raises(ValueError, match="found nothing to convert"):
        actnn_aq.QModule(nn.Sequential(nn.Tanh(), nn.Softmax(-1)))


def test_subclasses_and_l1_batchnorm_are_left_alone():
    class MyConv(nn.Conv2d):
        pass

    actnn_aq.set_optimization_level("L1")
    model = actnn_aq.QModule(nn.Sequential(MyConv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).model
    assert [type(m).__name__ for m in model] == ["MyConv", "BatchNorm2d", "QReLU"]


@pytest.mark.parametrize("build", [resnet, vgg])
def test_l0_gradients_identical_to_exact(build):
    actnn_aq.set_optimization_level("L0")
    torch.manual_seed(0)
    exact = build()
    converted = actnn_aq.QModule(copy.deepcopy(exact))
    for it in range(2):
        x, y = batch(seed=it)
        torch.manual_seed(it)
        loss_q, grads_q = step(converted, x, y)
        torch.manual_seed(it)
        loss_e, grads_e = step(exact, x, y)
        assert loss_q == loss_e
        assert all(torch.equal(a, b) for a, b in zip(grads_q, grads_e))


def test_eval_and_no_grad_compress_nothing(monkeypatch):
    compressed = []
    monkeypatch.setattr(saved.aqcore, "compress", lambda *a, **k: compressed.append(1))
    monkeypatch.setattr(aqcore, "pack_mask", lambda *a, **k: compressed.append(1))
    torch.manual_seed(0)
    exact = resnet()
    model = actnn_aq.QModule(copy.deepcopy(exact))
    x, _ = batch()
    with torch.no_grad():  # training mode, no grad
        model(x)
    model.eval()
    xg = x.clone().requires_grad_()
    counts = []
    for m in (model, exact.eval()):
        n = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.__setitem__(0, n[0] + 1) or t, lambda t: t):
            m(xg).sum().backward()
        counts.append(n[0])
    assert compressed == []
    assert counts[0] == counts[1]  # eval: the stock layers, nothing of ours
    assert all(s.calls == 0 for s in model.controller.layers) and model.controller.iteration == 0


def test_first_iteration_allocates_from_the_data(monkeypatch):
    """No gradient statistics yet: the error model alone decides, per sample. Smooth samples
    (pairs of equal values) cost nothing at aq1, so rough samples get the bits."""
    actnn_aq.set_optimization_level("L3", bit=2, aq_bit=1)
    capture = Capture(monkeypatch)
    model = actnn_aq.QModule(nn.Sequential(nn.Linear(64, 4)))
    rough = torch.randn(4, 64)
    smooth = torch.randn(4, 32).repeat_interleave(2, dim=1)
    model(torch.cat([rough, smooth])).sum().backward()
    chosen = capture.items[0][1].row_levels()
    assert [str(l) for l in chosen[4:]] == ["aq1"] * 4
    assert all(l.bits_per_value >= 2 for l in chosen[:4])
    assert sum(l.bits_per_value for l in chosen) <= 2 * 8


def test_compressed_activations_are_freed_by_backward_unless_the_graph_is_retained(monkeypatch):
    """Like exact saved tensors: gone once backward has used them, although `loss` (and so
    the graph) is still referenced; retain_graph keeps them for an identical second pass,
    and a second pass without it fails with PyTorch's own error."""
    alive = []

    def recording(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            ct = out[0] if isinstance(out, tuple) else out
            alive.append(weakref.ref(ct.payload))
            return out
        return wrapped

    for name in ("compress", "compress_allocated", "pack_mask"):
        monkeypatch.setattr(aqcore, name, recording(getattr(aqcore, name)))
    torch.manual_seed(0)
    actnn_aq.set_optimization_level("L3", bit=1.25, aq_bit=0.5)
    model = actnn_aq.QModule(resnet())
    x, y = batch()
    loss = nn.functional.cross_entropy(model(x), y)
    assert len(alive) > 5 and all(ref() is not None for ref in alive)
    loss.backward()
    gc.collect()
    assert all(ref() is None for ref in alive)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()

    loss = nn.functional.cross_entropy(model(x), y)
    model.zero_grad()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(first, model.parameters()))


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_training_step_copies_no_activation(channels_last):
    """Masks, norms and gradient statistics follow the activations' layout: a copy of an
    activation-sized tensor is a full extra pass over memory (on an H100, transposing ReLU
    masks and per-sample gradient norms through reshape cost ResNet-50 ~40 ms a step)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    actnn_aq.set_optimization_level("L3", bit=1.25, aq_bit=0.5)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = actnn_aq.QModule(nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).to(memory_format=layout))
    x = torch.randn(8, 8, 16, 16).to(memory_format=layout)
    y = torch.randint(0, 10, (8,))
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    copies = [e for e in prof.events() if e.name in ("aten::clone", "aten::contiguous")
              and e.input_shapes and list(e.input_shapes[0])[1:] == [16, 16, 16]]
    assert copies == []
