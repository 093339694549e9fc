"""Train an image classifier with exact or compressed saved activations, epoch by epoch.

    python benchmark/vision/train.py --model resnet18 --alg gact-L2.2 --bit 1.25 --aq-bit 0.5 \\
        --data ~/cifar-10-batches-bin --augment --epochs 30
    python benchmark/vision/train.py --model small --alg actnn-L3 --bit 2 --epochs 3   # CPU
    python benchmark/vision/train.py ... --checkpoint run.pt            # later: ... --resume

--alg: exact, checkpoint (every residual block recomputed in backward), actnn-LEVEL (a level
of actnn_aq.set_optimization_level: L0 ... L5, L3-aq0.5-1.25b, ...) or gact-LEVEL (of
gact_aq.set_optimization_level: L0, L1, L1.2, L2, L2.2, ...); --bit / --aq-bit override the
level's target bits and lowest AQ level (0: the level's own).

Data: --data a folder of CIFAR-10 binary batches (data_batch_*.bin, test_batch.bin), an
ImageFolder root with train/ and val/ (needs torchvision), or `digits` (the bundled digits);
without --data, the learnable built-in task of benchmark/fidelity.py (noisy class templates).
Models: `small` (benchmark/common.py's ResNet, no torchvision needed) or a torchvision name;
on images of 64 pixels or less, torchvision models get a CIFAR stem (3x3 stride-1 conv, no
max-pool). SGD (Nesterov momentum 0.9, weight decay 5e-4) with a OneCycle schedule.

Per epoch: training loss, held-out loss and accuracy, activation memory (one step's bytes
allocated from the forward's start to the loss: torch.cuda.memory_allocated on CUDA, the
profiler's allocation events on the CPU), peak memory (CUDA), training throughput. The JSON
log (--out) is rewritten after every epoch. See benchmark/vision/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

BENCHMARK = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARK))

import actnn_aq  # noqa: E402
import gact_aq  # noqa: E402
from common import allocated_during, digits, now, resnet  # noqa: E402
from fidelity import Compression, cifar_binary, cifar_resnet, device_name, template_images  # noqa: E402
from gact_aq.controller import Controller  # noqa: E402
from train_step import Checkpointed, checkpoint_blocks  # noqa: E402

RESULTS = BENCHMARK / "results"
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                      "wide_resnet50_2", "wide_resnet101_2", "densenet121", "densenet161",
                      "densenet169", "densenet201")
MODELS = ("small", *TORCHVISION_MODELS)
FRAMEWORK_LEVELS = {"actnn": actnn_aq.LEVELS, "gact": gact_aq.OPTIMIZATION_LEVELS}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS_TRAIN = 1500  # as benchmark/demo.py: the first 1500 digits train, the rest test
# what must match between a checkpoint and the run that resumes it
RESUME_KEYS = ("model", "alg", "bit", "aq_bit", "batch", "lr", "seed", "data", "image_size",
               "train_size", "test_size", "noise", "augment", "channels_last")


# ----------------------------------------------------------------------------- algorithms

def alg_forms() -> str:
    """The valid --alg forms, for error messages."""
    levels = "; ".join(f"{name}-LEVEL with LEVEL one of {', '.join(table)}"
                       for name, table in FRAMEWORK_LEVELS.items())
    return f"exact, checkpoint, {levels}"


def parse_alg(spec: str) -> tuple[str, str | None]:
    """(framework, level) of an --alg value: ('exact', None), ('checkpoint', None),
    ('actnn', 'L3'), ('gact', 'L2.2'), ... ValueError naming the valid forms otherwise."""
    if spec in ("exact", "checkpoint"):
        return spec, None
    framework, _, level = spec.partition("-")
    if level in FRAMEWORK_LEVELS.get(framework, {}):
        return framework, level
    raise ValueError(f"unknown algorithm {spec!r}; valid: {alg_forms()}")


def alg_argument(spec: str) -> str:
    """argparse type of --alg: the spec itself, checked."""
    try:
        parse_alg(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return spec


class Algorithm(Compression):
    """One --alg around a model: fidelity.py's Compression (whose after_step, guard_events
    and close it keeps), set up from a framework level instead of a fidelity mode."""

    def __init__(self, spec: str, bit: float = 0.0, aq_bit: float = 0.0):
        self.mode = spec
        self.framework, self.level = parse_alg(spec)
        self.bit, self.aq_bit = float(bit), float(aq_bit)
        self.controller: Controller | None = None

    @property
    def compresses(self) -> bool:
        """Whether the level quantizes anything (bit and aq_bit apply only then)."""
        if self.level is None:
            return False
        return FRAMEWORK_LEVELS[self.framework][self.level].get("compress", True)

    def configure(self) -> None:
        """Set the framework's global config to this level (ValueError for bits it refuses)."""
        bit, aq_bit = (self.bit, self.aq_bit) if self.compresses else (0.0, 0.0)
        if self.framework == "actnn":
            actnn_aq.set_optimization_level(self.level, bit=bit, aq_bit=aq_bit)
        elif self.framework == "gact":
            gact_aq.set_optimization_level(self.level, bit=bit, aq_bit=aq_bit)

    def wrap(self, model: nn.Module) -> nn.Module:
        self.configure()
        if self.framework == "checkpoint":
            checkpoint_blocks(model, "resnet")
            if not any(isinstance(m, Checkpointed) for m in model.modules()):
                raise ValueError(f"checkpoint: no BasicBlock or Bottleneck to recompute in "
                                 f"{type(model).__name__}")
        elif self.framework == "actnn":
            return actnn_aq.QModule(model)
        elif self.framework == "gact":
            self.controller = Controller(model)
            self.controller.install_hook()
        return model


