"""gact_aq: configuration, hooks, what is compressed, memory bookkeeping (CPU)."""
import gc
import json

import pytest
import torch
from torch import nn

import aqcore
import gact_aq
from gact_aq import settings
from gact_aq.controller import Controller
from gact_aq.packing import Unit
from test_gact_models import backprop_fn, cnn_problem, encoder_problem, grads

GACT_LEVELS = ["L0", "L1", "L1.1", "L1.2", "L2", "L2.1", "L2.2", "L3", "swap", "L4bit-swap"]
AQ_RELEASE_LEVELS = ["L2.2_", "L2.2_GN", "L2.2_GN_AQ0.5", "L2.2_GN_AQ0.5_1.5b", "L2.2_GN_AQ0.5_1.0b"]


def live(kind):
    return [o for o in gc.get_objects() if type(o) is kind]


def held_bytes():
    """Bytes of every compressed tensor alive in the process, each storage counted once."""
    storages = {}
    for ct in live(aqcore.CompressedTensor):
        for t in (ct.payload, ct.meta):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


# ---------------------------------------------------------------------- levels and config

@pytest.mark.parametrize("level", GACT_LEVELS + AQ_RELEASE_LEVELS)
def test_every_published_level_sets_a_valid_config(level):
    cfg = gact_aq.set_optimization_level(level)
    assert cfg is gact_aq.config
    assert cfg == settings.build_config(level)


def test_levels_set_what_their_names_say():
    expected = {"L0": dict(compress=False), "L1": dict(bit=4, auto_prec=False),
                "L1.1": dict(bit=8, auto_prec=False), "L1.2": dict(bit=2, auto_prec=False),
                "L2.1": dict(bit=3, auto_prec=True), "L3": dict(bit=4, swap=True),
                "swap": dict(compress=False, swap=True),
                "L2.2_GN_AQ0.5_1.5b": dict(bit=1.5, aq_bit=0.5, auto_prec=True),
                "L2.2_GN_AQ0.5_1.0b": dict(bit=1.0, aq_bit=0.5, auto_prec=True)}
    for level, fields in expected.items():
        cfg = settings.build_config(level)
        assert {k: getattr(cfg, k) for k in fields} == fields, level


def test_every_call_starts_from_the_defaults():
    gact_aq.set_optimization_level("L2.2", bit=1.5, aq_bit=0.5)
    gact_aq.set_adapt_interval(7)
    gact_aq.config.sensitivity = "probe"
    cfg = gact_aq.set_optimization_level("L1")
    assert (cfg.bit, cfg.aq_bit, cfg.auto_prec, cfg.adapt_interval, cfg.sensitivity) == \
        (4, 0, False, settings.QuantizationConfig.adapt_interval, "propagate")


def test_bit_and_aq_bit_arguments_override_every_level():
    cfg = gact_aq.set_optimization_level("L2.2_GN_AQ0.5_1.0b", bit=1.25, aq_bit=0.25)
    assert (cfg.bit, cfg.aq_bit) == (1.25, 0.25)
    assert settings.ladder(cfg)[-4:] == (aqcore.aq_level(0.25), *map(aqcore.parse_level, ["aq1z", "aq0.5z", "aq0.25z"]))
    cfg = gact_aq.set_optimization_level("L1.2", bit=0.5, aq_bit=0.5)
    assert settings.fixed_level(cfg) == aqcore.aq_level(0.5)


@pytest.mark.parametrize("call, message", [
    (lambda: gact_aq.set_optimization_level("L9"), "L2.2_GN_AQ0.5_1.0b"),
    (lambda: gact_aq.set_optimization_level("L2", aq_bit=0.3), "aq_bit"),
    (lambda: gact_aq.set_optimization_level("L2", bit=0.5), "aq_bit"),
    (lambda: gact_aq.set_optimization_level("L2", bit=-1), "bit"),
    (lambda: gact_aq.set_optimization_level("L1", bit=3), "fixed level"),
    (lambda: gact_aq.set_adapt_interval(0), "adapt interval"),
])
def test_bad_settings_raise_clear_errors(call, message):
    before = settings.QuantizationConfig(**vars(gact_aq.config))
    with pytest.raises(ValueError, match=message):
        call()
    assert gact_aq.config == before


def test_a_controller_keeps_the_config_it_was_built_with():
    model, x, y = cnn_problem()
    gact_aq.set_optimization_level("L1.2")
    ctl = Controller(model)
    gact_aq.set_optimization_level("L1.1")
    with ctl:
        loss = nn.functional.cross_entropy(model(x), y)
        assert {r.level for r in ctl.report().rows} == {"2"}
        loss.backward()


