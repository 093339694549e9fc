"""BERT fine-tuning for sequence classification, exact or with gact_aq (the release's
text benchmark: accuracy, activation memory and step time of one command).

    python benchmark/text_classification/run_glue.py --epochs 2          # built-in task, CPU
    python benchmark/text_classification/run_glue.py --gact --opt_level L2.2 --bit 1.25 \\
        --aq-bit 0.5 --get-mem --get-speed
    python benchmark/text_classification/run_glue.py --task sst2 --data glue_data/SST-2 \\
        --model-size large --gact --opt_level L2.2 --bit 1.25 --aq-bit 0.5 --bf16

Data: --data a GLUE task folder (train.tsv and dev.tsv, or dev_matched.tsv for MNLI, as
the GLUE download lays them out), or a Hugging Face `datasets` DatasetDict saved with
save_to_disk (needs `datasets`); without --data a small learnable built-in task
(benchmark/fidelity.py's majority vote of tokens). Model: BertForSequenceClassification
built from a config (--model-size, no download) or a local pretrained folder (--model).
Text goes through the tokenizer of --model when that folder has one, else a word-hash
tokenizer (see HashTokenizer), so nothing is downloaded.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import re
import shlex
import statistics
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

BENCHMARK = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARK))

import gact_aq  # noqa: E402
from common import allocated_during, now  # noqa: E402
from fidelity import adamw_with_warmup, device_name, majority_task  # noqa: E402
from gact_aq.controller import Controller  # noqa: E402

RESULTS = BENCHMARK / "results"
PAD, CLS, SEP = 0, 1, 2  # the hash tokenizer's and the built-in task's special ids
# hidden size, layers, attention heads (BERT-Base and -Large as published; tiny for the CPU)
MODEL_SIZES = {"tiny": (64, 2, 2), "base": (768, 12, 12), "large": (1024, 24, 16)}
VOCAB = {"tiny": 8192, "base": 30522, "large": 30522}
csv.field_size_limit(1 << 24)


# ----------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task keeps its text and labels: TSV column names (or indices for the
    headerless CoLA files), the label strings in id order, and the names in `datasets`."""

    text: tuple
    label: str | int
    labels: tuple
    dev: str = "dev.tsv"
    header: bool = True
    hf_text: tuple = ()
    hf_dev: str = "validation"


ENTAIL = ("entailment", "not_entailment")
GLUE_TASKS = {
    "cola": GlueTask((3,), 1, ("0", "1"), header=False, hf_text=("sentence",)),
    "sst2": GlueTask(("sentence",), "label", ("0", "1"), hf_text=("sentence",)),
    "mrpc": GlueTask(("#1 String", "#2 String"), "Quality", ("0", "1"),
                     hf_text=("sentence1", "sentence2")),
    "qqp": GlueTask(("question1", "question2"), "is_duplicate", ("0", "1"),
                    hf_text=("question1", "question2")),
    "mnli": GlueTask(("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"), dev="dev_matched.tsv",
                     hf_text=("premise", "hypothesis"), hf_dev="validation_matched"),
    "qnli": GlueTask(("question", "sentence"), "label", ENTAIL, hf_text=("question", "sentence")),
    "rte": GlueTask(("sentence1", "sentence2"), "label", ENTAIL, hf_text=("sentence1", "sentence2")),
    "wnli": GlueTask(("sentence1", "sentence2"), "label", ("0", "1"),
                     hf_text=("sentence1", "sentence2")),
}


