"""actnn_aq on a small ResNet (CPU): bytes saved for backward per sample at each level, and
the relative error of the parameter gradient against exact training.

Data: the bundled digits (benchmark/data), upsampled to 3 x 32 x 32; the model is first
trained for a few SGD steps so that weights and activations are not a fresh init's.

    python benchmark/actnn_resnet_bytes.py [--batch 32] [--seeds 8] [--json out.json]

Bytes: what the forward and loss allocate and leave held for backward (the profiler's
allocation events: saved tensors, compressed payloads + metadata, masks, pool offsets). Gradient error: ||g - g_exact|| / ||g_exact|| on a fixed batch,
averaged over independent rounding seeds, after `warmup` steps let the per-layer
allocation adapt (no optimizer step, so every measurement sees the same weights).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import actnn_aq  # noqa: E402
import aqcore  # noqa: E402
from actnn_aq import scheme  # noqa: E402
from common import allocated_during, digits, resnet  # noqa: E402


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes the forward and loss leave allocated for backward."""
    held, loss = allocated_during(lambda: F.cross_entropy(model(x), y), x.device)
    loss.backward()
    model.zero_grad()
    return held


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


class PublishedPricing:
    """The published ActNN-AQ error model inside ours, for comparison (docs/frameworks.md,
    "Average Quantization"): every AQ level priced like 1-bit rounding (the allocation
    itself stays ours)."""

    def __enter__(self):
        self.level_errors = aqcore.level_errors

        def priced(rows, group_size, levels):
            one_bit = self.level_errors(rows, group_size, (aqcore.parse_level("1"),))
            plain = tuple(l for l in levels if not l.is_aq)
            errors = self.level_errors(rows, group_size, plain)
            return torch.cat([errors, one_bit.expand(-1, len(levels) - len(plain))], 1)

        scheme.aqcore.level_errors = priced
        return self

    def __exit__(self, *exc):
        scheme.aqcore.level_errors = self.level_errors


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
    base = resnet(stem_pool=True)
    images, labels = digits()
    opt = torch.optim.SGD(base.parameters(), lr=0.05, momentum=0.9)
    for step in range(30):
        opt.zero_grad()
        batch = slice(32 * step, 32 * step + 32)
        F.cross_entropy(base(images[batch]), labels[batch]).backward()
        opt.step()
    x, y = images[1500:1500 + args.batch], labels[1500:1500 + args.batch]
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
