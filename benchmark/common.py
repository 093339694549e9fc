"""Pieces the benchmarks share: the bundled data, a small ResNet, and memory measurement."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DATA = Path(__file__).resolve().parent / "data" / "digits.npz"


def digits(size: int = 32, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits, upsampled to size x size, 3 channels, normalised."""
    data = np.load(DATA)
    images = torch.from_numpy(data["images"]).float().div(16).unsqueeze(1)
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    images = ((images - 0.3) / 0.4).expand(-1, 3, -1, -1).contiguous()
    return images.to(device), torch.from_numpy(data["labels"]).long().to(device)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(widths=(16, 32, 64), blocks: int = 2, classes: int = 10,
           stem_pool: bool = False) -> nn.Module:
    """A ResNet for 32x32 inputs (3 stages of basic blocks; stem_pool adds an
    ImageNet-style 3x3 stride-2 max-pool after the stem)."""
    layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    if stem_pool:
        layers.append(nn.MaxPool2d(3, 2, 1))
    cin = widths[0]
    for stage, width in enumerate(widths):
        for block in range(blocks):
            layers.append(BasicBlock(cin, width, 2 if block == 0 and stage > 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


@contextlib.contextmanager
def _quiet_stderr():
    """The CPU profiler's native library prints start/stop lines on fd 2."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def allocated_during(fn: Callable[[], object], device: torch.device) -> tuple[int, object]:
    """Bytes still allocated after fn() that were not before (fn's result kept alive).

    CUDA: the caching allocator's counter. CPU: the profiler's allocation events, which
    see every tensor allocation, compressed payloads included.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) - before, result
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return sum(e.self_cpu_memory_usage for e in prof.key_averages()), result


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def median_run_ms(fn: Callable[[], object], runs: int, device: torch.device) -> float:
    """The median of `runs` synchronized calls of fn, in ms."""
    times = []
    for _ in range(runs):
        start = now(device)
        fn()
        times.append(now(device) - start)
    return median_ms(times)
