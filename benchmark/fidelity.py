"""Training fidelity: long runs of exact and compressed training, side by side.

    python benchmark/fidelity.py --task resnet [--modes exact gact-1.25aq actnn-2 ...]
    python benchmark/fidelity.py --task bert --device cuda --bf16
    python benchmark/fidelity.py --plot benchmark/results/fidelity_resnet_cpu.json

Every mode trains the same model from the same initialization on the same batches in
the same order; only what the activations are stored as differs. Per epoch: mean training
loss, held-out loss and accuracy; over the run: non-finite losses (a run stops at the
first) and the actions of the compression guard. Results: JSON in benchmark/results/
(with the command, device, torch version and date), a Markdown table on stdout and a PNG
of the loss curves (when matplotlib is installed; --plot redraws it from the JSON).

Tasks (no downloads):
* resnet: a ResNet with BatchNorm. --model small (CPU default: 3 stages of basic blocks)
  or a torchvision name (resnet18, resnet50, ... with the CIFAR stem: 3x3 conv, no
  max-pool). Data: --data a folder of CIFAR-10 binary batches (data_batch_*.bin,
  test_batch.bin) or an ImageFolder root with train/ and val/; else a learnable built-in
  task (noisy class templates). SGD with Nesterov momentum, weight decay, OneCycle.
* bert: BertForSequenceClassification built from a config, SDPA attention (dropout 0.1),
  AdamW with warmup; a built-in task that needs attention to pool the whole sequence
  (do tokens of one class outnumber those of another?).
* lm: a small causal transformer of our own (SDPA attention, LayerNorm, GELU), AdamW with
  warmup, learning to copy the first half of each sequence (no dependency beyond torch).
Any task can run under bf16 autocast (--bf16).

Modes: exact, or FRAMEWORK-BITS[aq]: gact / actnn, BITS the fixed level (4, 2: gact L1,
actnn L2) or with "aq" the target of per-tensor / per-sample allocation with AQ down to
--aq-bit (gact L2.2, actnn L3), e.g. gact-1.25aq.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import actnn_aq  # noqa: E402
import gact_aq  # noqa: E402
from common import resnet  # noqa: E402
from gact_aq.controller import Controller  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODE = re.compile(r"^(gact|actnn)-(\d+(?:\.\d+)?)(aq)?$")
DEFAULT_MODES = ("exact", "gact-4", "gact-2", "gact-2aq", "gact-1.5aq", "gact-1.25aq",
                 "actnn-4", "actnn-2", "actnn-2aq", "actnn-1.5aq", "actnn-1.25aq")


# ----------------------------------------------------------------------------- data

@dataclass
class Task:
    """A classification problem: tensors on the device, a model factory, the optimizer.
    forward gives logits (..., classes) for labels (...) of the same leading shape."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module, int], tuple]
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return F.cross_entropy(self.forward(model, x).flatten(0, -2), y.flatten(), **kwargs)


