"""gact_aq sensitivities: the default estimator against the published probe, and what
probes leave behind (nothing)."""
import random

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from gact_aq import settings
from gact_aq.autoprec import BIAS_WEIGHT
from gact_aq.controller import Controller
from test_gact_models import backprop_fn, cnn_problem, encoder_problem, grads

PROBLEMS = {"cnn": cnn_problem, "encoder": encoder_problem}
BUDGET = dict(bit=1.5, aq_bit=0.5)  # GACT-AQ's published 1.5-bit setting


def adapted(model, backprop, method, **budget):
    """A Controller that has adapted once with the given sensitivity method."""
    cfg = settings.build_config("L2.2", **(budget or BUDGET))
    cfg.sensitivity = method
    ctl = Controller(model, cfg)
    with ctl:
        backprop()
        ctl.iterate(backprop)
    return ctl


def allocation_variance(model, backprop, ctl, steps=64):
    """The gradient error the allocation minimises, measured over `steps` compressed steps
    with ctl's levels (the same rounding seeds for any allocation: common random numbers):
    the per-step noise ||g - mean g||^2 plus BIAS_WEIGHT times the bias ||mean g - exact||^2
    (autoprec.BIAS_WEIGHT: the optimizer averages noise over steps, not a bias)."""
    torch.manual_seed(3)
    backprop()
    exact = torch.cat([g.flatten() for g in grads(model)])
    cfg = settings.build_config("L2.2", **BUDGET)
    cfg.adapt_interval = 10 ** 9
    replay = Controller(model, cfg)
    replay.load_state_dict(ctl.state_dict())
    samples = []
    with replay:
        for _ in range(steps):
            torch.manual_seed(3)
            backprop()
            samples.append(torch.cat([g.flatten() for g in grads(model)]))
            replay.iterate()
    samples = torch.stack(samples).double()
    mean = samples.mean(0)
    noise = (samples - mean).square().sum(1).mean().item() * steps / (steps - 1)
    bias = max((mean - exact).square().sum().item() - noise / steps, 0.0)
    return noise + BIAS_WEIGHT * bias


@pytest.fixture(scope="module", params=sorted(PROBLEMS))
def both_methods(request):
    model, x, y = PROBLEMS[request.param]()
    backprop = backprop_fn(model, x, y)
    return model, backprop, adapted(model, backprop, "propagate"), adapted(model, backprop, "probe")


def test_default_estimator_ranks_tensors_like_the_probe(both_methods):
    model, backprop, default, probe = both_methods
    assert len(default.sensitivity) == len(probe.sensitivity) >= 9
    assert spearmanr(default.sensitivity, probe.sensitivity).statistic >= 0.8


def test_default_allocation_has_at_most_1_2x_the_probe_allocations_gradient_variance(both_methods):
    model, backprop, default, probe = both_methods
    ratio = allocation_variance(model, backprop, default) / allocation_variance(model, backprop, probe)
    assert ratio <= 1.2


def test_default_estimator_costs_one_pass_whatever_the_number_of_tensors(both_methods):
    model, backprop, default, probe = both_methods
    assert default.extra_passes == 1
    assert probe.extra_passes == 1 + 3 * len(probe.sensitivity)


def test_an_allocation_from_random_sensitivities_is_worse():
    """The variance test above can fail: fast_mem_check-style random sensitivities
    (docs/frameworks.md) give a measurably worse allocation."""
    model, x, y = cnn_problem()
    backprop = backprop_fn(model, x, y)
    default = adapted(model, backprop, "propagate")
    shuffled = Controller(model, default.config)
    state = default.state_dict()
    rng = np.random.default_rng(0)
    state["levels"] = [state["levels"][i] for i in rng.permutation(len(state["levels"]))]
    shuffled.load_state_dict(state)
    assert allocation_variance(model, backprop, shuffled) > 1.2 * allocation_variance(model, backprop, default)


@pytest.mark.parametrize("method", ["propagate", "probe"])
def test_probes_leave_training_state_untouched(method):
    model = nn.Sequential(  # dropout: the passes draw random numbers
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    model[1].momentum = None  # cumulative averages use num_batches_tracked too
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    opt = torch.optim.Adam(model.parameters())

    def backprop():
        random.random(), np.random.rand()  # a closure may draw from any generator
        backprop_fn(model, x, y)()

    backprop()
    opt.step()
    backprop()  # the gradients a user may still hold
    before = ([b.clone() for b in model.buffers()], grads(model), repr(opt.state_dict()),
              random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    cfg = settings.build_config("L2.2", **BUDGET)
    cfg.sensitivity = method
    with Controller(model, cfg) as ctl:
        ctl.iterate(backprop)
    after = ([b.clone() for b in model.buffers()], grads(model), repr(opt.state_dict()),
             random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    assert ctl.levels
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
    assert before[2] == after[2] and before[3] == after[3]
    assert np.array_equal(before[4], after[4]) and torch.equal(before[5], after[5])