# ---------------------------------------------------------------------- hooks

def test_L0_is_identical_to_exact_training():
    for model, x, y in (cnn_problem(), encoder_problem()):
        backprop = backprop_fn(model, x, y)
        torch.manual_seed(1)
        backprop()
        exact = grads(model)
        gact_aq.set_optimization_level("L0")
        with Controller(model) as ctl:
            torch.manual_seed(1)
            backprop()
            ctl.iterate(backprop)
            assert not ctl.report().rows
        assert all(torch.equal(a, b) for a, b in zip(exact, grads(model)))


def test_hooks_are_removed_when_the_body_raises():
    model, x, y = cnn_problem()
    gact_aq.set_optimization_level("L1.2")
    ctl = Controller(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ctl:
            model(x)
            raise RuntimeError("boom")
    assert not ctl.installed
    out = model(x)
    assert not ctl.report().rows and not live(Unit)
    out.sum().backward()
    ctl.install_hook()
    with pytest.raises(RuntimeError, match="already installed"):
        ctl.install_hook()
    ctl.uninstall_hook()
    ctl.uninstall_hook()  # a second uninstall is a no-op, never pops someone else's hooks


def test_retain_graph_and_a_second_unpack_reuse_the_compressed_tensors():
    model, x, y = cnn_problem()
    gact_aq.set_optimization_level("L1.2")
    with Controller(model):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)
        first = grads(model)
        loss.backward()
    assert all(torch.allclose(2 * a, b, rtol=1e-5, atol=1e-7) for a, b in zip(first, grads(model)))
    assert not live(Unit)


def test_a_tensor_saved_by_several_ops_is_compressed_once_and_freed_after_backward():
    lin = nn.Linear(64, 64)
    x = torch.randn(32, 64)
    gact_aq.set_optimization_level("L1.2")
    with Controller(lin) as ctl:
        h = lin(x)                              # h is saved by sin, by cos, and (as a view) by mm
        out = h.sin() + h.cos() + (h.view(32, 8, 8) @ torch.ones(8, 8, requires_grad=True)).reshape(32, 64)
        rows = ctl.report().rows
        assert [r.shape for r in rows] == [(32, 64)]
        out.sum().backward()
    assert not live(Unit) and not live(aqcore.CompressedTensor)


@pytest.mark.parametrize("level", ["L1", "L1.2", "swap"])
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.Sigmoid])
def test_a_forward_without_backward_leaves_nothing_alive(level, act):
    """Tanh, ReLU and Sigmoid save their own output; held as it is (a tiny tensor, level 32,
    swap) it pointed back at the node holding it, a cycle the garbage collector cannot see
    through autograd's nodes, so an evaluation forward with grad on leaked its graph."""
    import weakref

    model = nn.Sequential(nn.Linear(16, 16), act())
    gact_aq.set_optimization_level(level)
    with Controller(model):
        out = model(torch.randn(4, 16, requires_grad=True))
    alive = weakref.ref(out)
    del out
    gc.collect()
    assert alive() is None and not live(Unit)


def test_what_is_kept_as_is():
    """Parameters, views of them, leaves, integer, tiny and 1-D tensors are not compressed;
    SDPA's logsumexp (no grad) stays exact and its output is not held at all (recomputed
    in backward); a tiny activation has a tensor id but is held as it is."""
    emb, lin = nn.Embedding(100, 64), nn.Linear(64, 64)
    tokens = torch.randint(0, 100, (4, 64))
    leaf = torch.randn(4, 64, 64, requires_grad=True)
    gact_aq.set_optimization_level("L1.2")
    with Controller(nn.ModuleList([emb, lin])) as ctl:
        h = lin(emb(tokens))                                   # weights, indices
        q = h.view(4, 1, 64, 64)
        out = nn.functional.scaled_dot_product_attention(q, q, q)  # logsumexp (4, 1, 64)
        small = (torch.randn(8, 8, requires_grad=True) * 2).exp()  # tiny
        flat = (torch.randn(4096, requires_grad=True) * 2).exp()   # 1-D
        total = out.sum() + (leaf * leaf).sum() + small.sum() + flat.sum()
        rows = ctl.report().rows
        total.backward()
    assert sorted(r.shape for r in rows if r.level != "32") == [(4, 1, 64, 64), (256, 64)]  # q=k=v, linear in
    assert [(r.shape, r.level) for r in rows if r.level == "32"] == [((8, 8), "32")]
    assert leaf.grad is not None


