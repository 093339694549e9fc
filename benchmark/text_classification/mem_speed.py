"""Step time and memory of exact and gact_aq training of BERT on random tokens, and the
largest batch that fits (the release's text --get-mem / --get-speed and max-batch runs).

    python benchmark/text_classification/mem_speed.py --model-size large --batch 32 \\
        --modes exact gact --opt_level L2.2 --bit 2 1.5 1.25 1 --aq-bit 1 0.5
    python benchmark/text_classification/mem_speed.py --model-size large --modes exact gact \\
        --bit 1.25 --aq-bit 0.5 --max-batch                         # CUDA only
    python benchmark/text_classification/mem_speed.py --model-size tiny --hidden-size 48 \\
        --layers 2 --batch 8 --seq-len 32                          # CPU smoke run

Every mode: exact once, gact at every --bit x --aq-bit (under --opt_level). A
BertForSequenceClassification built from a config (--model-size, with --hidden-size,
--layers, --heads overriding it) trains on --batch random sequences of --seq-len tokens:
train_step.py's Setup (warm-up steps, gact_aq adapting after each, then the median of
--steps forward + backward + AdamW steps), then one more step measured for memory
(benchmark/vision/mem_speed.py's step_memory). --max-batch doubles from --batch then
bisects (vision/mem_speed.py's search) for the largest batch whose warm-up and step do not
raise torch.cuda.OutOfMemoryError; it needs CUDA. Results: JSON in benchmark/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import torch

BENCHMARK = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARK))

import gact_aq  # noqa: E402
from fidelity import device_name  # noqa: E402
from gact_aq.controller import Controller  # noqa: E402
from train_step import Setup  # noqa: E402

RESULTS = BENCHMARK / "results"
MODEL_SIZES = {"tiny": (64, 2, 2), "base": (768, 12, 12), "large": (1024, 24, 16)}


def _vision_mem_speed():
    """benchmark/vision/mem_speed.py under its own module name (this file has the same)."""
    spec = importlib.util.spec_from_file_location("vision_mem_speed",
                                                  BENCHMARK / "vision" / "mem_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vision = _vision_mem_speed()


class TextSetup(Setup):
    """train_step.Setup (its step, warm-up and gact_aq adaptation) for a BERT built from a
    config, on random tokens and labels, with AdamW; only the construction differs."""

    def __init__(self, mode: dict, args: argparse.Namespace, batch: int, device: torch.device):
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        hidden, layers, heads = model_shape(args)
        config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * hidden, num_labels=2,
                            max_position_embeddings=max(512, args.seq_len),
                            attn_implementation=args.attn)
        model = BertForSequenceClassification(config).to(device).train()
        self.x = torch.randint(0, config.vocab_size, (batch, args.seq_len), device=device)
        self.y = torch.randint(0, 2, (batch,), device=device)
        self.loss_fn = lambda m, x, y: m(input_ids=x, labels=y).loss
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 \
            else contextlib.nullcontext()
        self.controller = None
        if mode["alg"] == "gact":
            gact_aq.set_optimization_level(args.opt_level, bit=mode["bit"], aq_bit=mode["aq_bit"])
            self.controller = Controller(model)
            self.controller.install_hook()
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)


def model_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    """(hidden, layers, heads): --model-size's, with the overrides; heads default to
    the size's when they divide the hidden size, else hidden / 64 (at least 1)."""
    hidden, layers, heads = MODEL_SIZES[args.model_size]
    hidden, layers = args.hidden_size or hidden, args.layers or layers
    if args.heads:
        heads = args.heads
    elif hidden % heads:
        heads = max(1, hidden // 64)
    return hidden, layers, heads


def modes(args: argparse.Namespace) -> list[dict]:
    """exact once; gact at every (bit, aq_bit), each checked before anything runs."""
    grid = []
    for alg in dict.fromkeys(args.modes):
        pairs = [(b, a) for b in args.bit for a in args.aq_bit] if alg == "gact" else [(0.0, 0.0)]
        for bit, aq_bit in pairs:
            if alg == "gact":
                gact_aq.settings.build_config(args.opt_level, bit, aq_bit)  # ValueError if invalid
            grid.append({"alg": alg, "bit": bit, "aq_bit": aq_bit})
    return grid


def measure(mode: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Median step time after warm-up, then one step's memory, at --batch."""
    run = TextSetup(mode, args, args.batch, device)
    try:
        adapt_s = run.warm_up(args.warmup, device)
        step_ms = run.median_step_ms(args.steps, device)
        return {"step_ms": step_ms, "sequences_per_s": 1e3 * args.batch / step_ms,
                "adapt_s": adapt_s, **vision.step_memory(run, device)}
    finally:
        run.close()


def fits(mode: dict, args: argparse.Namespace, batch: int, device: torch.device) -> bool:
    """Whether warm-up and one step at this batch run without running out of GPU memory;
    the attempt is freed before the next one."""
    def attempt() -> bool:
        run = None
        try:
            run = TextSetup(mode, args, batch, device)
            run.warm_up(max(1, args.warmup), device)
            vision.step_memory(run, device)
            return True
        except RuntimeError as error:
            if not vision.out_of_memory(error):
                raise
            return False
        finally:
            if run is not None:
                run.close()
    ok = attempt()
    gc.collect()
    torch.cuda.empty_cache()
    return ok


def record_of(mode: dict, args: argparse.Namespace, device: torch.device) -> dict:
    record = {"alg": mode["alg"] if mode["alg"] == "exact" else f"gact-{args.opt_level}",
              "bit": mode["bit"] or None, "aq_bit": mode["aq_bit"] or None,
              "batch": args.batch, "seq_len": args.seq_len}
    try:
        record.update(measure(mode, args, device))
    except RuntimeError as error:
        if not vision.out_of_memory(error):
            raise
        record["oom"] = True
    gc.collect()
    if args.max_batch:
        torch.cuda.empty_cache()
        record["max_batch"], record["max_batch_probes"] = vision.largest(
            lambda n: fits(mode, args, n, device), args.batch, args.max_batch_limit)
    return record


def line(record: dict) -> str:
    bits = "" if record["bit"] is None else f" {record['bit']:g}b"
    bits += "" if record["aq_bit"] is None else f" aq{record['aq_bit']:g}"
    text = f"{record['alg'] + bits:<24}"
    if record.get("oom"):
        return text + " out of memory at --batch"
    peak = "" if record["peak_mib"] is None else f"  peak {record['peak_mib']:9.1f} MiB"
    text += (f" step {record['step_ms']:9.1f} ms  {record['sequences_per_s']:8.1f} seq/s  "
             f"activations {record['activation_mib']:9.2f} MiB{peak}")
    return text + (f"  max batch {record['max_batch']}" if "max_batch" in record else "")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="large")
    p.add_argument("--hidden-size", type=int, default=0, help="override the size's hidden size")
    p.add_argument("--layers", type=int, default=0, help="override the size's layer count")
    p.add_argument("--heads", type=int, default=0, help="override the attention heads")
    p.add_argument("--attn", choices=("eager", "sdpa"), default="eager")
    p.add_argument("--modes", nargs="+", choices=("exact", "gact"), default=["exact", "gact"])
    p.add_argument("--opt_level", "--opt-level", dest="opt_level", default="L2.2",
                   help=f"gact_aq level, one of {', '.join(gact_aq.OPTIMIZATION_LEVELS)}")
    p.add_argument("--bit", type=float, nargs="+", default=[0.0], help="target bits (0: the level's)")
    p.add_argument("--aq-bit", type=float, nargs="+", default=[0.0],
                   help="lowest AQ level (0: the level's)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-batch", action="store_true", help="search the largest batch that fits (CUDA)")
    p.add_argument("--max-batch-limit", type=int, default=1 << 14, help="largest batch tried")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON path (default: benchmark/results/text_mem_speed_...)")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Measure every mode; returns the report that --out holds."""
    p = parser()
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.max_batch and device.type != "cuda":
        p.error("--max-batch searches for the largest batch before torch.cuda.OutOfMemoryError "
                "and needs a CUDA device; on the CPU there is no such limit to find")
    try:
        grid = modes(args)
    except ValueError as error:
        p.error(f"--opt_level {args.opt_level}: {error}")
    hidden, layers, heads = model_shape(args)
    if hidden % heads:
        p.error(f"--hidden-size {hidden} is not a multiple of --heads {heads}")
    gpu = re.sub("[^a-z0-9]+", "_", device_name(device).lower())
    out = Path(args.out) if args.out else \
        RESULTS / f"text_mem_speed_h{hidden}_l{layers}_b{args.batch}_s{args.seq_len}_{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = sys.argv[1:] if argv is None else argv
    report = {"command": shlex.join(["python", "benchmark/text_classification/mem_speed.py", *shown]),
              "device": device_name(device), "torch": str(torch.__version__),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "hidden_size": hidden, "layers": layers, "heads": heads, "batch": args.batch,
              "seq_len": args.seq_len, "bf16": args.bf16, "attn": args.attn,
              "opt_level": args.opt_level, "steps": args.steps, "warmup": args.warmup,
              "records": []}
    for mode in grid:
        report["records"].append(record_of(mode, args, device))
        vision.compare_with_exact(report["records"])
        out.write_text(json.dumps(report, indent=1))
        print(line(report["records"][-1]), flush=True)
    return report


if __name__ == "__main__":
    main()
