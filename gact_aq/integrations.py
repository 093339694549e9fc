"""Hugging Face Trainer integration: compressed activations from one callback.

    from gact_aq.integrations import GactCallback
    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[GactCallback("L2.2", bit=1.25, aq_bit=0.5)])
    trainer.train()

A Trainer hands its callbacks the model but never the batch, and the adaptation needs a
few real samples. So the callback keeps them itself: a forward pre-hook on the model
remembers the first `adapt_samples` samples of the latest training forward. Everything
else is the Controller's usual loop (gact_aq/controller.py), mapped onto Trainer events
(docs/integrations.md).
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Optional, Union

import torch
from torch import nn

try:
    from transformers import TrainerCallback
    from transformers.utils import find_labels
except ImportError as error:  # gact_aq itself does not need transformers
    raise ImportError("gact_aq.integrations needs transformers (and accelerate for its "
                      "Trainer): pip install transformers accelerate") from error

from .controller import Controller
from .settings import QuantizationConfig, build_config

# Trainer adds this to the model's inputs when the model normalizes its own loss; the slice
# should get its plain mean loss instead (the scale would not change the allocation anyway).
_ACCUMULATION_ONLY_INPUTS = ("num_items_in_batch",)


class GactCallback(TrainerCallback):
    """gact_aq for a transformers Trainer: hooks installed at train begin, removed at train end.

    level: an optimization level name (gact_aq.OPTIMIZATION_LEVELS) with optional bit /
    aq_bit, as in gact_aq.set_optimization_level, or a ready QuantizationConfig (then bit and
    aq_bit stay 0). adapt_samples: how many samples of the current batch the adaptation's
    extra forward/backward passes use (fewer is cheaper; they only rank the tensors).
    After training, `controller` holds the levels, sensitivities and report.
    """

    def __init__(self, level: Union[str, QuantizationConfig] = "L2", bit: float = 0,
                 aq_bit: float = 0, adapt_samples: int = 8) -> None:
        if isinstance(level, QuantizationConfig):
            if bit or aq_bit:
                raise ValueError("pass bit / aq_bit either in the QuantizationConfig or with a "
                                 "level name, not both")
            self.config = replace(level).validate()
        elif isinstance(level, str):
            self.config = build_config(level, bit, aq_bit)
        else:
            raise TypeError(f"level must be a level name or a QuantizationConfig, got "
                            f"{type(level).__name__}")
        if isinstance(adapt_samples, bool) or not isinstance(adapt_samples, int) \
                or adapt_samples < 1:
            raise ValueError(f"adapt_samples must be a positive integer, got {adapt_samples!r}")
        self.adapt_samples = adapt_samples
        self.controller: Optional[Controller] = None
        self._model: Optional[nn.Module] = None
        self._capture: Optional[torch.utils.hooks.RemovableHandle] = None
        self._inputs: Optional[tuple[tuple, dict]] = None
        self._autocast: Optional[tuple[str, torch.dtype]] = None
        self._label_names: list[str] = []

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, model: Optional[nn.Module] = None,
                       **kwargs) -> None:
        if model is None:
            raise ValueError("GactCallback needs the Trainer's model at train begin")
        self.remove()  # a previous train() that raised never reached on_train_end
        self._model = model
        self._label_names = list(args.label_names or find_labels(type(model)))  # as Trainer
        self.controller = Controller(model, self.config, seed=args.seed)
        self._capture = model.register_forward_pre_hook(self._remember, with_kwargs=True)
        self.controller.install_hook()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        # After the optimizer step and zero_grad, once per optimizer step: with gradient
        # accumulation, never between micro-batches. The Prober also sets .grad aside and
        # puts it back, so the extra passes leave no gradient behind in any case.
        if self.controller is None:
            return
        try:
            self.controller.iterate(self._backprop)
        except BaseException:
            self.remove()  # train() stops here and on_train_end will not come
            raise

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.remove()

    # ------------------------------------------------------------------ hooks

    def remove(self) -> None:
        """Uninstall the saved-tensor hooks and the batch capture (no-op when not installed).
        Trainer events call it; call it yourself if train() raised."""
        if self.controller is not None:
            self.controller.uninstall_hook()
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        self._inputs = None

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: keep the head of the latest training forward's inputs (views,
        no copy) and the autocast state it ran under, to replay on the adaptation slice."""
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation and prediction
        # (the adaptation's own forwards come here too, and keep the same slice)
        kwargs = {k: v for k, v in kwargs.items() if k not in _ACCUMULATION_ONLY_INPUTS}
        first = next((t for t in _tensors((args, kwargs)) if t.dim() > 0), None)
        if first is None:
            return
        batch = first.shape[0]
        self._inputs = _head((args, kwargs), batch, self.adapt_samples)
        device = first.device.type
        self._autocast = (device, torch.get_autocast_dtype(device)) \
            if torch.is_autocast_enabled(device) else None

    def _backprop(self) -> None:
        """The adaptation pass: forward and backward of the slice, loss taken as Trainer does."""
        if self._inputs is None:
            raise RuntimeError("GactCallback saw no training forward of the model it was given "
                               "at train begin, so it has no samples to adapt on")
        args, kwargs = self._inputs
        if self._label_names and not any(name in kwargs for name in self._label_names):
            raise ValueError(
                f"GactCallback: the model's inputs hold none of its label arguments "
                f"({', '.join(self._label_names)}), so it computes no loss for the adaptation; "
                f"a Trainer with label_smoothing_factor or compute_loss_func takes them out")
        autocast = torch.autocast(*self._autocast) if self._autocast else contextlib.nullcontext()
        with autocast:
            outputs = self._model(*args, **kwargs)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs[0]
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise ValueError("GactCallback: the model returned no loss with gradients for the "
                             "adaptation slice; it must compute its loss from its inputs")
        loss.backward()


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _head(value: Any, batch: int, n: int) -> Any:
    """value with every tensor whose first dimension is the batch's cut to its first n rows."""
    if isinstance(value, torch.Tensor):
        return value[:n] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _head(v, batch, n) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)([_head(v, batch, n) for v in value])
    return value
