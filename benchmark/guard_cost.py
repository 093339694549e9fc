"""What the gradient guard (aqcore/guard.py) costs against a training step, in one process.

    python benchmark/guard_cost.py --model resnet50 bert-large [--checks 50]

Per model: the median exact training step (train_step.py's, synchronized), then the median
of GradientGuard.check() over the same model's gradients, synchronized (its device time plus
launches) and not (the host's launch time alone: what a step that keeps the device busy
pays). The end-to-end figure, compressed steps with and without the guard, is train_step.py's
`--modes actnn_aq actnn_aq-noguard gact_aq gact_aq-noguard`. Results go to
benchmark/results/guard_cost_<models>_<gpu>.json with the command, GPU, torch and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aqcore.guard import GradientGuard  # noqa: E402
from common import median_ms, now  # noqa: E402
from train_step import RESULTS, Setup  # noqa: E402


def measure(model_name: str, args, device: torch.device) -> dict:
    args.model, args.batch = model_name, {"resnet50": 128, "bert-large": 32, "tiny": 32}[model_name]
    run = Setup("exact", args, device)
    run.warm_up(args.warmup, device)
    step_ms = run.median_step_ms(args.steps, device)
    guard = GradientGuard(run.model.parameters())
    for _ in range(3):
        guard.check()
    synced, launched = [], []
    for _ in range(args.checks):
        start = now(device)
        guard.check()
        launched.append(time.perf_counter() - start)
        synced.append(now(device) - start)
    if guard.alarm():
        raise RuntimeError("the guard fired on repeated checks of the same gradients")
    return {"model": model_name, "batch": args.batch, "parameters": len(guard.parameters),
            "step_ms": step_ms, "check_ms": median_ms(synced),
            "check_host_ms": median_ms(launched),
            "check_percent_of_step": 100 * median_ms(synced) / step_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["resnet50", "bert-large"],
                        choices=("resnet50", "bert-large", "tiny"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checks", type=int, default=50)
    args = parser.parse_args()
    args.nchw = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"command": "python " + " ".join(sys.argv), "gpu": gpu, "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "records": []}
    for name in args.model:
        record = measure(name, args, device)
        report["records"].append(record)
        print(f"{name} b{record['batch']}: exact step {record['step_ms']:.1f} ms, guard check "
              f"{record['check_ms']:.3f} ms ({record['check_percent_of_step']:.2f}% of the step; "
              f"host launches {record['check_host_ms']:.3f} ms) over {record['parameters']} parameters",
              flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"guard_cost_{'_'.join(args.model)}_{re.sub(r'[^a-z0-9]+', '_', gpu.lower())}.json"
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