def test_dropout_masks_are_packed_losslessly_at_one_bit():
    x = torch.randn(64, 256, requires_grad=True)
    gact_aq.set_optimization_level("L1", bit=32)  # floats kept as is: only masks change
    for dropout in (lambda t: nn.functional.dropout(t, 0.3),           # float mask (CPU)
                    lambda t: torch.native_dropout(t, 0.3, True)[0]):  # bool mask (as on CUDA)
        h = x * 2
        torch.manual_seed(0)
        dropout(h).square().sum().backward()
        exact, x.grad = x.grad, None
        with Controller(nn.Linear(1, 1)) as ctl:
            h = x * 2
            torch.manual_seed(0)
            out = dropout(h).square().sum()
            masks = [r for r in ctl.report().rows if r.level == "mask"]
            out.backward()
        assert [m.nbytes for m in masks] == [64 * 256 // 8]
        assert torch.equal(x.grad, exact)
        x.grad = None


def test_autocast_weight_copies_are_not_compressed():
    model = nn.Sequential(nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 96))
    x = torch.randn(64, 96)
    gact_aq.set_optimization_level("L1.2")
    with Controller(model) as ctl, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        rows = ctl.report().rows
    out.float().sum().backward()
    assert rows and all(r.shape == (64, 96) and r.dtype == torch.bfloat16 for r in rows)


# ---------------------------------------------------------------------- state and memory

def test_report_sums_to_the_bytes_actually_held():
    model, x, y = encoder_problem()
    gact_aq.set_optimization_level("L2.2", bit=1.5, aq_bit=0.5)
    with Controller(model) as ctl:
        backprop = backprop_fn(model, x, y)
        backprop()
        ctl.iterate(backprop)
        loss = nn.functional.cross_entropy(model(x), y)
        report = ctl.report()
        assert report.nbytes == held_bytes() > 0
        assert report.exact_nbytes > 4 * report.nbytes
        assert {r.level for r in report.rows} >= {"mask"}
        assert "total:" in str(report) and len(str(report).splitlines()) == len(report.rows) + 3
        loss.backward()
        assert ctl.report().nbytes == held_bytes() == 0


def test_report_says_plainly_when_nothing_is_held_or_measured():
    model, x, y = cnn_problem()
    backprop = backprop_fn(model, x, y)
    gact_aq.set_optimization_level("L2.2", bit=1.5, aq_bit=0.5)
    with Controller(model) as ctl:
        assert str(ctl.report()).startswith("nothing held")  # before any forward
        loss = nn.functional.cross_entropy(model(x), y)
        text = str(ctl.report())
        assert "nan" not in text and "total:" in text
        floats = [r for r in ctl.report().rows if r.tid is not None]
        assert floats and all(r.sensitivity is None for r in floats)
        assert text.count("not measured") == len(floats)  # before the first adaptation
        loss.backward()
        assert str(ctl.report()).startswith("nothing held")  # backward freed everything
        ctl.iterate(backprop)
        model(x).sum()
        rows = ctl.report().rows
        assert all(r.sensitivity is not None for r in rows if r.tid is not None)
        assert all(r.sensitivity is None for r in rows if r.tid is None)  # masks
        assert "not measured" not in str(ctl.report()) and "nan" not in str(ctl.report())


def test_state_dict_round_trip_reproduces_the_next_step():
    model, x, y = cnn_problem()
    backprop = backprop_fn(model, x, y)
    gact_aq.set_optimization_level("L2.2", bit=1.5, aq_bit=0.5)
    with Controller(model) as ctl:
        backprop()
        ctl.iterate(backprop)
        state = json.loads(json.dumps(ctl.state_dict()))
        backprop()
        expected = grads(model)
    restored = Controller(model)
    restored.load_state_dict(state)
    assert restored.levels == ctl.levels and restored.iteration == 1
    assert restored.sensitivity.tolist() == ctl.sensitivity.tolist()
    with restored:
        backprop()
    assert all(torch.equal(a, b) for a, b in zip(expected, grads(model)))
    with pytest.raises(ValueError, match="one entry per tensor"):
        restored.load_state_dict({**state, "shapes": state["shapes"][:-1]})


