"""aqcore.GradientGuard: a bad step (non-finite, or a jump far above the running norm)
has its gradients zeroed and raises one alarm; ordinary steps pass untouched."""
import math

import torch
from torch import nn

from aqcore.guard import FACTOR, WARMUP, GradientGuard


def step(model: nn.Module, guard: GradientGuard, scale: float = 1.0) -> list[torch.Tensor]:
    model.zero_grad()
    (model(torch.randn(16, 8)).square().mean() * scale).backward()
    before = [p.grad.clone() for p in model.parameters()]
    guard.check()
    return before


def test_ordinary_steps_pass_untouched_and_raise_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    guard = GradientGuard(model.parameters())
    for i in range(200):  # the norm drifts 4x over the run, as in training
        before = step(model, guard, scale=1 + 3 * i / 200)
        assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
        assert not guard.alarm()
    assert 0.1 < guard.typical_norm() < 100


def test_a_jump_after_warmup_is_zeroed_once():
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    early = GradientGuard(model.parameters())
    step(model, early)
    step(model, early, scale=3 * FACTOR)  # in warmup: a jump is not judged yet
    assert not early.alarm()
    guard = GradientGuard(model.parameters())
    for _ in range(WARMUP):
        step(model, guard)
    step(model, guard, scale=3 * FACTOR)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    assert guard.alarm() and not guard.alarm()  # reported once
    typical = guard.typical_norm()
    step(model, guard)  # the outlier did not move the running norm
    assert guard.typical_norm() == typical or math.isclose(guard.typical_norm(), typical, rel_tol=0.5)
    assert not guard.alarm()


def test_non_finite_gradients_are_zeroed_from_the_first_step():
    model = nn.Linear(8, 1)
    guard = GradientGuard(model.parameters())
    model.zero_grad()
    model(torch.full((2, 8), float("inf"))).sum().backward()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    guard.check()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    assert guard.alarm()


def test_parameters_without_gradients_are_skipped():
    model = nn.Linear(8, 1)
    guard = GradientGuard(model.parameters())
    guard.check()  # no .grad yet
    assert not guard.alarm() and guard.steps == 0
