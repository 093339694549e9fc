"""QConv1d/2d/3d, QConvTranspose1d/2d/3d, QLinear: the input is kept compressed."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.conv import ConvFunction, ConvSpec, LinearFunction
from ..sensitivity import conv_coef, conv_fan, conv_transpose_coef
from .base import QLayer


def _same_padding(conv: nn.modules.conv._ConvNd) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """padding='same' as torch computes it: symmetric integer padding plus, for even
    windows, one extra zero row/column F.pad-ed on the side torch puts it."""
    left, pre_pad, asymmetric = [], [0] * (2 * len(conv.kernel_size)), False
    for i, (k, d) in enumerate(zip(conv.kernel_size, conv.dilation)):
        total = d * (k - 1)
        left.append(total // 2)
        if total % 2:
            asymmetric = True
            pre_pad[2 * (len(conv.kernel_size) - 1 - i) + 1] = 1
    return tuple(left), (tuple(pre_pad) if asymmetric else None)


class _QConvNd(QLayer):
    uses_scheme = True
    _dims = 2

    def _spec(self) -> ConvSpec:
        common = dict(dims=self._dims, stride=self.stride, dilation=self.dilation, groups=self.groups)
        if self.padding_mode != "zeros":
            return ConvSpec(padding=(0,) * self._dims, pre_pad=tuple(self._reversed_padding_repeated_twice),
                            pad_mode=self.padding_mode, **common)
        if self.padding == "valid":
            return ConvSpec(padding=(0,) * self._dims, **common)
        if self.padding == "same":
            padding, pre_pad = _same_padding(self)
            return ConvSpec(padding=padding, pre_pad=pre_pad, **common)
        return ConvSpec(padding=self.padding, **common)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._training_step(input, self.weight, self.bias):
            return super().forward(input)
        kernel = self.weight[0, 0].numel()
        plan, obs = self._plan(input, conv_fan(kernel, self.in_channels, self.groups))
        if obs is not None:
            obs.coef = conv_coef(kernel, self.groups, input.shape[-self._dims:].numel())
        return ConvFunction.apply(input, self.weight, self.bias, self._spec(), plan, obs)


class QConv1d(_QConvNd, nn.Conv1d):
    _dims = 1


class QConv2d(_QConvNd, nn.Conv2d):
    _dims = 2


class QConv3d(_QConvNd, nn.Conv3d):
    _dims = 3


class _QConvTransposeNd(QLayer):
    uses_scheme = True
    _dims = 2

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not self._training_step(input, self.weight, self.bias):
            return super().forward(input, output_size)
        if self.padding_mode != "zeros":
            raise ValueError(f"Only 'zeros' padding mode is supported for {type(self).__name__}")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              self._dims, self.dilation)
        spec = ConvSpec(dims=self._dims, stride=self.stride, padding=self.padding, dilation=self.dilation,
                        groups=self.groups, transposed=True, output_padding=tuple(output_padding))
        kernel = self.weight[0, 0].numel()
        plan, obs = self._plan(input, conv_fan(kernel, self.in_channels, self.groups), out_weight=False)
        y = ConvFunction.apply(input, self.weight, self.bias, spec, plan, obs)
        if obs is not None:
            in_positions, out_positions = input.shape[-self._dims:].numel(), y.shape[-self._dims:].numel()
            obs.coef = conv_transpose_coef(kernel, self.groups, out_positions)
            obs.fan *= in_positions / max(out_positions, 1)  # see sensitivity.conv_fan
        return y


class QConvTranspose1d(_QConvTransposeNd, nn.ConvTranspose1d):
    _dims = 1


class QConvTranspose2d(_QConvTransposeNd, nn.ConvTranspose2d):
    _dims = 2


class QConvTranspose3d(_QConvTransposeNd, nn.ConvTranspose3d):
    _dims = 3


class QLinear(QLayer, nn.Linear):
    uses_scheme = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._training_step(input, self.weight, self.bias):
            return super().forward(input)
        plan, obs = self._plan(input, conv_fan(1, self.in_features, 1))
        if obs is not None:
            obs.coef = conv_coef(1, 1, input.shape[1:-1].numel() if input.dim() > 1 else 1)
        return LinearFunction.apply(input, self.weight, self.bias, plan, obs)
