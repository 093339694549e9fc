"""Step time and memory of exact and compressed training on synthetic images, and the
largest batch that fits.

    python benchmark/vision/mem_speed.py --model resnet50 --batch 128 \\
        --alg exact checkpoint actnn-L3 gact-L2.2 --bit 2 1.5 1.25 1 --aq-bit 1 0.5
    python benchmark/vision/mem_speed.py --model resnet50 --alg exact gact-L2.2 --bit 1.25 \\
        --aq-bit 0.5 --max-batch [--memory-limit-mib 40000]
    python benchmark/vision/mem_speed.py --model small --alg exact actnn-L3 --max-batch \\
        --memory-limit-mib 16                                # CPU: against activation memory

Every --alg (train.py's forms) is measured at every --bit x --aq-bit (once for exact,
checkpoint and levels that do not compress), on a batch of --batch random images of
--resolution squared pixels and random labels: train_step.py's Setup (warm-up steps, with
gact_aq's adaptation after each, then the median time of --steps forward + backward + SGD
steps), then one more step measured for memory. --max-batch searches for the largest batch
that trains: doubling from --batch, then bisecting. On CUDA a batch fits when its warm-up
and step do not run out of memory (torch.cuda.OutOfMemoryError is caught and the cache
emptied), within --memory-limit-mib when given (the caching allocator is capped there:
a smaller GPU). The CPU has no such limit to hit, so there --max-batch needs
--memory-limit-mib and a batch fits when its activation memory stays under it. Results:
JSON in benchmark/results/ (see benchmark/vision/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import re
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import (MODELS, RESULTS, Algorithm, alg_argument, alg_forms, build_model,  # noqa: E402
                   check_model, command)
from common import allocated_during  # noqa: E402
from fidelity import device_name  # noqa: E402
from train_step import Setup  # noqa: E402


class VisionSetup(Setup):
    """train_step.Setup (its step, warm-up and gact_aq adaptation pass) for a model of
    train.py under one algorithm, on synthetic images: only the construction differs."""

    def __init__(self, alg: Algorithm, args: argparse.Namespace, batch: int, device: torch.device):
        torch.manual_seed(0)
        classes = args.classes or (10 if args.model == "small" or args.resolution <= 64 else 1000)
        model = build_model(args.model, classes, args.resolution, device, args.channels_last)
        model.train()
        layout = torch.channels_last if args.channels_last else torch.contiguous_format
        self.x = torch.randn(batch, 3, args.resolution, args.resolution,
                             device=device).contiguous(memory_format=layout)
        self.y = torch.randint(0, classes, (batch,), device=device)
        self.loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)
        self.autocast = contextlib.nullcontext()
        self.model = alg.wrap(model)
        self.controller = alg.controller
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)


def configurations(algs: list[str], bits: list[float], aq_bits: list[float]) -> list[Algorithm]:
    """Every algorithm at every (bit, aq_bit); once (bits 0) where bits do not apply.
    ValueError for a combination a framework refuses (checked before anything runs)."""
    grid = []
    for spec in dict.fromkeys(algs):
        alg = Algorithm(spec)
        pairs = [(b, a) for b in bits for a in aq_bits] if alg.compresses else [(0.0, 0.0)]
        for bit, aq_bit in pairs:
            alg = Algorithm(spec, bit, aq_bit)
            try:
                alg.configure()
            except ValueError as error:
                raise ValueError(f"--alg {spec} --bit {bit:g} --aq-bit {aq_bit:g}: {error}") \
                    from None
            grid.append(alg)
    return grid


def step_memory(run: VisionSetup, device: torch.device) -> dict:
    """One training step's memory: activations (bytes allocated from the forward's start
    to the loss, common.allocated_during); on CUDA also what is allocated before the
    forward (weights, optimizer state, the batch) and the peak over the whole step."""
    run.optimizer.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else None
    with run.autocast:
        held, loss = allocated_during(lambda: run.loss_fn(run.model, run.x, run.y), device)
    loss.backward()
    run.optimizer.step()
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return {"activation_mib": held / 2**20, "before_forward_mib": mib(before), "peak_mib": mib(peak)}


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def measure(alg: Algorithm, args: argparse.Namespace, device: torch.device) -> dict:
    """Median step time after warm-up, then the memory of one step, at --batch."""
    run = VisionSetup(alg, args, args.batch, device)
    try:
        adapt_s = run.warm_up(args.warmup, device)
        step_ms = run.median_step_ms(args.steps, device)
        return {"step_ms": step_ms, "images_per_s": 1e3 * args.batch / step_ms, "adapt_s": adapt_s,
                **step_memory(run, device)}
    finally:
        run.close()


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or \
        (isinstance(error, RuntimeError) and "out of memory" in str(error))


def _trains(alg: Algorithm, args: argparse.Namespace, batch: int, device: torch.device,
            limit_mib: float | None) -> bool:
    """One probe of fits(); once it returns, an out-of-memory error's traceback, and the
    tensors its frames held, are gone."""
    run = None
    try:
        run = VisionSetup(Algorithm(alg.mode, alg.bit, alg.aq_bit), args, batch, device)
        run.warm_up(max(1, args.warmup), device)
        memory = step_memory(run, device)
        return device.type == "cuda" or memory["activation_mib"] <= limit_mib
    except RuntimeError as error:
        if not out_of_memory(error):
            raise
        return False
    finally:
        if run is not None:
            run.close()


def fits(alg: Algorithm, args: argparse.Namespace, batch: int, device: torch.device,
         limit_mib: float | None) -> bool:
    """Whether warm-up and a training step at this batch fit (see the module docstring);
    everything of the attempt is freed before the next one."""
    ok = _trains(alg, args, batch, device, limit_mib)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ok


def largest(fit: Callable[[int], bool], start: int, limit: int) -> tuple[int, list]:
    """The largest n in [1, limit] with fit(n), fit being monotone: doubling from start
    until one fails, then bisection. Returns (n, 0 when even 1 fails; the probes made)."""
    probes = []

    def probe(n: int) -> bool:
        probes.append([n, fit(n)])
        return probes[-1][1]
    good, bad, n = 0, None, min(max(1, start), limit)
    while bad is None:
        if not probe(n):
            bad = n
        elif n >= limit:
            return n, probes
        else:
            good, n = n, min(2 * n, limit)
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if probe(middle) else (good, middle)
    return good, probes


@contextlib.contextmanager
def memory_cap(limit_mib: float | None, device: torch.device):
    """On CUDA, cap the caching allocator at limit_mib for the search."""
    if device.type != "cuda" or limit_mib is None:
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_mib * 2**20 / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def record_of(alg: Algorithm, args: argparse.Namespace, device: torch.device) -> dict:
    record = {"alg": alg.mode, "bit": alg.bit or None, "aq_bit": alg.aq_bit or None,
              "batch": args.batch, "resolution": args.resolution}
    try:
        record.update(measure(alg, args, device))
    except RuntimeError as error:
        if not out_of_memory(error):
            raise
        record["oom"] = True
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.max_batch:
        with memory_cap(args.memory_limit_mib, device):
            record["max_batch"], record["max_batch_probes"] = largest(
                lambda n: fits(alg, args, n, device, args.memory_limit_mib), args.batch,
                args.max_batch_limit)
    return record


def compare_with_exact(records: list[dict]) -> None:
    """Step time ratio and activation reduction against the exact record, when there is one."""
    exact = next((r for r in records if r["alg"] == "exact" and "step_ms" in r), None)
    if exact is None:
        return
    for r in records:
        if "step_ms" in r:
            r["step_vs_exact"] = r["step_ms"] / exact["step_ms"]
            r["activation_reduction"] = exact["activation_mib"] / max(r["activation_mib"], 1e-12)


def line(record: dict) -> str:
    bits = "" if record["bit"] is None else f" {record['bit']:g}b"
    bits += "" if record["aq_bit"] is None else f" aq{record['aq_bit']:g}"
    text = f"{record['alg'] + bits:<28}"
    if record.get("oom"):
        text += " out of memory at --batch"
    else:
        peak = "" if record["peak_mib"] is None else f"  peak {record['peak_mib']:9.1f} MiB"
        text += (f" step {record['step_ms']:9.1f} ms  {record['images_per_s']:8.1f} images/s  "
                 f"activations {record['activation_mib']:9.2f} MiB{peak}")
    if "max_batch" in record:
        text += f"  max batch {record['max_batch']}"
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="resnet50")
    p.add_argument("--alg", type=alg_argument, nargs="+",
                   default=["exact", "actnn-L3", "gact-L2.2"], help=alg_forms())
    p.add_argument("--bit", type=float, nargs="+", default=[0.0], help="target bits (0: the level's)")
    p.add_argument("--aq-bit", type=float, nargs="+", default=[0.0],
                   help="lowest AQ level (0: the level's)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--resolution", type=int, default=None, help="default: 32 for small, else 224")
    p.add_argument("--classes", type=int, default=None,
                   help="default: 10 for small and at 64 pixels or less, else 1000")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-batch", action="store_true", help="search the largest batch that fits")
    p.add_argument("--max-batch-limit", type=int, default=1 << 16, help="largest batch tried")
    p.add_argument("--memory-limit-mib", type=float, default=None,
                   help="CUDA: cap the allocator here; CPU: the activation memory a batch may take")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON path (default: benchmark/results/mem_speed_...)")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Measure every configuration; returns the report that --out holds."""
    p = parser()
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.resolution = args.resolution or (32 if args.model == "small" else 224)
    if args.max_batch and device.type != "cuda" and args.memory_limit_mib is None:
        p.error("--max-batch searches for the largest batch that does not run out of GPU memory "
                "and needs a CUDA device; on the CPU give --memory-limit-mib to search for the "
                "largest batch whose activation memory stays under it")
    try:
        grid = configurations(args.alg, args.bit, args.aq_bit)
        check_model(args.model)
    except (ValueError, ImportError) as error:
        p.error(str(error))
    gpu = re.sub("[^a-z0-9]+", "_", device_name(device).lower())
    out = Path(args.out) if args.out else \
        RESULTS / f"mem_speed_{args.model}_b{args.batch}_r{args.resolution}_{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": command(__file__, argv), "device": device_name(device),
              "torch": str(torch.__version__),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "model": args.model, "batch": args.batch, "resolution": args.resolution,
              "channels_last": args.channels_last, "steps": args.steps, "warmup": args.warmup,
              "memory_limit_mib": args.memory_limit_mib, "records": []}
    for alg in grid:
        report["records"].append(record_of(alg, args, device))
        compare_with_exact(report["records"])
        out.write_text(json.dumps(report, indent=1))
        print(line(report["records"][-1]), flush=True)
    return report


if __name__ == "__main__":
    main()
