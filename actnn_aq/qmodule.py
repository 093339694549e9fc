"""QModule: convert a model's standard layers in place and own its compression state."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

import aqcore
from aqcore.nested import tensors

from . import layers as q
from .ops.attention import ATTENTION_LAYER, routed
from .saved import EXACT, Plan
from .settings import QuantizationConfig, snapshot
from .scheme import Controller

CONVERSIONS: dict[type, type] = {
    nn.Conv1d: q.QConv1d, nn.Conv2d: q.QConv2d, nn.Conv3d: q.QConv3d,
    nn.ConvTranspose1d: q.QConvTranspose1d, nn.ConvTranspose2d: q.QConvTranspose2d,
    nn.ConvTranspose3d: q.QConvTranspose3d, nn.Linear: q.QLinear,
    nn.BatchNorm1d: q.QBatchNorm1d, nn.BatchNorm2d: q.QBatchNorm2d, nn.BatchNorm3d: q.QBatchNorm3d,
    nn.SyncBatchNorm: q.QSyncBatchNorm, nn.LayerNorm: q.QLayerNorm,
    nn.ReLU: q.QReLU, nn.Dropout: q.QDropout, nn.GELU: q.QGELU, nn.SiLU: q.QSiLU,
    nn.MaxPool2d: q.QMaxPool2d, nn.AvgPool2d: q.QAvgPool2d,
}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def convert(model: nn.Module, controller: Controller) -> list[str]:
    """Turn every layer of exactly a CONVERSIONS type into its Q-layer by switching its
    class: the module object, its parameters, buffers, hooks and train/eval mode stay as
    they are (subclasses of these types are left alone: their forward may differ). Q-layers
    already in the model join the controller too. Returns the names of the Q-layers."""
    names = []
    for name, module in model.named_modules():
        kind = type(module)
        if kind in CONVERSIONS and (controller.config.convert_bn or kind not in BATCH_NORMS):
            module.__class__ = CONVERSIONS[kind]
        elif _is_exact_gelu(module):
            module.approximate = "none"
            module.__class__ = q.QGELU
        if isinstance(module, q.QLayer):
            if module.uses_scheme:
                module.aq_scheme = controller.add_layer(name or type(module).__name__)
            names.append(name)
    return names


def _is_exact_gelu(module: nn.Module) -> bool:
    """transformers' GELUActivation (BERT's and many more models' MLP activation) when it
    runs F.gelu: nn.GELU in all but its class, so it converts to QGELU too."""
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is nn.functional.gelu


def use_expandable_segments() -> None:
    """L5: ActNN's L5 needed a patched PyTorch cache threshold; stock PyTorch's answer to
    the same fragmentation is the caching allocator's expandable segments. Process-wide."""
    if torch.cuda.is_available():
        torch.cuda.memory._set_allocator_settings(EXPANDABLE_SEGMENTS)


class QModule(nn.Module):
    """model = QModule(model): the same model, its standard layers converted in place.

    The config in force now (actnn_aq.config, set with set_optimization_level) is copied
    and used for this model's whole life. `controller` holds the model's compression
    state (per-layer bits, gradient statistics); `model` is the converted original, so
    `model.state_dict()` keeps its usual keys.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        config: QuantizationConfig = snapshot()
        self.model = model
        self.controller = Controller(config)
        if not convert(model, self.controller):
            raise ValueError(f"QModule found nothing to convert in {type(model).__name__}; it converts "
                             f"{', '.join(sorted(t.__name__ for t in CONVERSIONS))}")
        if config.compress and config.guard:
            self.controller.watch(model.parameters())
        if config.expandable_segments:
            use_expandable_segments()

    @property
    def config(self) -> QuantizationConfig:
        return self.controller.config

    def set_sample_indices(self, indices: torch.Tensor) -> None:
        """Dataset indices of the next forward's samples (needed with config.use_gradient)."""
        self.controller.set_sample_indices(indices)

    def forward(self, *args, **kwargs):
        with self._attention_routed():
            output = self.model(*args, **kwargs)
        if self.controller.guard is not None and self.training and torch.is_grad_enabled():
            first = next((t for t in tensors(output) if t.requires_grad), None)
            if first is not None:  # the guard's check runs at the end of every backward
                first.register_hook(lambda grad: self.controller.backward_running())
        return output

    def _attention_routed(self):
        """Training steps send F.scaled_dot_product_attention through ops/attention.py."""
        cfg = self.config
        if not (self.training and torch.is_grad_enabled() and cfg.compress and cfg.attention_bit < 32):
            return contextlib.nullcontext()
        controller = self.controller

        def plan_for(call: int) -> Plan:
            if not controller.ladder:  # the guard barred every level
                return EXACT
            level = controller.lifted(aqcore.parse_level(cfg.attention_bit))
            seed = controller.seed(ATTENTION_LAYER + call, controller.iteration)
            return Plan(level, seed, cfg.group_size, cfg.swap)
        return routed(plan_for)
