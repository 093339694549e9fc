"""actnn_aq's training step never waits for the GPU: per-sample allocation, per-layer
re-allocation and the AQ pricing passes of issue 9 (run gain, mean deviation, a batch
norm's measured deviation) are device ops only."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actnn_aq
from actnn_aq import scheme

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_steps_with_re_allocation_and_measuring_never_synchronize(channels_last, monkeypatch):
    monkeypatch.setattr(scheme, "MEASURE_EVERY", 1)  # every re-allocation pass also measures
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).cuda()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    actnn_aq.set_optimization_level("L3", bit=1.25, aq_bit=0.5)
    model = actnn_aq.QModule(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 3, 32, 32, device="cuda").contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (32,), device="cuda")

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # iteration 0: first re-allocation, kernel builds, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(scheme.REALLOCATE_EVERY + 1):  # through the next re-allocation
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        actnn_aq.set_optimization_level("L3")
    assert model.controller.iteration == scheme.REALLOCATE_EVERY + 2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
