"""QMaxPool2d (argmax offsets, 1 byte per output) and QAvgPool2d (nothing saved)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..ops.pool import AvgPool2dFunction, MaxPool2dFunction
from .base import QLayer


class QMaxPool2d(QLayer, nn.MaxPool2d):
    """With return_indices=True the caller holds torch's int64 indices anyway, so the
    layer is the plain torch one."""

    def forward(self, input: torch.Tensor):
        if self.return_indices or not self._training_step(input):
            return super().forward(input)
        return MaxPool2dFunction.apply(input, _pair(self.kernel_size), _pair(self.stride), _pair(self.padding),
                                       _pair(self.dilation), self.ceil_mode)


class QAvgPool2d(QLayer, nn.AvgPool2d):
    """Average pooling (torch's AvgPool2d keeps its input for backward; this keeps only the shape)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._training_step(input):
            return super().forward(input)
        return AvgPool2dFunction.apply(input, _pair(self.kernel_size), _pair(self.stride), _pair(self.padding),
                                       self.ceil_mode, self.count_include_pad, self.divisor_override)
