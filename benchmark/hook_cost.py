"""Host time of gact_aq's saved-tensor hooks: microseconds per pack and per unpack.

    python benchmark/hook_cost.py [--layers 24 --hidden 1024 --heads 16 --batch 32 --seq-len 128] [--bf16]

A BERT built from a config (SDPA attention, no download) trains under a gact_aq Controller
(L2.2 at --bit / --aq-bit) until its levels have adapted; then --steps more steps run with
the Controller's pack and unpack wrapped in timers. The timers see host time only (nothing
synchronizes inside them): on a GPU that is what the step waits for when the device is idle.
Reported per step: saved tensors packed and unpacked, host microseconds per pack and per
unpack, their share of the step, and the median step with and without the hooks.
JSON to benchmark/results/hook_cost_<device>.json with the command, device, torch and date.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gact_aq  # noqa: E402
from common import median_run_ms  # noqa: E402
from gact_aq.controller import Controller  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class Timed:
    """A hook wrapped in a host timer: calls and seconds."""

    def __init__(self, hook):
        self.hook, self.calls, self.seconds = hook, 0, 0.0

    def __call__(self, arg):
        start = time.perf_counter()
        try:
            return self.hook(arg)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def bert(args, device: torch.device):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                        num_labels=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).to(device).train()
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    labels = torch.randint(0, 2, (args.batch,), device=device)
    return model, tokens, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--bit", type=float, default=1.25)
    parser.add_argument("--aq-bit", type=float, default=0.5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokens, labels = bert(args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def backprop(x=tokens, y=labels) -> None:
        optimizer.zero_grad()
        with autocast:
            loss = model(input_ids=x, labels=y).loss
        loss.backward()

    def step() -> None:
        backprop()
        optimizer.step()

    step()
    exact_ms = median_run_ms(step, args.steps, device)
    gact_aq.set_optimization_level("L2.2", bit=args.bit, aq_bit=args.aq_bit)
    controller = Controller(model)
    with controller:
        for _ in range(3):  # adaptations at iterations 0, 1, 2
            step()
            controller.iterate(lambda: backprop(tokens[:4], labels[:4]))
    pack, unpack = Timed(controller.packer.pack), Timed(controller.packer.unpack)
    controller.packer.pack, controller.packer.unpack = pack, unpack
    with controller:
        hooked_ms = median_run_ms(step, args.steps, device)
    steps = args.steps
    record = {"packs_per_step": pack.calls / steps, "unpacks_per_step": unpack.calls / steps,
              "pack_us": 1e6 * pack.seconds / max(pack.calls, 1),
              "unpack_us": 1e6 * unpack.seconds / max(unpack.calls, 1),
              "hooks_ms_per_step": 1e3 * (pack.seconds + unpack.seconds) / steps,
              "step_ms": hooked_ms, "exact_step_ms": exact_ms}
    record["hooks_share_of_step"] = record["hooks_ms_per_step"] / hooked_ms
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"command": "python " + " ".join(sys.argv), "device": name, "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "config": vars(args), **record}
    out = Path(args.out) if args.out else RESULTS / f"hook_cost_{re.sub(r'[^a-z0-9]+', '_', name.lower())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"{record['packs_per_step']:.0f} packs, {record['unpacks_per_step']:.0f} unpacks per step: "
          f"{record['pack_us']:.1f} us per pack, {record['unpack_us']:.1f} us per unpack, "
          f"{record['hooks_ms_per_step']:.2f} ms of a {hooked_ms:.1f} ms step "
          f"({100 * record['hooks_share_of_step']:.1f}%; exact {exact_ms:.1f} ms)")


if __name__ == "__main__":
    main()
