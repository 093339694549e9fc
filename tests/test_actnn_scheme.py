"""The AQ schemes: per-sample mixed rows, per-layer re-allocation, gradient memory,
unbiased fixed levels, convergence at 1.25 bits, per-model state, swap."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import actnn_aq
from aqcore.format import row_budget
from capture import Capture
import aqcore
from actnn_aq.saved import seed_for


def small_cnn(classes=4):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.SiLU(),
                         nn.Linear(64, 4))


def train_step(model, x, y):
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.item()


def test_mixed_aq_and_plain_rows_in_one_tensor(monkeypatch):
    """Per-sample levels: one CompressedTensor whose rows mix AQ and N-bit; each row
    decompresses to its own level's model of the data."""
    actnn_aq.set_optimization_level("L3", bit=1.5, aq_bit=0.25)
    capture = Capture(monkeypatch)
    conv = actnn_aq.QModule(nn.Conv2d(4, 4, 3, padding=1)).model
    gen = torch.Generator().manual_seed(0)
    rough = torch.randn(4, 4, 32, 32, generator=gen)  # rows long enough for AQ's groups to pay
    smooth = torch.linspace(-1, 1, 4096).repeat(4, 1).view(4, 4, 32, 32) + 0.01 * torch.randn(4, 4, 32, 32, generator=gen)
    x = torch.cat([rough, smooth]).requires_grad_()
    conv(x).sum().backward()
    (x_in, ct), = capture.items
    levels = [str(l) for l in ct.row_levels()]
    assert any(l.startswith("aq") for l in levels) and any(not l.startswith("aq") for l in levels)
    x_hat = aqcore.decompress(ct)
    for row, level in enumerate(ct.row_levels()):
        values, approx = x_in[row].reshape(-1), x_hat[row].reshape(-1)
        if level.is_aq:  # runs of k values share one value, close to their mean
            runs = approx.view(-1, level.avg)
            assert torch.equal(runs, runs[:, :1].expand_as(runs))
            means = values.view(-1, level.avg).mean(1)
            step = (values.max() - values.min()) / 3
            assert (runs[:, 0] - means).abs().max() <= step + 1e-3
        else:  # within one grid step of the value
            step = (values.max() - values.min()) / (2 ** level.bits - 1)
            assert (approx - values).abs().max() <= step * 1.01 + 1e-3
    rough_bits = np.mean([l.bits_per_value for l in ct.row_levels()[:4]])
    smooth_bits = np.mean([l.bits_per_value for l in ct.row_levels()[4:]])
    assert rough_bits > smooth_bits


@pytest.mark.parametrize("make_layer, shape, bit", [
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (6, 3, 8, 8), 2),
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (6, 3, 8, 8), 1),
    (lambda: nn.Linear(20, 5), (6, 4, 20), 4),
])
def test_fixed_levels_are_unbiased(make_layer, shape, bit):
    """Stochastic rounding: the mean weight gradient over rounding seeds -> the exact one."""
    actnn_aq.set_optimization_level("L2", bit=bit)
    torch.manual_seed(0)
    exact = make_layer()
    layer = actnn_aq.QModule(copy.deepcopy(exact)).model
    x = torch.randn(shape).relu()  # zeros kept exactly, the rest rounded
    g = torch.randn_like(exact(x))
    exact(x).backward(g)
    samples = []
    for _ in range(200):
        layer.zero_grad()
        layer(x).backward(g)
        samples.append(layer.weight.grad.clone())
    samples = torch.stack(samples)
    error = samples.mean(0) - exact.weight.grad
    stderr = samples.std(0) / len(samples) ** 0.5
    assert (error.abs() <= 4.5 * stderr + 1e-6).all()
    assert samples.std(0).mean() > 0  # really random


