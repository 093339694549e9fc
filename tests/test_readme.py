"""The README's examples run as written (the names they leave to the reader supplied)."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import gact_aq
from gact_aq.controller import Controller

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(heading: str) -> str:
    """The first ```python block after the README heading that starts with `heading`."""
    text = README.read_text()
    section = text[text.index(f"\n## {heading}"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def default_gact_config():
    gact_aq.set_optimization_level("L2")
    yield
    gact_aq.set_optimization_level("L2")


def test_gact_example_adapts_with_its_own_small_backprop_batch(default_gact_config):
    """backprop() runs x[:8]: there every activation is below config.min_numel, while the
    training batch compresses them. Tensor ids do not depend on sizes, so the adaptation
    measures and allocates them all, and training stores the allocated levels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    loader = [(torch.randn(64, 32), torch.randint(0, 10, (64,))) for _ in range(3)]
    assert 8 * 64 < gact_aq.config.min_numel <= 64 * 64
    names = dict(model=model, loader=loader, criterion=nn.functional.cross_entropy,
                 optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    exec(snippet("gact_aq"), names)
    controller = names["controller"]
    assert controller.iteration == 3 and controller.extra_passes >= 1
    # stored: the GELU's input and the ReLU's output; the GELU's output is recomputed
    assert len(controller.levels) == 2 and len(controller.sensitivity) == 2
    sizes = [64 * 64] * 2
    spent = sum(level.bits_per_value * n for level, n in zip(controller.levels, sizes))
    assert spent <= 1.25 * (sum(sizes) + 64 * 64) and {l.name for l in controller.levels} != {"32"}
    with controller:
        loss = nn.functional.cross_entropy(model(loader[0][0]), loader[0][1])
        stored = {r.tid: r.level for r in controller.report().rows if r.tid is not None}
        loss.backward()
    assert stored == {tid: level.name for tid, level in enumerate(controller.levels)}


def test_tiny_activations_get_ids_and_stay_exact(default_gact_config):
    """Only a backprop() that saves no float activation at all has nothing to compress."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    x = torch.randn(2, 4)
    gact_aq.set_optimization_level("L2.2", bit=1.25, aq_bit=0.5)
    with Controller(model) as ctl:
        ctl.iterate(lambda: model(x).sum().backward())
        assert len(ctl.levels) == 1  # the GELU's input, 8 values (its output is recomputed)
        out = model(x).sum()
        assert {r.level for r in ctl.report().rows} == {"32"}  # under min_numel: exact
        out.backward()


def test_aqcore_example_runs_and_its_allocation_fits_the_budget(capsys):
    names = {}
    exec(snippet("aqcore"), names)
    x, x_hat, ct = names["x"], names["x_hat"], names["ct"]
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    assert 55 < x.nbytes / ct.nbytes < 65
    choice, levels = names["choice"], names["levels"]
    spent = sum(levels[i].bits_per_value * n for i, n in zip(choice, names["sizes"]))
    assert len(choice) == 3 and spent <= names["budget"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == str([levels[i].name for i in choice])
