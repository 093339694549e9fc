"""The tensors inside a model's output, whatever container holds them."""
from __future__ import annotations

from typing import Iterator

import torch


def tensors(output: object) -> Iterator[torch.Tensor]:
    """The tensors of `output`: a tensor, or inside tuples, lists and dicts (HF ModelOutput
    is a dict), depth first."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from tensors(item)