def test_no_growth_of_held_tensors_over_200_iterations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * 8 * 8, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    backprop = backprop_fn(model, x, y)
    gact_aq.set_optimization_level("L2.2", bit=1.5, aq_bit=0.5)
    gact_aq.set_adapt_interval(50)
    counts = []
    with Controller(model) as ctl:
        for step in range(200):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            ctl.iterate(backprop)
            if step % 50 == 49:
                gc.collect()
                counts.append((len(live(Unit)), len(live(aqcore.CompressedTensor)),
                               len(ctl.packer.units), len(ctl.packer.seen), len(gc.get_objects())))
    assert all(c[:4] == (0, 0, 0, 0) for c in counts)
    assert counts[-1][4] - counts[0][4] < 500


def test_two_controllers_do_not_interfere():
    (a, xa, ya), (b, xb, yb) = cnn_problem(seed=1), cnn_problem(seed=2)
    ctl_a = Controller(a, settings.build_config("L2.2", bit=1.5, aq_bit=0.5))
    ctl_b = Controller(b, settings.build_config("L1.1"))
    with ctl_a:
        backprop_fn(a, xa, ya)()
        ctl_a.iterate(backprop_fn(a, xa, ya))
    levels_a = list(ctl_a.levels)
    with ctl_b:
        out = b(xb)
        assert {r.level for r in ctl_b.report().rows} == {"8"}
        out.sum().backward()
        ctl_b.iterate()
    assert ctl_a.levels == levels_a and ctl_a.iteration == 1 and ctl_b.iteration == 1


def test_other_batch_sizes_keep_their_levels_other_shapes_get_the_start_level():
    model, x, y = cnn_problem()
    gact_aq.set_optimization_level("L2.2", bit=1.5, aq_bit=0.5)
    with Controller(model) as ctl:
        backprop_fn(model, x, y)()
        ctl.iterate(backprop_fn(model, x, y))
        allocated = [level.name for level in ctl.levels]
        for inputs, same_shapes in ((torch.cat([x, x[:4]]), True), (x[:, :, :8], False)):
            loss = model(inputs).sum()
            rows = ctl.report().rows
            zeros = [r.kind == "zeros" for r in rows]
            start = ["aq0.5z" if z else "1" for z in zeros]  # ReLU outputs keep their zeros
            expected = allocated if same_shapes else start[:-1] + allocated[-1:]
            assert [r.level for r in rows] == expected
            loss.backward()
    assert settings.start_level(ctl.config).name == "1" and len(set(allocated)) > 1
    assert settings.start_level(ctl.config, zeros=True).name == "aq0.5z" and any(zeros)


def test_swap_keeps_gradients_and_marks_tensors_as_host_held():
    model, x, y = cnn_problem()
    backprop = backprop_fn(model, x, y)
    results = []
    for level in ("L1", "L4bit-swap"):
        gact_aq.set_optimization_level(level)
        with Controller(model) as ctl:
            loss = nn.functional.cross_entropy(model(x), y)
            swapped = {r.swapped for r in ctl.report().rows}
            model.zero_grad()
            loss.backward()
        results.append((swapped, grads(model)))
    assert results[0][0] == {False} and results[1][0] == {True}
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    gact_aq.set_optimization_level("swap")  # no compression: exact gradients, host-held
    with Controller(model) as ctl:
        backprop()
    assert all(torch.equal(a, b) for a, b in zip(grads(model), _exact(backprop, model)))


def _exact(backprop, model):
    backprop()
    return grads(model)


def test_non_finite_activations_give_non_finite_gradients_where_exact_does():
    """Without the guard (fp16 with a GradScaler, which must see overflowing steps) the
    gradients are non-finite where exact training's are; with it (the default) the step's
    gradients are zeroed, so the optimizer step changes nothing, and iterate() says so."""
    model, x, y = cnn_problem()
    x = x.clone()
    x[3, 0, 5, 5] = float("inf")
    backprop = backprop_fn(model, x, y)
    exact = [torch.isfinite(g).all().item() for g in _exact(backprop, model)]
    gact_aq.set_optimization_level("L1.2")
    gact_aq.config.guard = False
    with Controller(model):
        backprop()
    assert [torch.isfinite(g).all().item() for g in grads(model)] == exact
    assert not all(exact)
    gact_aq.set_optimization_level("L1.2")
    with Controller(model) as ctl:
        backprop()
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads(model))
        with pytest.warns(UserWarning, match="gradients were zeroed"):
            ctl.iterate()
    assert ctl.floor == 4 and ctl.guard_events[0]["iteration"] == 0


