"""Prebuild the CUDA kernels and report: `python -m aqcore.build [-v]`.

Useful before a multi-process job (the first use would otherwise build inside it) and to
see why the kernels cannot be built here. Exit status: 0 when the kernels load, and also
where no CUDA build is possible (no GPU, a CPU-only PyTorch, no nvcc or ninja: supported
setups, where aqcore runs its reference implementation); 1 only when a build was possible
and failed, so a script can tell a broken toolchain from a machine without one.
"""
from __future__ import annotations

import sys

import torch

from . import kernels


def main(argv: list[str]) -> int:
    verbose = "-v" in argv or "--verbose" in argv
    reason = kernels.unavailable_reason()
    if reason is not None:
        print(f"aqcore kernels: not built ({reason}); aqcore uses the reference implementation")
        return 0
    try:
        _, info = kernels.build(verbose=verbose)
    except Exception as exc:  # report any compiler or loader failure as it came
        print(f"aqcore kernels: the build failed; aqcore uses the reference implementation\n{exc}")
        return 1
    how = "loaded the cached build" if info.cached else "built"
    print(f"aqcore kernels: {how} for compute capability {info.arch} "
          f"({torch.cuda.get_device_name()}) in {info.seconds:.1f} s\n"
          f"  {info.name} in {info.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
