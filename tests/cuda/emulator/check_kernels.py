"""Run the CUDA kernel source on the CPU and compare it with the reference, byte for byte.

    python tests/cuda/emulator/check_kernels.py [--quick]

For changing aqcore/csrc on a machine without a GPU: the kernels are compiled with g++ against
emu_prelude.h (each lane a thread, warp primitives through a barrier) and called through
aqcore.kernels, so the index math, the warp cooperation, the per-row tables and the Python
dispatch are all exercised. It does not check speed, PTX-only code paths (their portable
twins run instead) or memory-model questions; the GPU tests in tests/cuda do. Takes minutes.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import sys
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent))

from aqcore import errors, kernels, noise, reference  # noqa: E402
from aqcore.levels import QUANTIZED_LEVELS  # noqa: E402
from kernel_checks import same_bits  # noqa: E402

CSRC = ROOT / "aqcore" / "csrc"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def build():
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()) + sorted(HERE.glob("emu_*")):
        digest.update(path.read_bytes())
    return cpp_extension.load(
        name=f"aq_emulator_{digest.hexdigest()[:12]}", sources=[str(HERE / "emu_ext.cpp")],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O1", "-std=c++20", "-ffp-contract=off", "-frounding-math", "-pthread"],
        extra_ldflags=["-pthread"])


def special(kind: str, shape) -> torch.Tensor:
    x = torch.randn(shape)
    if kind == "relu":
        x = x.clamp_min(0)
    elif kind == "sparse":
        x = torch.where(torch.rand(shape) < 0.9, 0.0, x.abs())
    elif kind == "signed_zeros":
        x = torch.where(torch.rand(shape) < 0.5, -0.0, 0.0)
    elif kind == "constant":
        x = torch.full(shape, 3.25)
    elif kind == "nan":
        x.view(-1)[::97] = float("nan")
    elif kind == "inf":
        x.view(-1)[5::301] = float("inf")
    elif kind == "near_max":
        x = x.clamp(-1, 1) * 3.4e38
    elif kind == "denormal":
        x = x * 1e-44
    elif kind == "wide":
        x = x * torch.logspace(-20, 20, shape[-1])
    return x


def exact(rows: torch.Tensor, levels, seed: int, group_size: int = 256) -> bool:
    payload, meta = kernels.compress_rows(rows, levels, seed, group_size)
    ref_payload, ref_meta = reference.compress_rows(rows, levels, seed, group_size)
    if not (torch.equal(payload, ref_payload) and same_bits(meta, ref_meta)):
        return False
    out, expected = torch.empty_like(rows), torch.empty_like(rows)
    kernels.decompress_rows(payload, meta, levels, group_size, out)
    reference.decompress_rows(ref_payload, ref_meta, levels, group_size, expected)
    return same_bits(out, expected)


def cases(quick: bool):
    """(label, rows, levels, seed, group_size) covering every kernel path."""
    rng = random.Random(0)
    shapes = [(1, 1), (1, 300), (2, 2048), (3, 2050), (1, 6200)]
    kinds = ["relu", "sparse", "signed_zeros", "constant", "nan", "inf", "near_max",
             "denormal", "wide"]
    if quick:
        shapes, kinds = shapes[:3], kinds[::3]
    for dtype in DTYPES:
        for level in QUANTIZED_LEVELS:
            for shape in shapes:
                seed = rng.randrange(2**64)
                yield "random", torch.randn(shape).to(dtype), [level] * shape[0], seed, 256
            for kind in kinds:
                yield kind, special(kind, (2, 2600)).to(dtype), [level] * 2, 11, 256
        for row_numel in (3, 257, 2049, 4100):
            levels = [rng.choice(QUANTIZED_LEVELS) for _ in range(5)]
            yield "mixed", torch.randn(5, row_numel).to(dtype), levels, rng.randrange(2**64), 256
        for group_size in (32, 96, 512):
            for level in QUANTIZED_LEVELS[:: 2 if quick else 1]:
                rows = special("relu", (3, 700)).to(dtype)
                yield f"G{group_size}", rows, [level] * 3, 7, group_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and value kinds")
    args = parser.parse_args()
    torch.manual_seed(0)
    emulated = build()
    kernels._extension = lambda: emulated  # the Python dispatch of aqcore.kernels, emulated
    failures = []
    for resident in (3, 1):  # persistent warps taking one and several tiles each
        emulated.set_resident_blocks(resident)
        for label, rows, levels, seed, group_size in cases(args.quick or resident == 1):
            if not exact(rows, levels, seed, group_size):
                failures.append(f"{label} {tuple(rows.shape)} {rows.dtype} "
                                f"{[str(l) for l in levels]} G={group_size}")
    for seed in (0, 2**63 + 17):
        for first, big in ((0, False), (7, False), (2**33 - 100, True), (2**33 - 99, True),
                           (2**34 + 8, True)):
            index = torch.arange(first, first + 256)
            expected = noise.uniform(seed, index, 2**40 if big else 2**33)
            for cu in (c for c in (1, 2, 4, 8) if first % c == 0):  # the fast path's premise
                got = emulated.noise_paths(seed - 2**64 if seed >= 2**63 else seed, first, 256,
                                           big, noise.stream_key(seed), cu)
                if not (torch.equal(got[0], expected) and torch.equal(got[1], expected)):
                    failures.append(f"noise seed={seed} first={first} cu={cu}")
    for dtype in DTYPES:
        x = torch.randn(3, 5000).to(dtype)
        levels = list(QUANTIZED_LEVELS[2::-1])  # out of level order: the rows are reordered
        *_, found = kernels.compress_rows_with_errors(x, levels, 3, 256)
        if not torch.allclose(found, errors.level_errors(x, 256), rtol=1e-4):
            failures.append(f"error statistics {dtype}")
    for n in (0, 1, 9, 17, 4099):
        mask = torch.rand(n) < 0.3
        packed = kernels.pack_bits(mask)
        if not (torch.equal(packed, reference.pack_bits(mask))
                and torch.equal(kernels.unpack_bits(packed, n), mask)):
            failures.append(f"mask n={n}")
    whole = torch.randn(70000)  # aligned and 2-byte-offset tensors, past one launch's 40
    tensors = [whole[:16], whole[16:20000].view(torch.bfloat16)[1:], torch.randn(3)]
    tensors += [torch.randn(n) for n in range(1, 40)]
    before = [t.clone() for t in tensors]
    kernels.zero_if(torch.tensor(False), tensors)
    if not all(torch.equal(t.view(torch.uint8), b.view(torch.uint8)) for t, b in zip(tensors, before)):
        failures.append("zero_if changed tensors with the flag clear")
    kernels.zero_if(torch.tensor(True), tensors)
    if any(int(t.count_nonzero()) for t in tensors) or int(whole[20000:].count_nonzero()) == 0:
        failures.append("zero_if with the flag set")
    print("\n".join(failures) or "all kernel paths match the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
