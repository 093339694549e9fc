"""Training step time and activation memory: exact vs gact_aq vs actnn_aq, same batch.

    python benchmark/train_step.py --model resnet50 [--batch 128] [--bit 1.5 --aq-bit 0.5]
    python benchmark/train_step.py --model bert-large [--batch 32]
    python benchmark/train_step.py --model resnet50 --nchw --modes exact actnn_aq actnn_aq-noguard

Per mode: warm-up steps (gact_aq adapts its levels on the first), then the median of
--steps timed steps (forward + backward + optimizer, synchronized). Activation memory =
torch.cuda.memory_allocated after the loss minus before the forward (metadata included);
peak = max_memory_allocated over one step. Results are appended, mode by mode, to
benchmark/results/train_step_<model>_<bit>b_<gpu>.json with the command, GPU, torch and date.
`--model tiny` runs a small ResNet on the bundled digits shape, also on the CPU.
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
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))

import actnn_aq  # noqa: E402
import gact_aq  # noqa: E402
from common import allocated_during, median_run_ms, now, resnet  # noqa: E402
from gact_aq.controller import Controller  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("exact", "exact-bf16", "checkpoint", "gact_aq", "actnn_aq", "gact_aq-noguard",
         "actnn_aq-noguard")  # -noguard: the same with config.guard off (what the guard costs)


class Checkpointed(nn.Module):
    """Recompute a block in backward instead of keeping its activations."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def checkpoint_blocks(model: nn.Module, name: str) -> None:
    """Gradient checkpointing of every residual block (every layer for BERT)."""
    if name == "bert-large":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    blocks = [(parent, name, child) for parent in model.modules()
              for name, child in parent.named_children()
              if type(child).__name__ in ("Bottleneck", "BasicBlock")]
    for parent, name, child in blocks:
        setattr(parent, name, Checkpointed(child))


def build(name: str, batch: int, device: torch.device, channels_last: bool = True):
    """(model, inputs, labels, loss_fn) for one benchmark model (ResNet-50 channels_last
    unless channels_last is False)."""
    if name == "bert-large":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                            intermediate_size=4096, num_labels=2, attn_implementation="eager")
        model = BertForSequenceClassification(config).to(device)
        inputs = torch.randint(0, config.vocab_size, (batch, 128), device=device)
        labels = torch.randint(0, 2, (batch,), device=device)
        return model, inputs, labels, lambda m, x, y: m(input_ids=x, labels=y).loss
    if name == "resnet50":
        import torchvision

        layout = torch.channels_last if channels_last else torch.contiguous_format
        model = torchvision.models.resnet50().to(device).to(memory_format=layout)
        inputs = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=layout)
    else:
        model = resnet().to(device)
        inputs = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    return model, inputs, labels, lambda m, x, y: F.cross_entropy(m(x), y)


class Setup:
    """One mode ready to train: the (converted) model, its step, and gact_aq's controller."""

    def __init__(self, mode: str, args, device: torch.device):
        torch.manual_seed(0)
        model, self.x, self.y, self.loss_fn = build(args.model, args.batch, device, not args.nchw)
        model.train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mode == "exact-bf16" \
            else contextlib.nullcontext()
        self.controller = None
        if mode == "checkpoint":
            checkpoint_blocks(model, args.model)
        framework, _, variant = mode.partition("-")
        if framework == "gact_aq":
            gact_aq.set_optimization_level("L2.2", bit=args.bit, aq_bit=args.aq_bit).guard = variant != "noguard"
            self.controller = Controller(model)
            self.controller.install_hook()
        elif framework == "actnn_aq":
            actnn_aq.set_optimization_level("L3", bit=args.bit, aq_bit=args.aq_bit).guard = variant != "noguard"
            model = actnn_aq.QModule(model)
        self.model = model

    def backprop(self) -> None:
        """gact_aq's adaptation pass: a small batch."""
        self.optimizer.zero_grad()
        self.loss_fn(self.model, self.x[:8], self.y[:8]).backward()

    def step(self) -> None:
        self.optimizer.zero_grad()
        with self.autocast:
            loss = self.loss_fn(self.model, self.x, self.y)
        loss.backward()
        self.optimizer.step()

    def warm_up(self, steps: int, device: torch.device) -> float:
        """Run warm-up steps (gact_aq adapts after each); seconds of the first adaptation."""
        adapt_s = 0.0
        for i in range(steps):
            self.step()
            if self.controller is not None:
                start = now(device)
                self.controller.iterate(self.backprop)
                adapt_s += now(device) - start if i == 0 else 0.0
        return adapt_s

    def median_step_ms(self, steps: int, device: torch.device) -> float:
        """The median of `steps` synchronized training steps, in ms."""
        return median_run_ms(self.step, steps, device)

    def close(self) -> None:
        if self.controller is not None:
            self.controller.uninstall_hook()


def measure(mode: str, args, device: torch.device) -> dict:
    run = Setup(mode, args, device)
    model, x, y, loss_fn, autocast = run.model, run.x, run.y, run.loss_fn, run.autocast
    try:
        adapt_s = run.warm_up(args.warmup, device)
        step_ms = run.median_step_ms(args.steps, device)
        run.optimizer.zero_grad(set_to_none=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with autocast:
            held, loss = allocated_during(lambda: loss_fn(model, x, y), device)
        loss.backward()
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    finally:
        run.close()
    return {"mode": mode, "step_ms": step_ms, "activation_mib": held / 2**20,
            "peak_mib": None if peak is None else peak / 2**20, "adapt_s": adapt_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=("resnet50", "bert-large", "tiny"))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--bit", type=float, default=1.5)
    parser.add_argument("--aq-bit", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES[:5]), choices=MODES)
    parser.add_argument("--nchw", action="store_true", help="ResNet-50 in NCHW, not channels_last")
    args = parser.parse_args()
    args.batch = args.batch or {"resnet50": 128, "bert-large": 32, "tiny": 32}[args.model]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    layout = "_nchw" if args.nchw else ""
    out = RESULTS / f"train_step_{args.model}{layout}_{args.bit:g}b_{re.sub(r'[^a-z0-9]+', '_', gpu.lower())}.json"
    report = {"command": "python " + " ".join(sys.argv), "gpu": gpu, "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "model": args.model, "nchw": args.nchw, "batch": args.batch, "bit": args.bit, "aq_bit": args.aq_bit,
              "records": []}
    RESULTS.mkdir(exist_ok=True)
    for mode in args.modes:
        started = time.time()
        record = measure(mode, args, device)
        report["records"].append(record)
        out.write_text(json.dumps(report, indent=1))
        exact = report["records"][0]
        print(f"{args.model} b{args.batch} {mode:<10} step {record['step_ms']:8.1f} ms "
              f"({record['step_ms'] / exact['step_ms']:.2f}x)  act {record['activation_mib']:9.1f} MiB "
              f"({exact['activation_mib'] / max(record['activation_mib'], 1e-9):.1f}x smaller)  "
              f"adapt {record['adapt_s']:.1f} s  [{time.time() - started:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