def test_per_layer_reallocation_respects_the_budget_and_differs_by_layer():
    actnn_aq.set_optimization_level("L3", bit=1.5, aq_bit=0.5)
    torch.manual_seed(0)
    model = actnn_aq.QModule(small_cnn())
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 4, (8,))
    assert all(bits is None for bits in model.controller.state().values())
    sizes = {}
    for scheme, module in zip(model.controller.layers, [m for m in model.model if hasattr(m, "aq_scheme")]):
        module.register_forward_pre_hook(lambda m, i, name=scheme.name: sizes.__setitem__(name, i[0].numel()))
    train_step(model, x, y)
    bits = model.controller.state()
    assert all(b is not None for b in bits.values())
    assert len(set(bits.values())) > 1
    ladder = model.controller.ladder  # shares count metadata and group padding, the target does not
    allowed = sum(8 * row_budget(ladder, n // 8, 256, 1.5) for n in sizes.values())
    assert sum(bits[name].held * sizes[name] / 8 for name in bits) <= allowed
    assert min(b.bits for b in bits.values()) >= 0.5 and max(b.bits for b in bits.values()) <= 8
    assert max(b.held for b in bits.values()) <= 8 * (256 + 16) / 16  # a 16-value row pays a whole 8-bit group


def test_state_reports_code_bits_and_padding_apart():
    """Samples of 64 values: a 1-bit slot is one group of 256 codes (32 bytes) plus its
    metadata, aligned (48 bytes, 6 bits per value held), a 2-bit or AQ slot 80 bytes (10
    bits per value), whatever the codes' own bits."""
    actnn_aq.set_optimization_level("L3", bit=1.5, aq_bit=0.5)
    torch.manual_seed(0)
    model = actnn_aq.QModule(mlp())
    train_step(model, torch.randn(16, 32), torch.randint(0, 4, (16,)))
    state = model.controller.state()
    small = [b for b in state.values() if b.values == 64]
    assert len(small) == 5 and all(b.held >= 6 and b.overhead > b.bits for b in small)
    for b in state.values():
        assert 0.5 <= b.bits <= 8 and b.overhead == b.held - b.bits > 0
        assert f"{b.bits:.3g} bits per value in codes" in str(b) and "padding" in str(b)


def test_training_at_1_25_bits_with_aq_converges_like_exact():
    """A small learnable task: classify noisy class templates."""
    gen = torch.Generator().manual_seed(0)
    templates = torch.randn(4, 3, 32, 32, generator=gen)  # rows of whole groups: bits count
    labels = torch.randint(0, 4, (256,), generator=gen)  # metadata and padding
    data = templates[labels] + torch.randn(256, 3, 32, 32, generator=gen)

    def train(**setting):
        torch.manual_seed(0)
        model = small_cnn()
        if setting:
            actnn_aq.set_optimization_level("L3", **setting)
            model = actnn_aq.QModule(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for epoch in range(5):
            for i in range(0, 256, 32):
                losses.append(train_step(model, data[i:i + 32], labels[i:i + 32]))
                opt.step()
        return np.mean(losses[:4]), np.mean(losses[-4:])

    exact_start, exact_end = train()
    aq_start, aq_end = train(bit=1.25, aq_bit=0.5)
    assert exact_end < 0.6 * exact_start
    assert aq_end < 0.65 * aq_start
    assert aq_end < exact_end + 0.15  # exact ends near 0.77, plain 1 bit everywhere near 0.96


def test_two_models_do_not_interfere():
    torch.manual_seed(0)
    actnn_aq.set_optimization_level("L3", bit=1.25, aq_bit=0.5)
    student = actnn_aq.QModule(small_cnn())
    actnn_aq.set_optimization_level("L3", bit=4)
    other = actnn_aq.QModule(small_cnn())
    teacher = actnn_aq.QModule(small_cnn()).eval()
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 4, (8,))
    for _ in range(2):
        with torch.no_grad():
            soft = teacher(x).softmax(-1)
        student.zero_grad()
        F.cross_entropy(student(x), soft).backward()
    assert student.controller.iteration == 2
    assert other.controller.iteration == 0 and teacher.controller.iteration == 0
    assert all(b is None for b in other.controller.state().values())
    assert all(s.calls == 0 for s in teacher.controller.layers)
    bits_before = student.controller.state()
    train_step(other, x, y)
    assert student.controller.state() == bits_before
    assert {id(s.controller) for s in student.controller.layers} == {id(student.controller)}
    for cls in (actnn_aq.QConv2d, actnn_aq.QBatchNorm2d, actnn_aq.QLinear):
        assert "aq_scheme" not in vars(cls)  # no state on classes


def test_variable_batch_sizes():
    actnn_aq.set_optimization_level("L3", bit=1.5, aq_bit=0.5)
    torch.manual_seed(0)
    model = actnn_aq.QModule(mlp())
    for n in (8, 3, 1, 13):
        x, y = torch.randn(n, 32), torch.randint(0, 4, (n,))
        train_step(model, x, y)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.controller.iteration == 4


def test_transformer_style_blocks_are_allocated():
    """LayerNorm, GELU, SiLU observations take part (their error reaches the linear below)."""
    actnn_aq.set_optimization_level("L3", bit=1.5, aq_bit=0.5)
    torch.manual_seed(0)
    model = actnn_aq.QModule(mlp())
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    train_step(model, x, y)
    bits = model.controller.state()
    assert set(bits) == {"0", "1", "2", "3", "4", "5"} and all(b is not None for b in bits.values())


def test_use_gradient_with_the_indexed_data_loader():
    actnn_aq.set_optimization_level("L3", bit=2, aq_bit=0.5)
    actnn_aq.config.use_gradient = True
    torch.manual_seed(0)
    model = actnn_aq.QModule(mlp())
    dataset = TensorDataset(torch.randn(20, 32), torch.randint(0, 4, (20,)))
    loader = actnn_aq.DataLoader(dataset, batch_size=6, shuffle=True)
    seen = []
    for indices, (x, y) in loader:
        assert torch.equal(x, dataset.tensors[0][indices])
        seen.append(indices)
        model.set_sample_indices(indices)
        train_step(model, x, y)
    assert sorted(torch.cat(seen).tolist()) == list(range(20))
    memory = model.controller.layers[0].sample_grad
    assert torch.isfinite(memory[:20]).all() and (memory[:20] > 0).all()
    with pytest.raises(ValueError, match="set_sample_indices"):
        model(torch.randn(4, 32))  # indices are used once, then cleared
    model.set_sample_indices(torch.arange(3))
    with pytest.raises(ValueError, match="3 indices"):
        model(torch.randn(4, 32))


def test_data_loader_keeps_a_custom_collate():
    loader = actnn_aq.DataLoader(list(range(10)), batch_size=4, collate_fn=lambda items: sum(items))
    assert [(i.tolist(), s) for i, s in loader] == [([0, 1, 2, 3], 6), ([4, 5, 6, 7], 22), ([8, 9], 17)]
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(ValueError, match="map-style"):
        actnn_aq.DataLoader(Stream())


def test_seeds_differ_by_iteration_layer_and_rank(monkeypatch):
    seeds = {seed_for(i, layer, rank) for i in range(20) for layer in range(10) for rank in range(4)}
    assert len(seeds) == 800
    capture = Capture(monkeypatch)
    actnn_aq.set_optimization_level("L2", bit=2)
    conv = actnn_aq.QModule(nn.Conv2d(3, 4, 3)).model
    x = torch.randn(2, 3, 8, 8)
    conv(x).sum().backward()
    conv(x).sum().backward()
    (_, first), (_, second) = capture.items
    assert first.seed != second.seed and not torch.equal(first.payload, second.payload)


def test_swap_levels_on_cpu_keep_the_results():
    torch.manual_seed(0)
    base = small_cnn()
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 4, (4,))
    grads = {}
    for level in ("L3", "L4", "L5", "swap", "L0"):
        actnn_aq.set_optimization_level(level)
        model = actnn_aq.QModule(copy.deepcopy(base))
        train_step(model, x, y)
        grads[level] = [p.grad for p in model.parameters()]
    for a, b, c in zip(grads["L3"], grads["L4"], grads["L5"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b in zip(grads["swap"], grads["L0"]):
        assert torch.equal(a, b)


def test_l5_turns_on_expandable_segments(monkeypatch):
    settings = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", settings.append)
    actnn_aq.set_optimization_level("L4")
    actnn_aq.QModule(nn.Linear(4, 4))
    assert settings == []
    actnn_aq.set_optimization_level("L5")
    actnn_aq.QModule(nn.Linear(4, 4))
    assert settings == ["expandable_segments:True"]


@pytest.mark.cuda
def test_swap_holds_payloads_in_cpu_memory():
    actnn_aq.set_optimization_level("L4", bit=2)
    conv = actnn_aq.QModule(nn.Conv2d(3, 4, 3).cuda()).model
    y = conv(torch.randn(4, 3, 8, 8, device="cuda"))
    payload = y.grad_fn.saved_tensors[0]  # the compressed input's first tensor (saved.save)
    assert payload.dtype == torch.uint8 and payload.device.type == "cpu" and payload.is_pinned()
    y.sum().backward()
    assert conv.weight.grad.device.type == "cuda"


def test_state_stays_bounded_over_iterations():
    actnn_aq.set_optimization_level("L3", bit=1.5, aq_bit=0.5)
    model = actnn_aq.QModule(mlp())
    x, y = torch.randn(8, 32), torch.randint(0, 4, (8,))
    for _ in range(20):
        train_step(model, x, y)
        model(x)  # a forward without backward leaves nothing behind either
    assert all(not s.observed for s in model.controller.layers)
    assert model.controller.iteration == 20


def test_per_layer_off_keeps_every_layer_at_the_target(monkeypatch):
    actnn_aq.set_optimization_level("L3", bit=1.5, aq_bit=0.5)
    actnn_aq.config.per_layer = False
    capture = Capture(monkeypatch)
    model = actnn_aq.QModule(mlp())
    x, y = torch.randn(8, 32), torch.randint(0, 4, (8,))
    for _ in range(2):
        train_step(model, x, y)
    assert all(bits is None for bits in model.controller.state().values())
    for _, ct in capture.items:  # each layer holds the target's bytes, no more
        assert ct.payload.numel() <= -(-ct.rows * row_budget(ct.levels, ct.row_numel, 256, 1.5) // 16) * 16


def test_controller_state_dict_resumes_training_identically():
    """A checkpoint of the controller (shares, statistics, level factors, call counts, guard)
    makes a resumed model take the same next step as the uninterrupted one."""
    torch.manual_seed(0)
    actnn_aq.set_optimization_level("L3", bit=1.25, aq_bit=0.5)
    x, y = torch.randn(8, 32), torch.randint(0, 4, (8,))
    model = actnn_aq.QModule(mlp())
    for _ in range(12):  # past a re-allocation
        train_step(model, x, y)
    state = copy.deepcopy(model.controller.state_dict())
    twin = actnn_aq.QModule(copy.deepcopy(model.model))
    twin.controller.load_state_dict(state)
    assert model.controller.state() == twin.controller.state()
    for m in (model, twin):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters()))
    other = actnn_aq.QModule(nn.Sequential(nn.Linear(32, 4)))
    with pytest.raises(ValueError, match="another model"):
        other.controller.load_state_dict(state)
