"""The sensitivity model: predicted gradient variance against measured, layer by layer."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actnn_aq
import aqcore
from actnn_aq import scheme as scheme_module
from actnn_aq.saved import Plan
from actnn_aq.sensitivity import batch_norm_noise


def _observations(model, x, y):
    """Each layer's observation of one backward (all at 8 bits, so nearly exact)."""
    actnn_aq.set_optimization_level("L3", bit=8)
    q = actnn_aq.QModule(copy.deepcopy(model))
    seen = {}
    q.controller.reallocate = lambda observations: seen.update({o.scheme.name: o for o in observations})
    F.cross_entropy(q(x), y).backward()
    return seen, [str(level) for level in q.controller.ladder]


def test_weighted_layer_predictions_match_measured_variance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    x = F.avg_pool2d(torch.randn(16, 3, 16, 16), 3, 1, 1) * 3  # smooth, image-like
    y = torch.randint(0, 10, (16,))
    exact = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    observed, ladder = _observations(model, x, y)
    actnn_aq.set_optimization_level("L2", bit=2)
    for name, obs in observed.items():
        q = actnn_aq.QModule(copy.deepcopy(model))
        for scheme in q.controller.layers:  # compress this layer's input only
            if scheme.name != name:
                scheme.plan = lambda x, fan=None, weight=None: (Plan(), None)
        measured = 0.0
        for _ in range(8):
            grads = torch.autograd.grad(F.cross_entropy(q(x), y), list(q.parameters()))
            measured += sum((a - b).square().sum() for a, b in zip(grads, exact)).item() / 8
        predicted = (obs.scheme.sensitivity(obs) * obs.errors[:, ladder.index("2")]).sum().item()
        assert 1 / 3 < measured / predicted < 3, name


def test_batch_norm_input_gradient_noise():
    """E||d grad_x||^2 of a batch norm whose input is stored at 2 bits: independent part
    u e plus the part along xhat, mean(v) e / M (sensitivity.batch_norm_noise)."""
    torch.manual_seed(0)
    x = torch.randn(8, 6, 10, 10) * torch.rand(1, 6, 1, 1) * 3 + torch.randn(1, 6, 1, 1)
    g = torch.randn_like(x) + x  # a gradient correlated with the input, as in training
    weight = torch.rand(6) + 0.5
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + 1e-5)

    def input_grad(inp):
        return torch.ops.aten.native_batch_norm_backward(g, inp, weight, None, None, mean, invstd, True, 1e-5,
                                                         [True, False, False])[0]

    exact = input_grad(x)
    measured = energy = 0.0
    for seed in range(16):
        x_hat = aqcore.decompress(aqcore.compress(x, "2", seed=seed))
        energy += (x_hat - x).square().sum().item() / 16
        measured += (input_grad(x_hat) - exact).square().sum().item() / 16
    noise = batch_norm_noise(g, x, mean, invstd, weight)
    positions = x.numel() / x.shape[1]
    predicted = (noise.independent[0] + noise.along_output.mean() / positions).item() * energy
    assert 0.5 < measured / predicted < 2


