"""actnn_aq on a small ResNet (CPU): bytes saved for backward per sample at each level, and
the relative error of the parameter gradient against exact training.

Data: the bundled digits (benchmark/data), upsampled to 3 x 32 x 32; the model is first
trained for a few SGD steps so that weights and activations are not a fresh init's.

    python benchmark/actnn_resnet_bytes.py [--batch 32] [--seeds 8] [--json out.json]

Bytes: every tensor autograd keeps for backward (stock layers' saved tensors, our Q-layers'
exact saved tensors, compressed payloads + metadata, masks, pool offsets), storages counted
once, parameters excluded. Gradient error: ||g - g_exact|| / ||g_exact|| on a fixed batch,
averaged over independent rounding seeds, after `warmup` steps let the per-layer
allocation adapt (no optimizer step, so every measurement sees the same weights).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
from pathlib import Path

import numpy as np

import torch
from torch import nn
import torch.nn.functional as F

import actnn_aq
import aqcore
from actnn_aq import scheme
from actnn_aq.saved import Packed
from aqcore import allocate_bits


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
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


def resnet(widths=(16, 32, 64), blocks=2, classes=10) -> nn.Module:
    """ResNet for 32x32 inputs, with an ImageNet-style max-pool stem."""
    layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    cin = widths[0]
    for i, w in enumerate(widths):
        for b in range(blocks):
            layers.append(BasicBlock(cin, w, 2 if (b == 0 and i > 0) else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def digits(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(Path(__file__).parent / "data" / "digits.npz")
    images = torch.from_numpy(data["images"][offset:offset + n]).float().div(16).unsqueeze(1)
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return (images - 0.3) / 0.4, torch.from_numpy(data["labels"][offset:offset + n]).long()


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd holds for backward after the forward and loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    compact = 0
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        held = getattr(node, "held", None)
        if isinstance(held, Packed):
            compact += held.nbytes
        for name in ("mask",):
            if hasattr(node, name):
                compact += getattr(node, name).nbytes
        if hasattr(node, "offset"):
            compact += node.offset.numel() * node.offset.element_size()
        stack.extend(fn for fn, _ in node.next_functions)
    loss.backward()
    model.zero_grad()
    return sum(storages.values()) + compact


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


class PublishedPricing:
    """The published ActNN-AQ allocator inside ours, for comparison (ALGORITHMS.md B.7, D.4):
    the greedy heap, and every AQ level priced like 1-bit rounding."""

    def __enter__(self):
        self.level_errors, self.allocate = aqcore.level_errors, scheme.allocate_bits

        def priced(rows, group_size, levels):
            one_bit = self.level_errors(rows, group_size, (aqcore.parse_level("1"),))
            plain = tuple(l for l in levels if not l.is_aq)
            errors = self.level_errors(rows, group_size, plain)
            return torch.cat([errors, one_bit.expand(-1, len(levels) - len(plain))], 1)

        scheme.aqcore.level_errors = priced
        scheme.allocate_bits = lambda *a: allocate_bits(*a, method="greedy")
        return self

    def __exit__(self, *exc):
        scheme.aqcore.level_errors, scheme.allocate_bits = self.level_errors, self.allocate


SETTINGS = [
    ("exact", None, {}),
    ("L0", "L0", {}),
    ("8 bit (L2)", "L2", dict(bit=8)),
    ("4 bit, BN stock (L1)", "L1", {}),
    ("4 bit (L2)", "L2", {}),
    ("2 bit (L2)", "L2", dict(bit=2)),
    ("1 bit (L2)", "L2", dict(bit=1)),
    ("L3 2 bit", "L3", {}),
    ("L3 2 bit, aq 0.5", "L3", dict(aq_bit=0.5)),
    ("L3 1.5 bit, aq 0.5", "L3", dict(bit=1.5, aq_bit=0.5)),
    ("L3 1.5 bit, aq 0.25", "L3", dict(bit=1.5, aq_bit=0.25)),
    ("L3 1.25 bit, aq 0.5", "L3", dict(bit=1.25, aq_bit=0.5)),
    ("L3 1.25 bit, aq 0.25", "L3", dict(bit=1.25, aq_bit=0.25)),
    ("L3 1 bit, aq 0.5", "L3", dict(bit=1, aq_bit=0.5)),
    ("L3 1 bit, no aq", "L3", dict(bit=1)),
    ("published pricing, L3 1.5 bit, aq 0.5", "L3", dict(bit=1.5, aq_bit=0.5, published=True)),
    ("published pricing, L3 1.25 bit, aq 0.5", "L3", dict(bit=1.25, aq_bit=0.5, published=True)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = resnet()
    opt = torch.optim.SGD(base.parameters(), lr=0.05, momentum=0.9)
    for step in range(30):
        opt.zero_grad()
        images, labels = digits(32, 32 * step)
        F.cross_entropy(base(images), labels).backward()
        opt.step()
    x, y = digits(args.batch, 1500)
    exact_grad = gradient(base, x, y)
    rows = []
    for name, level, kwargs in SETTINGS:
        kwargs = dict(kwargs)
        published = kwargs.pop("published", False)
        model = copy.deepcopy(base)
        if level is not None:
            actnn_aq.set_optimization_level(level, **kwargs)
            model = actnn_aq.QModule(model)
        with PublishedPricing() if published else contextlib.nullcontext():
            for _ in range(args.warmup):
                gradient(model, x, y)
            nbytes = saved_bytes(model, x, y)
            errors = [((gradient(model, x, y) - exact_grad).norm() / exact_grad.norm()).item()
                      for _ in range(args.seeds)]
        rows.append(dict(setting=name, bytes_per_sample=nbytes / args.batch, grad_rel_error=sum(errors) / len(errors)))
    exact_bytes = rows[0]["bytes_per_sample"]
    print(f"ResNet ({sum(p.numel() for p in base.parameters())} parameters), batch {args.batch}, 3x32x32 digits")
    print(f"| setting | bytes/sample | x smaller | grad rel. error |")
    print(f"|---|---|---|---|")
    for r in rows:
        r["compression"] = exact_bytes / r["bytes_per_sample"]
        print(f"| {r['setting']} | {r['bytes_per_sample']:.0f} | {r['compression']:.1f} | {r['grad_rel_error']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