def test_iterate_needs_backprop_and_something_to_compress():
    model, x, y = cnn_problem()
    gact_aq.set_optimization_level("L2.2")
    with Controller(model) as ctl:
        with pytest.raises(ValueError, match="backprop"):
            ctl.iterate()
    tiny = nn.Linear(4, 4)
    with Controller(tiny) as ctl:
        with pytest.raises(ValueError, match="nothing to compress"):
            ctl.iterate(lambda: tiny(torch.randn(2, 4)).sum().backward())


def test_aq_averages_neighbouring_positions_in_channels_last_too():
    """A channels-last activation at an AQ level is averaged over neighbouring positions of
    each channel (its logical order), like the same activation in NCHW: the gradients of
    the two layouts agree; averaged in memory order, runs would mix neighbouring channels."""
    model, x, y = cnn_problem()
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = model.to(memory_format=layout)
        gact_aq.set_optimization_level("L1.2", bit=0.5, aq_bit=0.5)
        with Controller(model):
            backprop_fn(model, x.contiguous(memory_format=layout), y)()
        results.append(torch.cat([g.flatten() for g in grads(model)]))
    exact = torch.cat([g.flatten() for g in _exact(backprop_fn(model, x, y), model)])
    assert torch.allclose(results[0], results[1], rtol=1e-3, atol=1e-4 * exact.abs().max())
    assert (results[0] - exact).norm() > 0.01 * exact.norm()  # AQ really averaged


def test_cheap_functions_of_saved_tensors_are_recomputed_not_stored():
    """A LayerNorm output saved by the next linear layer, a GELU output saved by the one
    after it and a SwiGLU product are recomputed from what their producers store: not held,
    and at 32 bits the gradients are the exact ones; the bits they would have taken go to
    the stored tensors (the target counts every saved value)."""
    torch.manual_seed(0)
    norm, up, gate, down = nn.LayerNorm(64), nn.Linear(64, 128), nn.Linear(64, 128), nn.Linear(128, 64)
    model = nn.ModuleList([norm, up, gate, down])
    x = torch.randn(8, 32, 64, requires_grad=True)

    def forward():
        h = norm(x * 2)
        return down(nn.functional.gelu(up(h)) * nn.functional.silu(gate(h)))

    def backprop():
        model.zero_grad()
        forward().square().sum().backward()

    exact = [g.clone() for g in _exact(backprop, model)]
    gact_aq.set_optimization_level("L1", bit=32)
    with Controller(model) as ctl:
        model.zero_grad()
        out = forward()
        shapes = sorted(r.shape for r in ctl.report().rows)
        out.square().sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(grads(model), exact))
    # stored: the LayerNorm input, up's and gate's outputs (GELU / SiLU inputs); recomputed:
    # the LayerNorm output (up / gate inputs), GELU and SiLU outputs, their product (down's input)
    assert shapes == [(8, 32, 64), (8, 32, 128), (8, 32, 128)]
    gact_aq.set_optimization_level("L2.2", bit=2)
    with Controller(model) as ctl:
        backprop()
        ctl.iterate(backprop)
        out = forward()
        held = ctl.report().nbytes
        out.square().sum().backward()
    every_saved_value = 8 * 32 * (64 + 64 + 128 * 5)
    assert 1.8 * every_saved_value / 8 < held <= 2.2 * every_saved_value / 8  # codes + metadata


def test_repeated_alarms_lift_relu_outputs_through_plain_levels_up_to_exact():
    """Each alarm bars the lowest precision in use; once the zero-keeping AQ levels are
    barred, a ReLU output moves to a plain level (those keep zeros too), and on to exact."""
    model, x, y = cnn_problem()
    poisoned = x.clone()
    poisoned[3, 0, 5, 5] = float("inf")
    gact_aq.set_optimization_level("L2.2", bit=1.25, aq_bit=0.5)
    with Controller(model) as ctl:
        ctl.iterate(backprop_fn(model, x, y))
        floors = [ctl.floor]
        while floors[-1] < 32 and len(floors) < 8:
            backprop_fn(model, poisoned, y)()
            with pytest.warns(UserWarning, match="gradients were zeroed"):
                ctl.iterate(backprop_fn(model, x, y))
            floors.append(ctl.floor)
        assert floors[-1] == 32 and all(a < b for a, b in zip(floors, floors[1:]))
        loss = nn.functional.cross_entropy(model(x), y)  # its graph holds the units
        assert {r.level for r in ctl.report().rows} == {"32"}
        loss.backward()
