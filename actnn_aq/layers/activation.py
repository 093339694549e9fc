"""QReLU, QDropout (1-bit masks), QGELU, QSiLU (input compressed)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.activation import DropoutFunction, GELUFunction, ReLUFunction, SiLUFunction
from .base import QLayer


class QReLU(QLayer, nn.ReLU):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._training_step(input):
            return super().forward(input)
        return ReLUFunction.apply(input, self.inplace)


class QDropout(QLayer, nn.Dropout):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._training_step(input) or self.p in (0.0, 1.0):
            return super().forward(input)
        return DropoutFunction.apply(input, self.p, self.inplace)


class QGELU(QLayer, nn.GELU):
    uses_scheme = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._training_step(input):
            return super().forward(input)
        plan, obs = self.aq_scheme.plan(input)
        return GELUFunction.apply(input, self.approximate, plan, obs)


class QSiLU(QLayer, nn.SiLU):
    uses_scheme = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._training_step(input):
            return super().forward(input)
        plan, obs = self.aq_scheme.plan(input)
        return SiLUFunction.apply(input, self.inplace, plan, obs)
