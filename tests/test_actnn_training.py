"""Issue 9: actnn_aq on an ordinary model and schedule, for a few hundred steps.

A small ResNet with batch norms (benchmark/common.py's, widths 8/16/32, 16x16 inputs),
SGD with Nesterov momentum and weight decay, OneCycle to lr 0.03: the schedule under which
compressed training drifted away from exact. Same initialisation and data order for
every run; the data are noisy class templates, learnable in 300 steps.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import actnn_aq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
from common import resnet  # noqa: E402

STEPS, BATCH, SIZE = 300, 64, 16


def templates(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    means = F.interpolate(torch.randn(10, 3, SIZE // 4, SIZE // 4, generator=gen), size=SIZE, mode="bilinear")
    labels = torch.randint(0, 10, (n,), generator=gen)
    smooth = F.interpolate(torch.randn(n, 3, SIZE // 2, SIZE // 2, generator=gen), size=SIZE, mode="bilinear")
    return means[labels] + 1.5 * smooth + 0.5 * torch.randn(n, 3, SIZE, SIZE, generator=gen), labels


def train(channels_last: bool = False, **setting) -> tuple[float, float]:
    """(mean loss of the last 10 steps, held-out accuracy); fails on a non-finite loss."""
    images, labels = templates(64 * BATCH + 512)
    torch.manual_seed(0)
    model = resnet((8, 16, 32), blocks=1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if setting:
        actnn_aq.set_optimization_level(**setting)
        model = actnn_aq.QModule(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.03, total_steps=STEPS)
    order = torch.randperm(64 * BATCH, generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(STEPS):
        batch = order[step * BATCH % (64 * BATCH):][:BATCH]
        loss = F.cross_entropy(model(images[batch].contiguous(memory_format=memory_format)), labels[batch])
        assert math.isfinite(loss.item()), f"non-finite loss at step {step}"
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        held_out = images[-512:].contiguous(memory_format=memory_format)
        accuracy = (model(held_out).argmax(1) == labels[-512:]).float().mean().item()
    return sum(losses[-10:]) / 10, accuracy


@pytest.mark.slow
@pytest.mark.parametrize("channels_last, margin", [(False, 0.03), (True, 0.05)])
def test_1_25_bits_with_aq_trains_like_exact(channels_last, margin):
    """Exact ends near 0.04 (98.8-99.2% held out). Before the AQ pricing of issue 9 the
    per-layer split put every batch norm at AQ 0.5 and 1.25 bits ended at 0.145 (NCHW) and
    0.121 (channels_last). Now about 0.05 and 0.07; channels_last, where AQ runs average
    across channels, stays 0.03-0.045 above exact over three initialisations."""
    torch.set_num_threads(1)
    exact_loss, exact_accuracy = train(channels_last)
    loss, accuracy = train(channels_last, level="L3", bit=1.25, aq_bit=0.5)
    assert exact_loss < 0.06
    assert loss < exact_loss + margin
    assert accuracy > exact_accuracy - 0.015