def read_tsv(path: Path, task: GlueTask) -> tuple[list[tuple], list[int]]:
    """Texts and label ids of one GLUE TSV file. GLUE text holds bare quotes, so no CSV
    quoting; rows too short for the needed columns (a few in MNLI) are skipped."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.header:
        header, rows = rows[0], rows[1:]
        missing = [c for c in (*task.text, task.label) if c not in header]
        if missing:
            raise ValueError(f"{path}: no column {missing} in header {header}")
        columns = [header.index(c) for c in task.text]
        label_column = header.index(task.label)
    else:
        columns, label_column = list(task.text), task.label
    needed = max(*columns, label_column) + 1
    rows = [r for r in rows if len(r) >= needed and r[label_column] in task.labels]
    return ([tuple(r[c] for c in columns) for r in rows],
            [task.labels.index(r[label_column]) for r in rows])


def read_glue(folder: Path, task: GlueTask) -> tuple:
    """(train texts, train labels, dev texts, dev labels) of a GLUE task folder: TSV files,
    or a `datasets` DatasetDict saved to disk (dataset_dict.json marks one)."""
    if (folder / "dataset_dict.json").exists():
        return read_saved_dataset(folder, task)
    for name in ("train.tsv", task.dev):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} not found: --data takes a GLUE task folder "
                                    "(train.tsv, dev.tsv) or a datasets folder saved to disk")
    return (*read_tsv(folder / "train.tsv", task), *read_tsv(folder / task.dev, task))


def read_saved_dataset(folder: Path, task: GlueTask) -> tuple:
    try:
        import datasets
    except ImportError:
        raise SystemExit(f"{folder} is a Hugging Face datasets folder, and reading it needs "
                         "the `datasets` package (not installed); give the GLUE TSV folder "
                         "instead") from None
    saved = datasets.load_from_disk(str(folder))

    def split(name):
        part = saved[name]
        return list(zip(*(part[c] for c in task.hf_text))), list(part["label"])
    return (*split("train"), *split(task.hf_dev))


# ----------------------------------------------------------------------------- tokens

class HashTokenizer:
    """A deterministic stand-in for a WordPiece vocabulary: lower-cased words and
    punctuation marks, each mapped to 3 + crc32(word) mod (vocab - 3). Collisions only
    merge rare words; it needs no download, which is what the CPU runs and CI want."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def ids(self, text: str) -> list[int]:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        return [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in words]

    def __call__(self, texts: list[tuple], max_len: int) -> dict:
        """BERT's layout: [CLS] a [SEP] (b [SEP]), the longer text trimmed first, padded
        to the longest sequence (at most max_len)."""
        encoded = [self.pair([self.ids(t) for t in pair], max_len) for pair in texts]
        width = max(len(ids) for ids, _ in encoded)
        out = {k: torch.zeros(len(encoded), width, dtype=torch.long)
               for k in ("input_ids", "token_type_ids", "attention_mask")}
        for row, (ids, types) in enumerate(encoded):
            out["input_ids"][row, :len(ids)] = torch.tensor(ids)
            out["token_type_ids"][row, :len(ids)] = torch.tensor(types)
            out["attention_mask"][row, :len(ids)] = 1
        return out

    @staticmethod
    def pair(parts: list[list[int]], max_len: int) -> tuple[list[int], list[int]]:
        budget = max_len - 1 - len(parts)
        while sum(map(len, parts)) > budget:
            longest = max(parts, key=len)
            longest.pop()
        ids, types = [CLS], [0]
        for segment, part in enumerate(parts):
            ids += part + [SEP]
            types += [segment] * (len(part) + 1)
        return ids, types


def pretrained_tokenizer(path: str | None) -> Callable | None:
    """The tokenizer saved with a local model folder, called as HashTokenizer is."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None

    def encode(texts: list[tuple], max_len: int) -> dict:
        columns = list(zip(*texts))
        return dict(tok(*columns, truncation=True, max_length=max_len, padding="longest",
                        return_tensors="pt"))
    return encode


# ----------------------------------------------------------------------------- data

@dataclass
class Split:
    """Encoded examples: model inputs (input_ids, attention_mask, ...) and labels."""

    inputs: dict
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor) -> tuple[dict, torch.Tensor]:
        return {k: v[index] for k, v in self.inputs.items()}, self.labels[index]

    def to(self, device: torch.device) -> "Split":
        return Split({k: v.to(device) for k, v in self.inputs.items()}, self.labels.to(device))


@dataclass
class Data:
    name: str
    train: Split
    dev: Split
    num_labels: int


def builtin_data(args: argparse.Namespace, vocab: int) -> Data:
    """fidelity.py's majority-vote task: learnable, and needs attention over every token."""
    def split(n, seed):
        x, y = majority_task(n, seed, min(512, vocab), args.max_seq_len)
        return Split({"input_ids": x}, y)
    return Data("builtin-majority", split(args.train_size, 0), split(args.dev_size, 1), 2)


def glue_data(args: argparse.Namespace, tokenizer: Callable) -> Data:
    task = GLUE_TASKS[args.task]
    train_x, train_y, dev_x, dev_y = read_glue(Path(args.data), task)
    if not train_x or not dev_x:
        raise SystemExit(f"{args.data}: no labelled rows for task {args.task}")

    def split(texts, labels):
        return Split(tokenizer(texts, args.max_seq_len), torch.tensor(labels))
    return Data(args.task, split(train_x, train_y), split(dev_x, dev_y), len(task.labels))


# ----------------------------------------------------------------------------- model

def build_model(args: argparse.Namespace, num_labels: int) -> nn.Module:
    """A local pretrained BERT (--model) or one built from a config (--model-size)."""
    from transformers import BertConfig, BertForSequenceClassification

    if args.model:
        return BertForSequenceClassification.from_pretrained(
            args.model, num_labels=num_labels, local_files_only=True,
            attn_implementation=args.attn)
    hidden, layers, heads = MODEL_SIZES[args.model_size]
    config = BertConfig(vocab_size=VOCAB[args.model_size], hidden_size=hidden,
                        num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, num_labels=num_labels,
                        max_position_embeddings=max(512, args.max_seq_len),
                        attn_implementation=args.attn)
    return BertForSequenceClassification(config)


