"""The main job: train a small ResNet on the bundled digits three ways (exact, gact_aq,
actnn_aq with AQ) and print accuracy, activation memory and step time side by side.

    python benchmark/demo.py [--bit 1.5] [--aq-bit 0.5] [--epochs 6] [--device cpu|cuda]

Activation memory = bytes allocated after the forward and loss minus before the forward
(torch.cuda.memory_allocated on a GPU, the profiler's allocation events on the CPU),
everything held included: payloads, metadata, masks, uncompressed small tensors.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import actnn_aq  # noqa: E402
import gact_aq  # noqa: E402
from common import allocated_during, digits, median_ms, now, resnet  # noqa: E402
from gact_aq.controller import Controller  # noqa: E402

TRAIN = 1500


def run(mode: str, args, data) -> dict:
    images, labels = data
    device = images.device
    torch.manual_seed(0)
    model = resnet().to(device)
    controller = None
    if mode == "gact_aq":
        gact_aq.set_optimization_level("L2.2", bit=args.bit, aq_bit=args.aq_bit)
        gact_aq.set_adapt_interval(args.adapt_interval)
        controller = Controller(model)
        controller.install_hook()
    elif mode == "actnn_aq":
        actnn_aq.set_optimization_level("L3", bit=args.bit, aq_bit=args.aq_bit)
        model = actnn_aq.QModule(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    order = torch.Generator().manual_seed(1)
    times = []
    try:
        for epoch in range(args.epochs):
            model.train()
            batches = [b for b in torch.randperm(TRAIN, generator=order).split(args.batch)
                       if len(b) == args.batch]
            progress = tqdm(batches, desc=f"{mode:<9} epoch {epoch + 1}/{args.epochs}",
                            unit="step")
            total = 0.0
            for step, batch in enumerate(progress, 1):
                x, y = images[batch], labels[batch]
                start = now(device)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                if controller is not None:
                    def backprop():
                        optimizer.zero_grad()
                        F.cross_entropy(model(x[:8]), y[:8]).backward()
                    controller.iterate(backprop)
                times.append(now(device) - start)
                total += loss.item()
                progress.set_postfix(loss=f"{total / step:.3f}")
        x, y = images[:args.batch], labels[:args.batch]
        held, loss = allocated_during(lambda: F.cross_entropy(model(x), y), device)
        loss.backward()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            predicted = model(images[TRAIN:]).argmax(1)
        accuracy = (predicted == labels[TRAIN:]).float().mean().item()
    finally:
        if controller is not None:
            controller.uninstall_hook()
    return {"mode": mode, "accuracy": accuracy, "activation_bytes": held,
            "step_ms": median_ms(times[len(times) // 4:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bit", type=float, default=1.5)
    parser.add_argument("--aq-bit", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--adapt-interval", type=int, default=25,
                        help="gact_aq: steps between sensitivity measurements")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    data = digits(device=args.device)
    print(f"ResNet on digits (32x32, {TRAIN} train / {len(data[1]) - TRAIN} test), batch "
          f"{args.batch}, {args.epochs} epochs, {args.device}; compressed runs at {args.bit} "
          f"bits with AQ down to {args.aq_bit} bit", flush=True)
    rows = []
    for mode in ("exact", "gact_aq", "actnn_aq"):
        rows.append(run(mode, args, data))
        print(f"  {mode:<9} done", flush=True)
    exact = rows[0]
    print(f"\n{'mode':<10} {'test acc':>8} {'activation MiB':>15} {'smaller':>8} "
          f"{'step ms':>8} {'x exact':>8}")
    for r in rows:
        print(f"{r['mode']:<10} {r['accuracy']:>8.3f} {r['activation_bytes'] / 2**20:>15.2f} "
              f"{exact['activation_bytes'] / r['activation_bytes']:>7.1f}x "
              f"{r['step_ms']:>8.1f} {r['step_ms'] / exact['step_ms']:>7.2f}x")
    if args.device == "cpu":
        print("\n(on the CPU, compression runs the plain-PyTorch reference path; on a GPU the "
              "fused CUDA kernels are used)")


if __name__ == "__main__":
    main()