# ----------------------------------------------------------------------------- data

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def crop_and_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The CIFAR augmentation: a random crop of the image padded by `pad` and a random
    horizontal flip, per sample, in one gather on x's device."""
    n, _, h, w = x.shape
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=generator).to(x.device)
    flip = (torch.rand(n, 1, generator=generator) < 0.5).to(x.device)
    rows = dy + torch.arange(h, device=x.device)
    cols = dx + torch.arange(w, device=x.device)
    cols = torch.where(flip, cols.flip(1), cols)
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    sample = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[sample, rows.unsqueeze(2), cols.unsqueeze(1)].permute(0, 3, 1, 2)


class Tensors:
    """A data set held on the device: shuffled full batches, the order a function of
    (seed, epoch) alone, so a resumed run sees the batches the uninterrupted one would."""

    def __init__(self, name: str, train: tuple, test: tuple, device: torch.device,
                 augment: bool = False, seed: int = 0):
        self.name = name
        self.train_x, self.train_y = (t.to(device) for t in train)
        self.test_x, self.test_y = (t.to(device) for t in test)
        self.augment, self.seed = augment, seed
        self.classes = int(max(self.train_y.max(), self.test_y.max())) + 1
        self.train_size, self.test_size = len(self.train_y), len(self.test_y)
        self.image_size = self.train_x.shape[-1]

    def steps(self, batch: int) -> int:
        return self.train_size // batch

    def train_batches(self, epoch: int, batch: int) -> Batches:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        steps = self.steps(batch)
        order = torch.randperm(self.train_size, generator=generator)[:steps * batch]
        for index in order.view(steps, batch).to(self.train_y.device):
            x = self.train_x[index]
            yield (crop_and_flip(x, generator) if self.augment else x), self.train_y[index]

    def test_batches(self, batch: int) -> Batches:
        for start in range(0, self.test_size, batch):
            yield self.test_x[start:start + batch], self.test_y[start:start + batch]


