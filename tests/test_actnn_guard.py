"""actnn_aq's guard: a bad step's gradients are zeroed on the device; the next forward
bars the lowest precision in use, re-allocates and says so; without the guard, non-finite
activations give the non-finite gradients exact training gives."""
import pytest
import torch
from torch import nn

import actnn_aq


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    poisoned = x.clone()
    poisoned[3, 0, 2, 2] = float("inf")
    return model, x, y, poisoned


def step(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_a_bad_step_is_zeroed_and_the_floor_rises_until_everything_is_exact():
    model, x, y, poisoned = model_and_data()
    actnn_aq.set_optimization_level("L3", bit=1.25, aq_bit=0.5)
    q = actnn_aq.QModule(model)
    step(q, x, y)
    floors = [q.controller.floor]
    while floors[-1] < 32 and len(floors) < 10:
        grads = step(q, poisoned, y)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
        with pytest.warns(UserWarning, match="gradients were zeroed"):
            grads = step(q, x, y)  # its forward heeds the alarm; a good step passes
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        floors.append(q.controller.floor)
    assert floors == [0.0, 1.0, 2.0, 4.0, 8.0, 32.0]
    assert [e["floor"] for e in q.controller.guard_events] == floors[1:]
    assert not q.controller.ladder
    exact = step(model_and_data()[0], x, y)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(step(q, x, y), exact))


def test_a_fixed_level_is_lifted_above_the_floor():
    model, x, y, poisoned = model_and_data()
    actnn_aq.set_optimization_level("L2", bit=2)
    q = actnn_aq.QModule(model)
    step(q, poisoned, y)
    with pytest.warns(UserWarning, match="levels under 4 bits"):
        step(q, x, y)
    assert q.controller.floor == 4.0
    assert q.controller.lifted(q.config.fixed_level).bits == 4


def test_without_the_guard_non_finite_gradients_pass_as_in_exact_training():
    model, x, y, poisoned = model_and_data()
    exact = [torch.isfinite(g).all().item() for g in step(model, poisoned, y)]
    actnn_aq.set_optimization_level("L3", bit=1.25, aq_bit=0.5)
    actnn_aq.config.guard = False
    q = actnn_aq.QModule(model_and_data()[0])
    assert [torch.isfinite(g).all().item() for g in step(q, poisoned, y)] == exact
    assert not all(exact) and q.controller.guard is None