@functools.lru_cache(maxsize=None)
def _trained_cnn():
    """A small CNN (conv-BN-ReLU x3, pooling, linear) after 30 steps on noisy class
    templates, and one batch: the gradient has its training structure."""
    torch.manual_seed(0)
    layers = []
    for cin, cout, stride in ((3, 8, 1), (8, 16, 2), (16, 32, 2)):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    gen = torch.Generator().manual_seed(0)
    templates = F.interpolate(torch.randn(10, 3, 4, 4, generator=gen), size=16, mode="bilinear")
    labels = torch.randint(0, 10, (512,), generator=gen)
    data = templates[labels] + 0.7 * torch.randn(512, 3, 16, 16, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(30):
        batch = slice(i * 64 % 512, i * 64 % 512 + 64)
        opt.zero_grad()
        F.cross_entropy(model(data[batch]), labels[batch]).backward()
        opt.step()
    return model, data[:64], labels[:64]


def _priced_and_measured(name: str, level: str, monkeypatch, channels_last: bool = False
                         ) -> tuple[float, float]:
    """What the per-layer split prices layer `name` at `level` (the weighted errors it hands
    the allocator, summed over the batch), and the squared gradient error measured with
    only that layer's input stored at that level (4 rounding seeds)."""
    model, x, y = _trained_cnn()
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    exact = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    actnn_aq.set_optimization_level("L3", bit=8, aq_bit=0.5)
    q = actnn_aq.QModule(copy.deepcopy(model))
    seen = []
    reallocate, allocate = q.controller.reallocate, scheme_module.aqcore.allocate_rows
    monkeypatch.setattr(q.controller, "reallocate", lambda obs: (seen.append(obs), reallocate(obs)))
    monkeypatch.setattr(scheme_module.aqcore, "allocate_rows",
                        lambda weighted, *args: (seen.append(weighted), allocate(weighted, *args))[1])
    F.cross_entropy(q(x), y).backward()
    observations, weighted = seen
    rows = torch.tensor([o.scheme.name == name for o in observations for _ in range(len(o.errors))])
    column = [str(level) for level in q.controller.ladder].index(level)
    priced = weighted[rows, column].sum().item()
    actnn_aq.set_optimization_level("L2", bit=aqcore.parse_level(level).bits_per_value, aq_bit=0.5)
    q = actnn_aq.QModule(copy.deepcopy(model))
    for scheme in q.controller.layers:
        if scheme.name != name:
            scheme.plan = lambda *args, **kwargs: (Plan(), None)
    measured = 0.0
    for _ in range(4):
        grads = torch.autograd.grad(F.cross_entropy(q(x), y), list(q.parameters()))
        measured += sum((a - b).square().sum() for a, b in zip(grads, exact)).item() / 4
    return priced, measured


def test_batch_norm_averaging_is_priced_like_measured(monkeypatch):
    """Issue 9: averaging (AQ) a batch norm's input is a bias that its input gradient
    carries, coherently, into every layer below. The independent-noise model priced the
    last batch norm ~14x below the measured gradient error (on a small ResNet, the
    per-layer split then put every batch norm at AQ 0.5); the measured deviation price
    (scheme.Observation.level_factor) brings it within 3x."""
    priced, measured = _priced_and_measured("7", "aq0.5", monkeypatch)
    assert 1 / 3 < measured / priced < 3


@pytest.mark.parametrize("name", ["0", "3", "6"])
def test_conv_averaging_is_priced_like_measured(name, monkeypatch):
    """AQ rounding is one error per run of k inputs: along a conv's spatial axis it adds
    coherently where the output gradient is smooth (sensitivity.run_gain); without that
    the convs' AQ 0.5 was priced up to 2x low, now within 1.5x."""
    priced, measured = _priced_and_measured(name, "aq0.5", monkeypatch)
    assert 1 / 1.5 < measured / priced < 1.5


@pytest.mark.parametrize("name, within", [("3", 2.5), ("6", 1.5), ("11", 1.5)])
def test_channels_last_averaging_is_priced_like_measured(name, within, monkeypatch):
    """channels_last runs average across channels: each channel's deviation keeps a mean
    over positions, coherent with the output gradient's sum over positions
    (sensitivity.mean_deviation_price). The convs' AQ 0.5 was priced 1.8-2.2x low and the
    classifier's (a linear layer: runs across features) 3.3x low; now "6" and "11" are
    within 1.5x, and "3" within 2.5x (priced 2.4x high: its positions' fluctuations
    partly cancel the mean's term)."""
    priced, measured = _priced_and_measured(name, "aq0.5", monkeypatch, channels_last=True)
    assert 1 / within < measured / priced < within
