"""Run chosen kernels once each on benchmark-sized inputs, for a profiler:

    ncu --clock-control none -k regex:_tiles python benchmark/kernels/profile_kernels.py \\
        bfloat16:1:compress float32:aq0.25:decompress

Each case is dtype:level:op (op: compress or decompress), in launch order.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aqcore import kernels  # noqa: E402
from aqcore.levels import LEVELS  # noqa: E402

NUMEL = 1 << 28  # 1 GiB of float32, 512 MiB of bfloat16


def main(cases: list[str]) -> None:
    for case in cases:
        dtype_name, level_name, op = case.split(":")
        dtype, levels = getattr(torch, dtype_name), [LEVELS[level_name]]
        x = torch.randn(1, NUMEL, device="cuda").to(dtype)
        payload, meta = kernels.compress_rows(x, levels, 1, 256)
        if op == "decompress":
            kernels.decompress_rows(payload, meta, levels, 256, torch.empty_like(x))
        torch.cuda.synchronize()
        print(f"ran {case}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["bfloat16:1:compress", "bfloat16:1:decompress"])
