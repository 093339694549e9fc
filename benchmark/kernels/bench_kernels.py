"""Kernel throughput against the device-to-device copy bandwidth (target: >= 0.8 of it).

For a 1 GiB float32 and a 512 MiB bfloat16 activation, every quantized level, compress and
decompress: the median over --reps timings (CUDA events, after warm-up) of --batch calls
launched back to back, per call; effective bandwidth (bytes read + bytes written) / time;
the copy bandwidth of the same number of bytes measured the same way in this process; and
the reference implementation on the same GPU. Back-to-back calls time the kernels as a
training step runs them, the host queueing ahead; `ms_single` is one call between two
events, host overhead (Python, launch) included. Also per-row mixed levels, the fused
error statistics and the 1-bit mask packer.

    python benchmark/kernels/bench_kernels.py [--reps 20] [--batch 10] [--ref-reps 3]

Writes benchmark/results/kernels_<gpu>.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from aqcore import kernels, reference  # noqa: E402
from aqcore.levels import QUANTIZED_LEVELS  # noqa: E402

SIZES = {torch.float32: 1 << 30, torch.bfloat16: 1 << 29}  # bytes of the activation
MIXED_ROWS = 128


def time_ms(fn: Callable[[], object], reps: int, warmup: int, batch: int = 1) -> float:
    """Median milliseconds per call of fn over reps timings of `batch` back-to-back calls,
    each timing between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / batch)
    return statistics.median(times)


def copy_gbps(nbytes: int, args) -> float:
    """Device-to-device copy of nbytes: (read + written) / time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), args.reps, 3, args.batch)
    return 2 * nbytes / ms / 1e6


def record(op, level, dtype, numel, moved, ms, copy, ref_ms, ms_single=None):
    gbps = moved / ms / 1e6
    return {"op": op, "level": level, "dtype": str(dtype).replace("torch.", ""), "numel": numel,
            "ms": round(ms, 5), "gbps": round(gbps, 1), "copy_gbps": round(copy, 1),
            "fraction": round(gbps / copy, 4),
            "ms_single": None if ms_single is None else round(ms_single, 5),
            "ref_ms": None if ref_ms is None else round(ref_ms, 3)}


def kernel_ms(fn: Callable[[], object], args) -> tuple[float, float]:
    """(per call back to back, one call alone) in milliseconds."""
    return time_ms(fn, args.reps, 3, args.batch), time_ms(fn, args.reps, 1)


def bench_levels(dtype, args, copy, progress) -> list[dict]:
    numel = SIZES[dtype] // torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, numel, device="cuda", generator=g).to(dtype)
    out = torch.empty_like(x)
    mixed = [QUANTIZED_LEVELS[r % len(QUANTIZED_LEVELS)] for r in range(MIXED_ROWS)]
    cases = [(level.name, [level], x) for level in QUANTIZED_LEVELS]
    cases.append(("mixed", mixed, x.view(MIXED_ROWS, -1)))
    records = []
    for name, levels, rows in cases:
        progress.set_postfix_str(f"{rows.dtype} {name}")
        payload, meta = kernels.compress_rows(rows, levels, 1, 256)
        stored = payload.numel() + meta.numel() * meta.element_size()
        dense = rows.numel() * rows.element_size()
        target = out.view(rows.shape)
        ms, single = kernel_ms(lambda: kernels.compress_rows(rows, levels, 1, 256), args)
        ref = time_ms(lambda: reference.compress_rows(rows, levels, 1, 256), args.ref_reps, 1)
        records.append(record("compress", name, dtype, numel, dense + stored, ms, copy, ref,
                              single))
        ms, single = kernel_ms(
            lambda: kernels.decompress_rows(payload, meta, levels, 256, target), args)
        ref = time_ms(lambda: reference.decompress_rows(payload, meta, levels, 256, target),
                      args.ref_reps, 1)
        records.append(record("decompress", name, dtype, numel, dense + stored, ms, copy, ref,
                              single))
        if name in ("1", "aq0.25"):
            ms, single = kernel_ms(
                lambda: kernels.compress_rows_with_errors(rows, levels, 1, 256), args)
            records.append(record("compress+errors", name, dtype, numel, dense + stored, ms,
                                  copy, None, single))
        progress.update()
    return records


def bench_masks(args, copy) -> list[dict]:
    numel = SIZES[torch.float32] // 4
    mask = torch.rand(numel, device="cuda") < 0.5
    packed = kernels.pack_bits(mask)
    moved = numel + packed.numel()
    rows = []
    ms, single = kernel_ms(lambda: kernels.pack_bits(mask), args)
    ref = time_ms(lambda: reference.pack_bits(mask), args.ref_reps, 1)
    rows.append(record("pack_mask", "bits", torch.bool, numel, moved, ms, copy, ref, single))
    ms, single = kernel_ms(lambda: kernels.unpack_bits(packed, numel), args)
    ref = time_ms(lambda: reference.unpack_bits(packed, numel), args.ref_reps, 1)
    rows.append(record("unpack_mask", "bits", torch.bool, numel, moved, ms, copy, ref, single))
    return rows


def print_table(records: list[dict]) -> None:
    print(f"{'op':<16}{'level':<8}{'dtype':<10}{'ms':>9}{'GB/s':>9}{'copy':>8}{'frac':>7}"
          f"{'1 call':>9}{'ref ms':>10}{'x ref':>8}")
    for r in records:
        speedup = f"{r['ref_ms'] / r['ms']:.0f}" if r["ref_ms"] else "-"
        ref_ms = f"{r['ref_ms']:.2f}" if r["ref_ms"] else "-"
        print(f"{r['op']:<16}{r['level']:<8}{r['dtype']:<10}{r['ms']:>9.4f}{r['gbps']:>9.0f}"
              f"{r['copy_gbps']:>8.0f}{r['fraction']:>7.3f}{r['ms_single']:>9.4f}{ref_ms:>10}"
              f"{speedup:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20, help="timed runs per kernel (median)")
    parser.add_argument("--batch", type=int, default=10, help="back-to-back calls per timed run")
    parser.add_argument("--ref-reps", type=int, default=3, help="timed runs of the reference")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmark" / "results")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the CUDA kernels are not available here (python -m aqcore.build)")
    gpu = torch.cuda.get_device_name()
    records = []
    progress = tqdm(total=2 * (len(QUANTIZED_LEVELS) + 1), desc="kernels", file=sys.stderr)
    for dtype in SIZES:
        copy = copy_gbps(SIZES[dtype], args)
        records += bench_levels(dtype, args, copy, progress)
    progress.close()
    records += bench_masks(args, copy_gbps(SIZES[torch.float32] // 4, args))
    result = {
        "command": "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT))]
                                         + sys.argv[1:]),
        "gpu": gpu,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "records": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels_{re.sub(r'[^a-z0-9]+', '_', gpu.lower()).strip('_')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print_table(records)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
