"""QBatchNorm1d/2d/3d, QSyncBatchNorm, QLayerNorm: input compressed, statistics exact."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops.norm import BatchNormFunction, LayerNormFunction, SyncBatchNormFunction
from .base import QLayer


class _QBatchNorm(QLayer):
    uses_scheme = True

    def _track_batch(self) -> float:
        """Count this batch and return the running-stat factor, as torch.nn's _BatchNorm does."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def _running(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (self.running_mean, self.running_var) if self.track_running_stats else (None, None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._training_step(input, self.weight, self.bias):
            return super().forward(input)
        self._check_input_dim(input)
        momentum = self._track_batch()
        return BatchNormFunction.apply(input, self.weight, self.bias, *self._running(), momentum, self.eps,
                                       self.aq_scheme)


class QBatchNorm1d(_QBatchNorm, nn.BatchNorm1d):
    pass


class QBatchNorm2d(_QBatchNorm, nn.BatchNorm2d):
    pass


class QBatchNorm3d(_QBatchNorm, nn.BatchNorm3d):
    pass


class QSyncBatchNorm(_QBatchNorm, _BatchNorm):
    """torch.nn.SyncBatchNorm's signature and results. In training with several ranks in
    process_group the statistics cover all of them, on CPU/gloo as well as CUDA. It is not
    an nn.SyncBatchNorm subclass: DDP refuses those on CPU (torch's own needs CUDA)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: torch.Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _sync_group(self):
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self._sync_group() if self.training else None
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        momentum = self._track_batch()
        training_step = self._training_step(input, self.weight, self.bias)
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, *self._running(), momentum, self.eps,
                                           group, self.aq_scheme if training_step else None)


class QLayerNorm(QLayer, nn.LayerNorm):
    uses_scheme = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._training_step(input, self.weight, self.bias):
            return super().forward(input)
        plan, obs = self.aq_scheme.plan(input)
        return LayerNormFunction.apply(input, self.normalized_shape, self.weight, self.bias, self.eps, plan, obs)
