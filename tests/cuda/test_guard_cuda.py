"""The gradient guard and gact_aq's training step on a GPU: no host synchronization in a
step, the alarm arrives without blocking, zero-keeping levels and recomputed tensors
behave as on the CPU."""
import pytest
import torch
from torch import nn

import aqcore
import gact_aq
from aqcore.guard import WARMUP, GradientGuard
from gact_aq.controller import Controller

pytestmark = pytest.mark.cuda


def test_guard_check_never_synchronizes_and_alarms_later():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).cuda()
    guard = GradientGuard(model.parameters())
    x = torch.randn(32, 64, device="cuda")
    for _ in range(WARMUP + 2):
        model.zero_grad()
        model(x).square().mean().backward()
        guard.check()
    torch.cuda.synchronize()
    model.zero_grad()
    (model(x).square().mean() * 1e4).backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        guard.check()
        fired = guard.alarm()  # may not have landed yet: never blocks
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert fired or guard.alarm()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_gact_training_step_does_not_synchronize_outside_adaptation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).cuda()
    x, y = torch.randn(16, 3, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gact_aq.set_optimization_level("L2.2", bit=1.25, aq_bit=0.5)
    with Controller(model) as ctl:
        def backprop():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        for _ in range(3):  # adaptations at iterations 0, 1, 2
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            ctl.iterate(backprop)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    gact_aq.set_optimization_level("L2")
    assert any(level.zeros for level in ctl.levels) or any(l.name == "2" for l in ctl.levels)


@pytest.mark.parametrize("level", ["aq1z", "aq0.5z", "aq0.25z"])
def test_zero_keeping_levels_give_the_cpu_bytes(level):
    x = torch.relu(torch.randn(64, 1000))
    cpu = aqcore.compress(x, level, seed=3)
    gpu = aqcore.compress(x.cuda(), level, seed=3)
    assert torch.equal(gpu.payload.cpu(), cpu.payload) and torch.equal(gpu.mask.cpu(), cpu.mask)
    assert torch.equal(aqcore.decompress(gpu).cpu(), aqcore.decompress(cpu))


def test_zero_if_zeroes_every_tensor_only_when_the_flag_is_set():
    from aqcore import kernels

    torch.manual_seed(0)
    tensors = [torch.randn(n, device="cuda") for n in range(1, 90)]  # past one launch's 40
    tensors += [torch.randn(3, 1000, device="cuda").to(torch.bfloat16),
                torch.randn(2001, device="cuda").half()[1:],  # starts 2 bytes off 16
                torch.randn(8, 4, 3, 3, device="cuda").to(memory_format=torch.channels_last),
                torch.full((4097,), float("nan"), device="cuda")]
    copies = [t.clone() for t in tensors]
    kernels.zero_if(torch.tensor(False, device="cuda"), tensors)
    assert all(torch.equal(t, c) or (t.isnan().all() and c.isnan().all()) for t, c in zip(tensors, copies))
    kernels.zero_if(torch.tensor(True, device="cuda"), tensors)
    assert all(int(t.count_nonzero()) == 0 for t in tensors)
    whole = torch.randn(2001, device="cuda").half()
    kernels.zero_if(torch.tensor(True, device="cuda"), [whole[1:2000]])
    assert whole[0] != 0 and whole[2000] != 0 and int(whole[1:2000].count_nonzero()) == 0  # neighbours kept


def test_guard_zeroes_non_finite_and_non_dense_gradients():
    model = nn.Linear(16, 16).cuda()
    guard = GradientGuard(model.parameters())
    model.weight.grad = torch.full((16, 32), float("nan"), device="cuda")[:, ::2]  # not dense
    model.bias.grad = torch.full((16,), float("inf"), device="cuda")
    guard.check()
    assert int(model.weight.grad.count_nonzero()) == 0 and int(model.bias.grad.count_nonzero()) == 0
    assert guard.alarm() or (torch.cuda.synchronize() or guard.alarm())