def model_vocab(args: argparse.Namespace) -> int:
    """The vocabulary size of the model the run trains (the hash tokenizer's range)."""
    if args.model:
        from transformers import BertConfig

        return BertConfig.from_pretrained(args.model, local_files_only=True).vocab_size
    return VOCAB[args.model_size]


def set_level(args: argparse.Namespace) -> None:
    """gact_aq's global config for --opt_level, --bit, --aq-bit (ValueError when invalid)."""
    gact_aq.set_optimization_level(args.opt_level, bit=args.bit, aq_bit=args.aq_bit)


# ----------------------------------------------------------------------------- training

class Trainer:
    """One run: the model (with gact_aq's hooks under --gact), AdamW, the step."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, steps: int,
                 device: torch.device):
        self.args, self.device = args, device
        self.model = model.to(device).train()
        self.optimizer, self.schedule = adamw_with_warmup(args.lr)(self.model, steps)
        self.controller = None
        if args.gact:
            set_level(args)
            self.controller = Controller(self.model)
            self.controller.install_hook()

    def loss(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            logits = self.model(**inputs).logits
        return nn.functional.cross_entropy(logits.float(), labels)

    def step(self, inputs: dict, labels: torch.Tensor, memory: dict | None = None) -> float:
        """Forward, backward, AdamW, then gact_aq's adaptation on a quarter of the batch.
        With memory (a dict), also record the forward's activation memory and, on CUDA,
        the peak over the step into it."""
        self.optimizer.zero_grad(set_to_none=True)
        if memory is None:
            loss = self.loss(inputs, labels)
        else:
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device) if cuda else None
            held, loss = allocated_during(lambda: self.loss(inputs, labels), self.device)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        if memory is not None:
            memory.update(activation_mib=held / 2**20, before_forward_mib=mib(before),
                          peak_mib=mib(torch.cuda.max_memory_allocated(self.device)
                                       if self.device.type == "cuda" else None))
        if self.controller is not None:
            part = max(1, len(labels) // 4)
            small = {k: v[:part] for k, v in inputs.items()}

            def backprop():
                self.optimizer.zero_grad(set_to_none=True)
                self.loss(small, labels[:part]).backward()
            self.controller.iterate(backprop)
        return loss.item()

    def evaluate(self, dev: Split, batch: int) -> dict:
        self.model.eval()
        loss = correct = 0.0
        with torch.no_grad():
            for start in range(0, len(dev), batch):
                inputs, labels = dev.batch(torch.arange(start, min(start + batch, len(dev)),
                                                        device=self.device))
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
                    logits = self.model(**inputs).logits.float()
                loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                correct += (logits.argmax(-1) == labels).sum().item()
        self.model.train()
        return {"dev_loss": loss / len(dev), "dev_accuracy": correct / len(dev)}

    def close(self) -> None:
        if self.controller is not None:
            self.controller.uninstall_hook()


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def train(args: argparse.Namespace, data: Data, device: torch.device, log: dict,
          out: Path) -> None:
    """Every epoch: shuffled batches (dropping the last partial one), then the dev set.
    --get-mem measures the second step (after gact_aq's first adaptation); --get-speed
    times every step (adaptation included) and reports the median after --warmup steps."""
    torch.manual_seed(args.seed)
    per_epoch = len(data.train) // args.batch
    if per_epoch == 0:
        raise SystemExit(f"--batch {args.batch} exceeds the {len(data.train)} training examples")
    trainer = Trainer(args, build_model(args, data.num_labels), args.epochs * per_epoch, device)
    train_split, dev_split = data.train.to(device), data.dev.to(device)
    order = torch.Generator().manual_seed(args.seed + 1)
    times, step = [], 0
    try:
        for epoch in range(1, args.epochs + 1):
            started, total = time.perf_counter(), 0.0
            batches = torch.randperm(len(train_split), generator=order)[:per_epoch * args.batch]
            for index in batches.view(per_epoch, args.batch):
                inputs, labels = train_split.batch(index.to(device))
                memory = {} if args.get_mem and step == min(1, args.epochs * per_epoch - 1) else None
                start = now(device) if args.get_speed else 0.0
                total += trainer.step(inputs, labels, memory)
                if memory is not None:
                    log["memory"] = {"step": step, "batch": args.batch, **memory}
                elif args.get_speed and step >= args.warmup:
                    times.append(now(device) - start)
                step += 1
            record = {"epoch": epoch, "train_loss": total / per_epoch,
                      **trainer.evaluate(dev_split, args.batch), "train_s": time.perf_counter() - started}
            log["epochs"].append(record)
            out.write_text(json.dumps(log, indent=1))
            print(f"epoch {epoch}/{args.epochs}  loss {record['train_loss']:.4f}  dev accuracy "
                  f"{record['dev_accuracy']:.4f}  ({record['train_s']:.1f} s)", flush=True)
    finally:
        trainer.close()
    if args.get_speed:
        log["speed"] = speed(times, args.batch)


def speed(times: list[float], batch: int) -> dict:
    if not times:
        return {"step_ms": None, "samples_per_s": None, "timed_steps": 0}
    step_ms = 1e3 * statistics.median(times)
    return {"step_ms": step_ms, "samples_per_s": 1e3 * batch / step_ms, "timed_steps": len(times)}


# ----------------------------------------------------------------------------- main

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(GLUE_TASKS), default=None,
                   help="GLUE task of --data (without --data: the built-in task)")
    p.add_argument("--data", default=None, help="GLUE task folder (TSV) or datasets saved to disk")
    p.add_argument("--model", default=None, help="local pretrained BERT folder")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny",
                   help="BERT built from a config when --model is not given")
    p.add_argument("--attn", choices=("eager", "sdpa"), default="eager",
                   help="attention kernel (eager keeps the attention probabilities, as the paper's runs did)")
    p.add_argument("--gact", action="store_true", help="compress activations with gact_aq")
    p.add_argument("--opt_level", "--opt-level", dest="opt_level", default="L2.2",
                   help=f"gact_aq level, one of {', '.join(gact_aq.OPTIMIZATION_LEVELS)}")
    p.add_argument("--bit", type=float, default=0.0, help="target bits (0: the level's)")
    p.add_argument("--aq-bit", type=float, default=0.0, help="lowest AQ level (0: the level's)")
    p.add_argument("--get-mem", action="store_true", help="activation (and CUDA peak) memory of a step")
    p.add_argument("--get-speed", action="store_true", help="median step time after --warmup steps")
    p.add_argument("--warmup", type=int, default=3, help="steps not timed by --get-speed")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="AdamW (default: 2e-5 pretrained, 3e-4 else)")
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--train-size", type=int, default=2048, help="built-in task")
    p.add_argument("--dev-size", type=int, default=512, help="built-in task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON path (default: benchmark/results/glue_...)")
    return p


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument errors before anything is built."""
    if args.data and args.task is None:
        p.error(f"--data needs --task (one of {', '.join(sorted(GLUE_TASKS))})")
    if args.task and not args.data:
        p.error(f"--task {args.task} needs --data (a local GLUE folder: nothing is downloaded)")
    if args.gact:
        try:
            set_level(args)
        except ValueError as error:
            p.error(f"--opt_level {args.opt_level} --bit {args.bit:g} --aq-bit {args.aq_bit:g}: {error}")
    if args.max_seq_len < 4:
        p.error("--max-seq-len must be at least 4")


def default_out(args: argparse.Namespace, device: torch.device) -> Path:
    alg = f"gact_{args.opt_level}" + (f"_{args.bit:g}b" if args.bit else "") + \
        (f"_aq{args.aq_bit:g}" if args.aq_bit else "") if args.gact else "exact"
    model = Path(args.model).name if args.model else args.model_size
    gpu = re.sub("[^a-z0-9]+", "_", device_name(device).lower())
    return RESULTS / f"glue_{args.task or 'builtin'}_{model}_{alg}_{gpu}.json"


def main(argv: list[str] | None = None) -> dict:
    """Train and evaluate; returns the log that --out holds."""
    p = parser()
    args = p.parse_args(argv)
    check(p, args)
    args.lr = args.lr or (2e-5 if args.model else 3e-4)
    device = torch.device(args.device)
    if args.data:
        tokenizer = pretrained_tokenizer(args.model) or HashTokenizer(model_vocab(args))
        data = glue_data(args, tokenizer)
    else:
        data = builtin_data(args, VOCAB[args.model_size])
    out = Path(args.out) if args.out else default_out(args, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = [*(sys.argv[1:] if argv is None else argv)]
    log = {"command": shlex.join(["python", "benchmark/text_classification/run_glue.py", *shown]),
           "device": device_name(device), "torch": str(torch.__version__),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "task": data.name, "model": args.model or args.model_size,
           "alg": f"gact-{args.opt_level}" if args.gact else "exact",
           "bit": args.bit if args.gact else None, "aq_bit": args.aq_bit if args.gact else None,
           "train_size": len(data.train), "dev_size": len(data.dev), "num_labels": data.num_labels,
           "config": {k: v for k, v in vars(args).items() if k != "out"},
           "epochs": [], "memory": None, "speed": None}
    train(args, data, device, log, out)
    out.write_text(json.dumps(log, indent=1))
    return log


if __name__ == "__main__":
    main()
