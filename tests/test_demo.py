"""benchmark/demo.py shows progress: the header at once, then a bar per epoch with the loss."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "benchmark" / "demo.py"


@pytest.fixture
def demo(monkeypatch):
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # demo.py adds benchmark/ for common.py
    spec.loader.exec_module(module)
    return module


def test_header_is_flushed_before_the_first_run(demo, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "print", lambda *a, **k: calls.append((a, k)), raising=False)

    def first_run(mode, args, data):
        raise KeyboardInterrupt  # the header must already be out
    monkeypatch.setattr(demo, "run", first_run)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--device", "cpu"])
    with pytest.raises(KeyboardInterrupt):
        demo.main()
    (args, kwargs), = calls
    assert args[0].startswith("ResNet on digits") and kwargs.get("flush") is True


def test_each_epoch_shows_a_progress_bar_with_the_running_loss(demo, monkeypatch, capsys):
    images, labels = demo.digits()
    small = demo.resnet
    monkeypatch.setattr(demo, "resnet", lambda: small(widths=(4, 8, 8), blocks=1))
    monkeypatch.setattr(demo, "TRAIN", 64)
    args = argparse.Namespace(bit=1.5, aq_bit=0.5, epochs=2, batch=16, adapt_interval=25)
    result = demo.run("exact", args, (images[:96], labels[:96]))
    err = capsys.readouterr().err
    for epoch in (1, 2):
        assert f"exact     epoch {epoch}/2" in err
    assert "4/4" in err and "loss=" in err
    assert 0 <= result["accuracy"] <= 1 and result["activation_bytes"] > 0
