"""The sensitivity model: predicted gradient variance against measured, layer by layer."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actnn_aq
import aqcore
from actnn_aq.saved import Plan
from actnn_aq.sensitivity import batch_norm_noise


@pytest.fixture(autouse=True)
def default_level():
    yield
    actnn_aq.set_optimization_level("L3")


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