class Folder:
    """An ImageFolder root (train/, val/) read by DataLoader workers: for ImageNet-size data
    that does not fit in memory. Training: random resized crops and flips with --augment,
    else the evaluation transform (resize to 8/7 of the size, center crop)."""

    def __init__(self, root: Path, size: int, device: torch.device, augment: bool, seed: int,
                 workers: int):
        import torchvision
        from torchvision import transforms as T

        tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        evaluation = [T.Resize(size * 8 // 7), T.CenterCrop(size)]
        training = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment else evaluation
        self.train = torchvision.datasets.ImageFolder(str(root / "train"), T.Compose(training + tail))
        self.test = torchvision.datasets.ImageFolder(str(root / "val"), T.Compose(evaluation + tail))
        if self.train.classes != self.test.classes:
            raise ValueError(f"{root}: train/ and val/ hold different classes")
        self.name = f"ImageFolder {root}"
        self.device, self.seed, self.workers = device, seed, workers
        self.classes = len(self.train.classes)
        self.train_size, self.test_size = len(self.train), len(self.test)
        self.image_size = size

    def steps(self, batch: int) -> int:
        return self.train_size // batch

    def _loader(self, dataset, batch: int, generator: torch.Generator | None) -> Batches:
        loader = torch.utils.data.DataLoader(
            dataset, batch, shuffle=generator is not None, drop_last=generator is not None,
            generator=generator, num_workers=self.workers, pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batches(self, epoch: int, batch: int) -> Batches:
        order = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return self._loader(self.train, batch, order)

    def test_batches(self, batch: int) -> Batches:
        return self._loader(self.test, batch, None)


def load_data(args: argparse.Namespace, device: torch.device) -> Tensors | Folder:
    """The data set --data names (see the module docstring)."""
    if args.data is None:
        size = args.image_size or 32
        train = template_images(args.train_size, 0, size, noise=args.noise)
        test = template_images(args.test_size, 1, size, noise=args.noise)
        return Tensors(f"built-in templates (noise {args.noise:g}, {size}x{size})", train, test,
                       device, args.augment, args.seed)
    if args.data == "digits":
        images, labels = digits(args.image_size or 32)
        return Tensors("bundled digits", (images[:DIGITS_TRAIN], labels[:DIGITS_TRAIN]),
                       (images[DIGITS_TRAIN:], labels[DIGITS_TRAIN:]), device, args.augment, args.seed)
    root = Path(args.data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--data {args.data}: no such folder")
    if (root / "test_batch.bin").exists():
        if args.image_size not in (None, 32):
            raise ValueError("CIFAR-10 binary batches are 32x32: --image-size does not apply")
        train_x, train_y, test_x, test_y = cifar_binary(root)
        return Tensors(f"CIFAR-10 binary {root}", (train_x, train_y), (test_x, test_y), device,
                       args.augment, args.seed)
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError(f"--data {args.data} has no test_batch.bin, so it is read as an "
                          "ImageFolder root, which needs torchvision (not installed); CIFAR-10 "
                          "binary batches need no torchvision")
    return Folder(root, args.image_size or 224, device, args.augment, args.seed, args.workers)


# ----------------------------------------------------------------------------- models

def torchvision_model(name: str, classes: int, small_input: bool) -> nn.Module:
    """A torchvision classifier; on small images with the CIFAR stem (a 3x3 stride-1
    first conv, no max-pool), since ImageNet's stem leaves 1x1 maps of 32x32 images."""
    import torchvision

    if small_input and name.startswith(("resnet", "wide_resnet")):
        return cifar_resnet(name, classes)
    model = getattr(torchvision.models, name)(num_classes=classes)
    if small_input:  # densenet
        model.features.conv0 = nn.Conv2d(3, model.features.conv0.out_channels, 3, 1, 1, bias=False)
        model.features.pool0 = nn.Identity()
    return model


def check_model(name: str) -> None:
    """ValueError for an unknown name, ImportError for a torchvision model without torchvision."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    if name != "small" and importlib.util.find_spec("torchvision") is None:
        raise ImportError(f"--model {name} is a torchvision model and torchvision is not "
                          "installed; --model small is the built-in ResNet "
                          "(benchmark/common.py), which needs no torchvision")


def build_model(name: str, classes: int, image_size: int, device: torch.device,
                channels_last: bool = False) -> nn.Module:
    """`small` (benchmark/common.py's ResNet) or a torchvision model, on the device."""
    check_model(name)
    if name == "small":
        model = resnet(classes=classes)
    else:
        model = torchvision_model(name, classes, image_size <= 64)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device).to(memory_format=layout)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model as built (a QModule's converted original): its state_dict has the usual keys."""
    return model.model if isinstance(model, actnn_aq.QModule) else model


# ----------------------------------------------------------------------------- optimizer

def make_optimizer(model: nn.Module, lr: float) -> torch.optim.SGD:
    """SGD as fidelity.py's resnet task: Nesterov momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def make_schedule(optimizer: torch.optim.Optimizer, lr: float, total_steps: int,
                  done_steps: int = 0) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycle to lr over total_steps, placed after done_steps (the optimizer's state,
    which holds the schedule's initial and final rates, loaded first when resuming)."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                               last_epoch=done_steps - 1)


# ----------------------------------------------------------------------------- framework state

def framework_state(alg: Algorithm, model: nn.Module) -> dict | None:
    """The compression framework's adaptive state: levels, sensitivities, iteration, guard."""
    if alg.framework == "gact":
        return alg.controller.state_dict()
    if alg.framework == "actnn":
        return model.controller.state_dict()
    return None


def load_framework_state(alg: Algorithm, model: nn.Module, state: dict | None) -> None:
    if alg.framework == "gact":
        alg.controller.load_state_dict(state)
    elif alg.framework == "actnn":
        model.controller.load_state_dict(state)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    """Write through a temporary file, so an interruption never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def check_resumable(saved: dict, args: argparse.Namespace) -> None:
    """ValueError if the checkpoint was made by a run of another setup."""
    differ = [f"--{key.replace('_', '-')} {saved[key]} (checkpoint) vs {getattr(args, key)}"
              for key in RESUME_KEYS if saved[key] != getattr(args, key)]
    if differ:
        raise ValueError("the checkpoint comes from another setup: " + "; ".join(differ))


# ----------------------------------------------------------------------------- training

def train_epoch(model: nn.Module, alg: Algorithm, optimizer: torch.optim.Optimizer, schedule,
                data: Tensors | Folder, epoch: int, args: argparse.Namespace,
                device: torch.device) -> dict:
    """One epoch. Its last step is measured (activation memory) and left out of the
    throughput, unless it is the only one: on the CPU the profiler slows it down."""
    model.train()
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    steps, quarter = data.steps(args.batch), max(1, args.batch // 4)
    total = torch.zeros((), device=device)
    held, measured_s = 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(data.train_batches(epoch, args.batch), total=steps, leave=False, file=sys.stderr,
               desc=f"{args.alg} epoch {epoch + 1}/{args.epochs}", disable=None)
    start = now(device)
    for step, (x, y) in enumerate(bar):
        x = x.contiguous(memory_format=layout)
        measured = step == steps - 1
        step_start = now(device) if measured else 0.0
        optimizer.zero_grad(set_to_none=True)
        if measured:
            held, loss = allocated_during(lambda: F.cross_entropy(model(x), y), device)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        schedule.step()
        alg.after_step(adaptation_pass(model, optimizer, x[:quarter], y[:quarter]))
        measured_s = now(device) - step_start if measured else measured_s
        total += loss.detach()
        if step % 10 == 0 or measured:
            bar.set_postfix(loss=f"{total.item() / (step + 1):.3f}")
    elapsed = now(device) - start
    timed = (steps - 1, elapsed - measured_s) if steps > 1 else (steps, elapsed)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"epoch": epoch + 1, "train_loss": total.item() / steps, "activation_mib": held / 2**20,
            "peak_mib": peak, "images_per_s": timed[0] * args.batch / timed[1], "train_s": elapsed,
            "lr": schedule.get_last_lr()[0]}


def adaptation_pass(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                    y: torch.Tensor) -> Callable[[], None]:
    """gact_aq's backprop(): a forward and backward of a quarter batch, for its sensitivities."""
    def backprop() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return backprop


def evaluate(model: nn.Module, data: Tensors | Folder, batch: int, channels_last: bool) -> dict:
    """Held-out loss and accuracy (eval mode: batch norms use their running statistics)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.eval()
    loss = correct = 0.0
    with torch.no_grad():
        for x, y in data.test_batches(batch):
            logits = model(x.contiguous(memory_format=layout))
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    model.train()
    return {"test_loss": loss / data.test_size, "test_accuracy": correct / data.test_size}


# ----------------------------------------------------------------------------- main

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="small")
    p.add_argument("--alg", type=alg_argument, default="exact", help=alg_forms())
    p.add_argument("--bit", type=float, default=0.0, help="target bits per value (0: the level's)")
    p.add_argument("--aq-bit", type=float, default=0.0,
                   help="lowest AQ level: 1, 0.5, 0.25 (0: the level's)")
    p.add_argument("--data", default=None, help="CIFAR-10 binary folder, ImageFolder root, or 'digits'")
    p.add_argument("--image-size", type=int, default=None,
                   help="built-in task and digits: 32; ImageFolder: 224; CIFAR-10: 32 only")
    p.add_argument("--train-size", type=int, default=6400, help="built-in task")
    p.add_argument("--test-size", type=int, default=1280, help="built-in task")
    p.add_argument("--noise", type=float, default=1.0, help="built-in task: noise scale")
    p.add_argument("--augment", action="store_true", help="random crops and flips")
    p.add_argument("--workers", type=int, default=4, help="ImageFolder: DataLoader workers")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="OneCycle's peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON log (default: benchmark/results/vision_...)")
    p.add_argument("--checkpoint", default=None, help="saved after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    return p


def default_out(args: argparse.Namespace, device: torch.device) -> Path:
    bits = (f"_{args.bit:g}b" if args.bit else "") + (f"_aq{args.aq_bit:g}" if args.aq_bit else "")
    gpu = re.sub("[^a-z0-9]+", "_", device_name(device).lower())
    return RESULTS / f"vision_{args.model}_{args.alg}{bits}_{gpu}.json"


def command(script: str, argv: list[str] | None) -> str:
    """The command line that reproduces a run, whether main got argv or the shell did."""
    path = Path(script).resolve()
    shown = path.relative_to(BENCHMARK.parent) if path.is_relative_to(BENCHMARK.parent) else path
    return shlex.join(["python", str(shown), *(sys.argv[1:] if argv is None else argv)])


def new_log(args: argparse.Namespace, argv: list[str] | None, device: torch.device,
            data: Tensors | Folder) -> dict:
    return {"command": command(__file__, argv), "device": device_name(device),
            "torch": str(torch.__version__),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": args.model, "alg": args.alg, "bit": args.bit, "aq_bit": args.aq_bit,
            "data": data.name, "classes": data.classes, "train_size": data.train_size,
            "test_size": data.test_size,
            "config": {k: v for k, v in vars(args).items() if k not in ("out", "resume")},
            "resumed_at_epoch": [], "epochs": [], "non_finite_epoch": None}


def setup_run(args: argparse.Namespace, device: torch.device, p: argparse.ArgumentParser):
    """(data, algorithm, model), usage problems turned into argparse errors."""
    try:
        data = load_data(args, device)
        alg = Algorithm(args.alg, args.bit, args.aq_bit)
        try:
            alg.configure()
        except ValueError as error:
            raise ValueError(f"--alg {args.alg}: {error}") from None
        torch.manual_seed(args.seed)  # the same initial weights for every algorithm
        model = build_model(args.model, data.classes, data.image_size, device, args.channels_last)
        return data, alg, alg.wrap(model)
    except (ValueError, ImportError, FileNotFoundError) as error:
        p.error(str(error))


def resume(path: Path, args: argparse.Namespace, device: torch.device, alg: Algorithm,
           model: nn.Module, optimizer: torch.optim.Optimizer, log: dict) -> dict:
    """Load a checkpoint into the run: weights, optimizer, the framework's state and the
    log so far (ValueError if another setup made it). Returns the checkpoint."""
    saved = torch.load(path, map_location=device, weights_only=True)
    check_resumable(saved["args"], args)
    unwrapped(model).load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    load_framework_state(alg, model, saved["framework"])
    earlier = saved["log"]
    log["epochs"] = earlier["epochs"]
    log["resumed_at_epoch"] = [*earlier["resumed_at_epoch"], saved["epoch"]]
    log["earlier_commands"] = [*earlier.get("earlier_commands", []), earlier["command"]]
    return saved


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the log that --out holds."""
    p = parser()
    args = p.parse_args(argv)
    if args.resume and not args.checkpoint:
        p.error("--resume needs --checkpoint PATH")
    if not Algorithm(args.alg).compresses:
        args.bit = args.aq_bit = 0.0  # they apply to compressing levels only
    device = torch.device(args.device)
    data, alg, model = setup_run(args, device, p)
    steps = data.steps(args.batch)
    if steps == 0:
        p.error(f"--batch {args.batch} is larger than the {data.train_size} training images")
    optimizer = make_optimizer(model, args.lr)
    log, first, saved = new_log(args, argv, device, data), 0, None
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if args.resume:
        try:
            saved = resume(checkpoint, args, device, alg, model, optimizer, log)
        except (ValueError, FileNotFoundError) as error:
            p.error(str(error))
        first = saved["epoch"]
    schedule = make_schedule(optimizer, args.lr, args.epochs * steps, first * steps)
    if saved is not None and saved["scheduler"]["total_steps"] == args.epochs * steps:
        schedule.load_state_dict(saved["scheduler"])  # else: a longer or shorter cycle from here
    out = Path(args.out) if args.out else default_out(args, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for epoch in range(first, args.epochs):
            record = train_epoch(model, alg, optimizer, schedule, data, epoch, args, device)
            record.update(evaluate(model, data, args.batch, args.channels_last))
            log["epochs"].append(record)
            log["guard_events"] = alg.guard_events(model)
            if not math.isfinite(record["train_loss"]):
                log["non_finite_epoch"] = epoch + 1
            out.write_text(json.dumps(log, indent=1))
            if checkpoint is not None:
                save_checkpoint(checkpoint, {
                    "epoch": epoch + 1, "args": {key: getattr(args, key) for key in RESUME_KEYS},
                    "model": unwrapped(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": schedule.state_dict(), "framework": framework_state(alg, model),
                    "log": log})
            print(summary(record, args.epochs), flush=True)
            if log["non_finite_epoch"] is not None:
                break
    finally:
        alg.close()
    out.write_text(json.dumps(log, indent=1))
    return log


def summary(record: dict, epochs: int) -> str:
    peak = "" if record["peak_mib"] is None else f", peak {record['peak_mib']:.1f} MiB"
    return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}, held-out "
            f"accuracy {record['test_accuracy']:.4f}, activations {record['activation_mib']:.2f} MiB"
            f"{peak}, {record['images_per_s']:.0f} images/s")


if __name__ == "__main__":
    main()
