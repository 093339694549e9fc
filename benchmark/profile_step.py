"""Where a training step's time goes: the top operators on the device and on the host.

    python benchmark/profile_step.py --model resnet50 --mode actnn_aq [--bit 1.25]

Warm-up as train_step.py, then one step under torch.profiler (operators by device time
and by host self time) and one under cProfile (Python functions by cumulative time).
The host table shows what a step waits for when the device idles (syncs, Python).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import now  # noqa: E402
from train_step import MODES, Setup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=("resnet50", "bert-large", "tiny"))
    parser.add_argument("--mode", default="actnn_aq", choices=MODES)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--bit", type=float, default=1.5)
    parser.add_argument("--aq-bit", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--nchw", action="store_true", help="ResNet-50 in NCHW, not channels_last")
    args = parser.parse_args()
    args.batch = args.batch or {"resnet50": 128, "bert-large": 32, "tiny": 32}[args.model]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Setup(args.mode, args, device)
    try:
        run.warm_up(args.warmup, device)
        print(f"{args.model} b{args.batch} {args.mode} {args.bit:g} bit: step "
              f"{run.median_step_ms(5, device):.1f} ms")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            run.step()
            now(device)
        averages = prof.key_averages()
        if device.type == "cuda":
            print(averages.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        profiler = cProfile.Profile()
        profiler.runcall(lambda: (run.step(), now(device)))
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.rows * 2)
    finally:
        run.close()


if __name__ == "__main__":
    main()
