"""What every Q-layer shares: when to save compactly, and where its scheme comes from."""
from __future__ import annotations

import torch

from ..saved import Plan
from ..scheme import Controller, LayerScheme, Observation
from ..settings import snapshot


class QLayer:
    """Mixin before the torch.nn class: `class QConv2d(QLayer, nn.Conv2d)`.

    A Q-layer takes its own path only for a training step: training mode, grad mode on,
    something requiring grad. Otherwise (eval, no_grad, frozen) it is the torch.nn layer
    and costs nothing extra. Layers that compress an input (uses_scheme) hold a LayerScheme:
    QModule attaches one from the model's Controller; a layer built on its own gets a
    private Controller from the config in force at construction.
    """

    uses_scheme = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.uses_scheme:
            self.aq_scheme: LayerScheme = Controller(snapshot()).add_layer(type(self).__name__)

    def _plan(self, x: torch.Tensor, fan: float, out_weight: bool = True) -> tuple[Plan | None, Observation | None]:
        """A weighted layer's plan: its input is needed only for the weight gradient.
        out_weight: the weight's dim 0 is the output channel (not so when transposed)."""
        if not self.weight.requires_grad:
            return None, None
        return self.aq_scheme.plan(x, fan, self.weight if out_weight else None)

    def _training_step(self, x: torch.Tensor, *params) -> bool:
        if not (self.training and torch.is_grad_enabled()):
            return False
        return x.requires_grad or any(p is not None and p.requires_grad for p in params)
