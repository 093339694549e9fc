"""gact_aq.integrations.GactCallback on a tiny BERT trained by a transformers Trainer (CPU,
no download): hooks live exactly during training, the adaptation runs on a slice of the
batch at optimizer steps, and it leaves the training itself alone."""
import math

import pytest
import torch

pytest.importorskip("accelerate")  # the Trainer needs it
transformers = pytest.importorskip("transformers")

import gact_aq  # noqa: E402
from gact_aq.integrations import GactCallback  # noqa: E402
from gact_aq.settings import QuantizationConfig, build_config  # noqa: E402

STEPS = 12


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def parity_data(n: int = 64, length: int = 16) -> list[dict]:
    """Label: the parity of the first token (learnable from the pooled first position)."""
    tokens = torch.randint(1, 64, (n, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": t, "labels": t[0] % 2} for t in tokens]


def train(tmp_path, callbacks=(), steps=STEPS, trainer_class=None, **overrides):
    """Train a fresh tiny BERT; returns (model, logged losses)."""
    model = tiny_bert()
    settings = dict(per_device_train_batch_size=16, max_steps=steps, learning_rate=3e-3,
                    logging_steps=1, use_cpu=True, report_to=[], save_strategy="no",
                    disable_tqdm=True, seed=0)
    args = transformers.TrainingArguments(str(tmp_path / "out"), **{**settings, **overrides})
    trainer_class = trainer_class or transformers.Trainer
    trainer = trainer_class(model=model, args=args, train_dataset=parity_data(),
                            callbacks=list(callbacks))
    trainer.train()
    return model, [log["loss"] for log in trainer.state.log_history if "loss" in log]


class Spy(transformers.TrainerCallback):
    """Listed after GactCallback: sees the hooks' state and the gradients at every step start."""

    def __init__(self, gact: GactCallback) -> None:
        self.gact = gact
        self.installed: list[bool] = []
        self.leftover_grads = 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.installed.append(self.gact.controller.installed)
        self.leftover_grads += sum(p.grad is not None and bool(p.grad.any())
                                   for p in model.parameters())


def test_the_trainer_trains_with_hooks_installed_only_while_it_trains(tmp_path):
    before = QuantizationConfig(**vars(gact_aq.config))
    gact = GactCallback("L2.2", bit=1.5, aq_bit=0.5, adapt_samples=4)
    spy = Spy(gact)
    model, losses = train(tmp_path, [gact, spy], learning_rate=1e-2, logging_steps=4)
    _, exact = train(tmp_path, learning_rate=1e-2, logging_steps=4)  # 0.70, 0.66, 0.51
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0] - 0.1
    assert abs(losses[-1] - exact[-1]) < 0.05
    ctl = gact.controller
    assert spy.installed == [True] * STEPS and not ctl.installed
    assert ctl.iteration == STEPS and ctl.extra_passes > 0          # adapted: 0, 1, 2, 4, 8
    assert len(ctl.levels) == len(ctl.sensitivity) > 0
    assert {level.name for level in ctl.levels} & {"aq0.5", "aq1"}  # 1.5 bits on average
    assert gact_aq.config == before                                 # the global config untouched
    samples = parity_data(4)
    loss = model(input_ids=torch.stack([d["input_ids"] for d in samples]),
                 labels=torch.stack([d["labels"] for d in samples])).loss
    assert not ctl.report().rows                                    # nothing compressed any more
    loss.backward()


@pytest.mark.parametrize("leaky", [False, True])
def test_with_gradient_accumulation_the_adaptation_leaves_no_trace(tmp_path, leaky):
    """At bit 32 every tensor stays as it is whether levels are adapted ("L2") or fixed
    ("L1"), so the two runs must agree weight for weight (dropout on, 2 micro-batches per
    step): adaptation gradients or random draws leaking into the next accumulation would
    show. The leaky variant, an extra backward after each step, proves the test can fail."""
    class Leaky(GactCallback):
        def on_step_end(self, *args, **kwargs):
            super().on_step_end(*args, **kwargs)
            self._backprop()

    adapted = (Leaky if leaky else GactCallback)("L2", bit=32)
    fixed = GactCallback("L1", bit=32)
    spy = Spy(adapted)
    settings = dict(steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=8,
                    max_grad_norm=0)
    model, _ = train(tmp_path, [adapted, spy], **settings)
    reference, _ = train(tmp_path, [fixed], **settings)
    assert adapted.controller.extra_passes > 0 and fixed.controller.extra_passes == 0
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert same != leaky and (spy.leftover_grads > 0) == leaky


class AutocastTrainer(transformers.Trainer):
    """bf16 through Trainer's own hook for it, around compute_loss, not around the forward."""

    def autocast_smart_context_manager(self, cache_enabled=True):
        return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("how", [dict(bf16=True), dict(trainer_class=AutocastTrainer)],
                         ids=["bf16-argument", "trainer-autocast"])
def test_bf16_cpu_autocast_reaches_the_adaptation_slice(tmp_path, how):
    gact = GactCallback("L2.2", adapt_samples=4)
    seen = []

    class Record(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.classifier.register_forward_hook(
                lambda module, inputs, out: seen.append((out.shape[0], out.dtype)))

    _, losses = train(tmp_path, [gact, Record()], steps=6, **how)
    assert all(math.isfinite(l) for l in losses)
    assert (4, torch.bfloat16) in seen and set(seen) <= {(16, torch.bfloat16), (4, torch.bfloat16)}
    assert gact.controller.levels and not gact.controller.installed


def test_a_model_without_its_own_loss_is_refused_clearly(tmp_path):
    # label smoothing makes the Trainer pop the labels: the model computes no loss
    gact = GactCallback()
    with pytest.raises(ValueError, match="none of its label arguments .labels."):
        train(tmp_path, [gact], steps=1, label_smoothing_factor=0.1)
    assert not gact.controller.installed


def test_a_model_returning_no_loss_is_refused_clearly(tmp_path):
    """Driven by hand: a plain module that takes no labels and returns only logits."""
    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(32, 32)

        def forward(self, x):
            return {"logits": self.linear(x)}

    model, gact = Logits(), GactCallback()
    gact.on_train_begin(transformers.TrainingArguments(str(tmp_path), report_to=[]), None, None,
                        model=model)
    model(torch.randn(16, 32))
    with pytest.raises(ValueError, match="no loss with gradients"):
        gact.on_step_end(None, None, None)
    assert not gact.controller.installed


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(level="L9"), ValueError, "unknown optimization level"),
    (dict(level="L2", aq_bit=0.3), ValueError, "aq_bit"),
    (dict(level="L1", bit=3), ValueError, "fixed level"),
    (dict(level=build_config("L2"), bit=2), ValueError, "not both"),
    (dict(level=QuantizationConfig(group_size=33)), ValueError, "group_size"),
    (dict(level=2), TypeError, "level name or a QuantizationConfig"),
    (dict(adapt_samples=0), ValueError, "adapt_samples"),
    (dict(adapt_samples=True), ValueError, "adapt_samples"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        GactCallback(**kwargs)


def test_remove_after_a_failed_run_and_training_again(tmp_path):
    class Boom(transformers.TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            raise RuntimeError("boom")

    gact = GactCallback("L2", bit=2)
    with pytest.raises(RuntimeError, match="boom"):
        train(tmp_path, [gact, Boom()], steps=2)
    assert gact.controller.installed  # on_train_end never came
    gact.remove()
    assert not gact.controller.installed
    train(tmp_path, [gact], steps=2)  # and a later train() installs afresh
    assert gact.controller.iteration == 2 and not gact.controller.installed