def template_images(n: int, seed: int, size: int = 32, classes: int = 10, noise: float = 1.0) -> tuple:
    """A learnable image task: smooth class templates under strong smooth and pixel noise
    (noise scales both; at 1 a ResNet-18 learns it perfectly in a few hundred steps)."""
    templates = F.interpolate(torch.randn(classes, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                              size=size, mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(1000 + seed)
    y = torch.randint(0, classes, (n,), generator=g)
    smooth = F.interpolate(torch.randn(n, 3, size // 2, size // 2, generator=g), size=size,
                           mode="bilinear", align_corners=False)
    return templates[y] + noise * (1.5 * smooth + 0.5 * torch.randn(n, 3, size, size, generator=g)), y


def cifar_binary(folder: Path) -> tuple:
    """CIFAR-10 binary batches: records of 1 label byte and 3072 pixel bytes."""
    def load(files):
        raw = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files]).reshape(-1, 3073)
        x = torch.from_numpy(raw[:, 1:].copy()).float().div(255).view(-1, 3, 32, 32)
        return x, torch.from_numpy(raw[:, 0].astype(np.int64))
    train = load(sorted(folder.glob("data_batch_*.bin")))
    test = load([folder / "test_batch.bin"])
    mean, std = train[0].mean((0, 2, 3), keepdim=True), train[0].std((0, 2, 3), keepdim=True)
    return (train[0] - mean) / std, train[1], (test[0] - mean) / std, test[1]


def image_folder(root: Path, size: int = 32) -> tuple:
    import torchvision

    tf = torchvision.transforms.Compose([torchvision.transforms.Resize((size, size)),
                                         torchvision.transforms.ToTensor()])

    def load(split):
        data = torchvision.datasets.ImageFolder(str(root / split), transform=tf)
        xs, ys = zip(*[data[i] for i in range(len(data))])
        return torch.stack(xs), torch.tensor(ys)
    return (*load("train"), *load("val"))


def cifar_resnet(name: str, classes: int) -> nn.Module:
    """A torchvision ResNet with the CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    import torchvision

    model = getattr(torchvision.models, name)(num_classes=classes)
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def resnet_task(args, device: torch.device) -> Task:
    if args.data and (Path(args.data) / "test_batch.bin").exists():
        train_x, train_y, test_x, test_y = cifar_binary(Path(args.data))
    elif args.data:
        train_x, train_y, test_x, test_y = image_folder(Path(args.data))
    else:
        train_x, train_y = template_images(args.train_size, 0, args.image_size, noise=args.noise)
        test_x, test_y = template_images(args.test_size, 1, args.image_size, noise=args.noise)
    classes = int(train_y.max()) + 1
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    widths = {"small": (16, 32, 64), "tiny": (8, 16, 32)}

    def make_model():
        model = resnet(widths[args.model], blocks=1, classes=classes) if args.model in widths \
            else cifar_resnet(args.model, classes)
        return model.to(device).to(memory_format=memory_format)

    def make_optimizer(model, total_steps):
        opt = torch.optim.SGD(model.parameters(), lr=args.lr or 0.03, momentum=0.9, nesterov=True,
                              weight_decay=5e-4)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr or 0.03,
                                                        total_steps=total_steps)

    def forward(model, x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            return model(x.contiguous(memory_format=memory_format)).float()

    return Task("resnet", train_x.to(device), train_y.to(device), test_x.to(device),
                test_y.to(device), make_model, make_optimizer, forward)


def majority_task(n: int, seed: int, vocab: int, length: int) -> tuple:
    """Token sequences after a [CLS] token; a quarter of the vocabulary is positive, a
    quarter negative: label 1 when positive tokens outnumber negative ones. Every position
    counts, so the [CLS] output must pool them all."""
    g = torch.Generator().manual_seed(2000 + seed)
    x = torch.randint(3, vocab, (n, length), generator=g)
    x[:, 0] = 1  # [CLS]
    quarter = (vocab - 3) // 4
    positive = (x >= 3) & (x < 3 + quarter)
    negative = (x >= 3 + quarter) & (x < 3 + 2 * quarter)
    return x, (positive.sum(1) > negative.sum(1)).long()


def bert_task(args, device: torch.device) -> Task:
    from transformers import BertConfig, BertForSequenceClassification

    vocab, length = 512, args.seq_len
    train_x, train_y = majority_task(args.train_size, 0, vocab, length)
    test_x, test_y = majority_task(args.test_size, 1, vocab, length)
    sizes = {"tiny": (128, 2, 2), "base": (768, 12, 12), "large": (1024, 24, 16)}
    hidden, layers, heads = sizes[args.model if args.model in sizes else "tiny"]
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=length, num_labels=2)
    config._attn_implementation = "sdpa"

    def make_model():
        return BertForSequenceClassification(config).to(device)

    make_optimizer = adamw_with_warmup(args.lr or 3e-4)

    def forward(model, x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            return model(input_ids=x).logits.float()

    return Task("bert", train_x.to(device), train_y.to(device), test_x.to(device),
                test_y.to(device), make_model, make_optimizer, forward)


def adamw_with_warmup(lr: float) -> Callable:
    """AdamW, linear warmup over the first 10% of the steps, then linear decay."""
    def make_optimizer(model, total_steps):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        warm = max(1, total_steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (total_steps - s) / (total_steps - warm))))
        return opt, schedule
    return make_optimizer


class Decoder(nn.Module):
    """A small causal transformer: pre-norm blocks of SDPA attention and a GELU MLP."""

    def __init__(self, vocab: int, width: int, heads: int, layers: int, length: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(length, width) * 0.02)
        self.blocks = nn.ModuleList(DecoderBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class DecoderBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


def copy_task(n: int, seed: int, vocab: int, length: int) -> tuple:
    """Sequences whose second half repeats the first: (tokens, the second half to predict)."""
    g = torch.Generator().manual_seed(3000 + seed)
    first = torch.randint(0, vocab, (n, length // 2), generator=g)
    return torch.cat([first, first], 1), first


def lm_task(args, device: torch.device) -> Task:
    """A decoder learning to copy: needs attention (to look back half a sequence)."""
    vocab, length = 64, args.seq_len
    train_x, train_y = copy_task(args.train_size, 0, vocab, length)
    test_x, test_y = copy_task(args.test_size, 1, vocab, length)
    sizes = {"tiny": (64, 4, 2), "small": (128, 4, 3)}
    width, heads, layers = sizes[args.model if args.model in sizes else "tiny"]

    def make_model():
        return Decoder(vocab, width, heads, layers, length).to(device)

    def forward(model, x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(x)
        return logits[:, length // 2 - 1 : -1].float()  # predictions of the second half

    return Task("lm", train_x.to(device), train_y.to(device), test_x.to(device),
                test_y.to(device), make_model, adamw_with_warmup(args.lr or 3e-3), forward)


TASKS = {"resnet": resnet_task, "bert": bert_task, "lm": lm_task}


# ----------------------------------------------------------------------------- modes

class Compression:
    """Sets up one mode around a model: nothing, a gact_aq Controller or an actnn_aq QModule."""

    def __init__(self, mode: str, aq_bit: float):
        self.mode = mode
        self.controller: Controller | None = None
        match = MODE.match(mode)
        if mode != "exact" and match is None:
            raise ValueError(f"unknown mode {mode!r}: exact, or gact-/actnn- then bits, with 'aq' "
                             "for allocation with AQ (e.g. gact-1.25aq, actnn-2)")
        self.framework, bits, aq = match.groups() if match else (None, None, None)
        self.bits, self.aq_bit = (float(bits) if bits else None), (aq_bit if aq else 0)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.framework == "actnn":
            actnn_aq.set_optimization_level("L3" if self.aq_bit else "L2", bit=self.bits,
                                            aq_bit=self.aq_bit)
            return actnn_aq.QModule(model)
        if self.framework == "gact":
            gact_aq.set_optimization_level("L2.2" if self.aq_bit else "L1", bit=self.bits,
                                           aq_bit=self.aq_bit)
            self.controller = Controller(model)
            self.controller.install_hook()
        return model

    def after_step(self, backprop: Callable[[], None]) -> None:
        if self.controller is not None:
            self.controller.iterate(backprop)

    def guard_events(self, model: nn.Module) -> list:
        if self.controller is not None:
            return list(self.controller.guard_events)
        return list(getattr(getattr(model, "controller", None), "guard_events", []))

    def close(self) -> None:
        if self.controller is not None:
            self.controller.uninstall_hook()


# ----------------------------------------------------------------------------- training

def evaluate(task: Task, model: nn.Module, batch: int) -> tuple[float, float]:
    model.eval()
    loss = correct = 0.0
    with torch.no_grad():
        for start in range(0, len(task.test_y), batch):
            x, y = task.test_x[start:start + batch], task.test_y[start:start + batch]
            loss += task.loss(model, x, y, reduction="sum").item()
            correct += (task.forward(model, x).argmax(-1) == y).sum().item()
    model.train()
    return loss / task.test_y.numel(), correct / task.test_y.numel()


def train(task: Task, mode: str, epochs: int, batch: int, seed: int = 0, aq_bit: float = 0.5,
          curve_every: int = 10, progress: bool = True) -> dict:
    """One run; the same initialization and batch order for every mode of a seed."""
    torch.manual_seed(seed)
    model = task.make_model()
    compression = Compression(mode, aq_bit)
    model = compression.wrap(model)
    per_epoch = len(task.train_y) // batch
    optimizer, schedule = task.make_optimizer(model, epochs * per_epoch)
    order = torch.Generator().manual_seed(seed + 1)
    record = {"mode": mode, "seed": seed, "epochs": [], "curve": [], "non_finite_step": None}
    start, step = time.perf_counter(), 0
    try:
        for epoch in range(epochs):
            if record["non_finite_step"] is not None:
                break
            batches = torch.randperm(len(task.train_y), generator=order)[:per_epoch * batch]
            total, bar = 0.0, tqdm(batches.view(per_epoch, batch), desc=f"{mode} epoch {epoch + 1}",
                                   leave=False, disable=None if progress else True, file=sys.stderr)
            for index in bar:
                index = index.to(task.train_y.device)
                x, y = task.train_x[index], task.train_y[index]
                loss = task.loss(model, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()

                def backprop(x=x[: batch // 4], y=y[: batch // 4]):
                    optimizer.zero_grad(set_to_none=True)
                    task.loss(model, x, y).backward()
                compression.after_step(backprop)
                value = loss.item()
                if not math.isfinite(value):
                    record["non_finite_step"] = step
                    break
                total += value
                if step % curve_every == 0:
                    record["curve"].append((step, value))
                step += 1
                bar.set_postfix(loss=f"{total / (bar.n + 1):.3f}")
            else:
                test_loss, accuracy = evaluate(task, model, batch)
                record["epochs"].append({"train_loss": total / per_epoch, "test_loss": test_loss,
                                         "test_accuracy": accuracy})
    finally:
        compression.close()
    record["guard_events"] = compression.guard_events(model)
    record["wall_s"] = time.perf_counter() - start
    return record


# ----------------------------------------------------------------------------- output

def table(results: dict) -> str:
    lines = ["| mode | seeds | final train loss | held-out accuracy | vs exact | non-finite | guard actions |",
             "|---|---|---|---|---|---|---|"]
    exact = _final(results["runs"].get("exact", []), "test_accuracy")
    for mode, runs in results["runs"].items():
        acc = _final(runs, "test_accuracy")
        delta = "" if exact is None or acc is None or mode == "exact" else f"{100 * (acc - exact):+.2f} pt"
        bad = sum(r["non_finite_step"] is not None for r in runs)
        guard = sum(len(r["guard_events"]) for r in runs)
        loss = _final(runs, "train_loss")
        lines.append(f"| {mode} | {len(runs)} | {_fmt(loss, '.4f')} | {_fmt(acc, '.4f')} | {delta} "
                     f"| {bad} | {guard} |")
    return "\n".join(lines)


def _final(runs: list, key: str) -> float | None:
    """Mean over the runs of the last epoch's value (None if a run has no epoch)."""
    values = [r["epochs"][-1][key] for r in runs if r["epochs"] and r["non_finite_step"] is None]
    return float(np.mean(values)) if values and len(values) == len(runs) else None


def _fmt(value, spec: str) -> str:
    return "diverged" if value is None else format(value, spec)


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for mode, runs in results["runs"].items():
        steps, losses = zip(*runs[0]["curve"]) if runs[0]["curve"] else ((), ())
        ax.plot(steps, losses, label=mode, lw=1.2 if mode != "exact" else 2.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (seed 0)")
    ax.set_title(f"{results['task']} on {results['device']}")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="resnet")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES))
    parser.add_argument("--model", default="small",
                        help="resnet: small, tiny or a torchvision name; bert: tiny, base, large; lm: tiny, small")
    parser.add_argument("--data", default=None, help="CIFAR-10 binary folder or ImageFolder root")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.0, help="default: 0.03 (resnet), 3e-4 (bert)")
    parser.add_argument("--aq-bit", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-size", type=int, default=6400)
    parser.add_argument("--test-size", type=int, default=1280)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32, help="built-in image task")
    parser.add_argument("--noise", type=float, default=1.0, help="built-in image task: noise scale")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmark/results/...)")
    parser.add_argument("--plot", default=None, help="redraw the PNG of an existing JSON and exit")
    args = parser.parse_args(argv)
    if args.plot:
        path = Path(args.plot)
        print(plot(json.loads(path.read_text()), path.with_suffix(".png")))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = TASKS[args.task](args, device)
    results = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
               "device": device_name(device), "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "task": args.task, "model": args.model,
               "config": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
               "runs": {}}
    name = f"fidelity_{args.task}_{args.model}_{re.sub('[^a-z0-9]+', '_', results['device'].lower())}"
    out = Path(args.out) if args.out else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        results["runs"][mode] = [train(task, mode, args.epochs, args.batch, seed, args.aq_bit)
                                 for seed in args.seeds]
        out.write_text(json.dumps(results, indent=1))
        print(f"{mode}: {json.dumps(results['runs'][mode][-1]['epochs'][-1:])}", flush=True)
    print(table(results))
    print(plot(results, out.with_suffix(".png")) or "(matplotlib not installed: no PNG)")


if __name__ == "__main__":
    main()
