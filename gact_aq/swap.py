"""Swap: keep a compressed tensor in host memory between forward and backward.

On CUDA the device-to-host copy goes into pinned memory on a side stream, so it overlaps
with the forward pass (the published code left it on the compute stream); the copy back
waits for that copy and runs on the stream that needs the tensor.
On a CPU device the payload already lives in host memory, so swapping only marks it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from aqcore import CompressedTensor


@dataclass
class Swapped:
    """A compressed tensor held in host memory, and where it came from."""

    host: CompressedTensor
    device: torch.device
    done: "torch.cuda.Event | None"

    @property
    def nbytes(self) -> int:
        return self.host.nbytes


class Swapper:
    """Moves compressed tensors to host memory and back; one side stream per Controller."""

    def __init__(self) -> None:
        self._stream: "torch.cuda.Stream | None" = None

    def offload(self, ct: CompressedTensor) -> Swapped:
        if ct.device.type != "cuda":
            return Swapped(ct, ct.device, None)
        if self._stream is None:
            self._stream = torch.cuda.Stream(ct.device)
        current = torch.cuda.current_stream(ct.device)
        self._stream.wait_stream(current)
        held = {name: getattr(ct, name) for name in ("payload", "meta", "mask")
                if getattr(ct, name) is not None}
        with torch.cuda.stream(self._stream):
            host = {name: _to_pinned(t) for name, t in held.items()}
            done = torch.cuda.Event()
            done.record(self._stream)
        # the device buffers must not be reused before the side stream has read them
        for t in held.values():
            t.record_stream(self._stream)
        return Swapped(replace(ct, **host), ct.device, done)

    @staticmethod
    def restore(swapped: Swapped) -> CompressedTensor:
        if swapped.done is None:
            return swapped.host
        torch.cuda.current_stream(swapped.device).wait_event(swapped.done)
        return swapped.host.to(swapped.device, non_blocking=True)


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
