"""benchmark/vision/train.py and mem_speed.py end to end on the CPU, at toy size: the JSON
they write, resuming from a checkpoint (exactly where the run stopped, framework state
included), CIFAR-10 binary batches, and clear errors for bad arguments."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark" / "vision"))

import mem_speed  # noqa: E402
import train as vision_train  # noqa: E402

TINY = ["--model", "small", "--train-size", "64", "--test-size", "32", "--image-size", "16",
        "--batch", "16"]
COMPRESSED = {"gact": ["--alg", "gact-L2.2", "--bit", "1.25", "--aq-bit", "0.5"],
              "actnn": ["--alg", "actnn-L3", "--bit", "1.25", "--aq-bit", "0.5"]}
EPOCH_FIELDS = {"epoch", "train_loss", "test_loss", "test_accuracy", "activation_mib", "peak_mib",
                "images_per_s", "train_s", "lr"}


def train(tmp_path: Path, *argv: str) -> dict:
    log = vision_train.main([*TINY, "--out", str(tmp_path / "log.json"), *argv])
    assert json.loads((tmp_path / "log.json").read_text()) == json.loads(json.dumps(log))
    return log


def test_train_logs_accuracy_memory_and_throughput_per_epoch(tmp_path):
    log = train(tmp_path, *COMPRESSED["gact"], "--epochs", "2")
    assert {"command", "device", "torch", "date", "model", "alg", "data"} <= set(log)
    assert log["command"].startswith("python benchmark/vision/train.py --model small")
    assert log["device"] == "cpu" and log["alg"] == "gact-L2.2" and log["bit"] == 1.25
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    for epoch in log["epochs"]:
        assert set(epoch) == EPOCH_FIELDS
        assert 0 <= epoch["test_accuracy"] <= 1
        assert epoch["activation_mib"] > 0 and epoch["images_per_s"] > 0
        assert epoch["peak_mib"] is None  # CUDA only
    exact = train(tmp_path, "--epochs", "1")
    assert exact["epochs"][0]["activation_mib"] > 4 * log["epochs"][0]["activation_mib"]


def test_resume_runs_only_the_epochs_left(tmp_path, capsys):
    checkpoint = str(tmp_path / "run.pt")
    train(tmp_path, *COMPRESSED["gact"], "--epochs", "1", "--checkpoint", checkpoint)
    capsys.readouterr()
    log = train(tmp_path, *COMPRESSED["gact"], "--epochs", "2", "--checkpoint", checkpoint, "--resume")
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "epoch 1/" not in printed
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    assert log["resumed_at_epoch"] == [1] and len(log["earlier_commands"]) == 1
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("framework", ["gact", "actnn"])
def test_interrupted_and_resumed_run_repeats_the_uninterrupted_one(tmp_path, monkeypatch, framework):
    """Bit for bit: weights, optimizer, schedule and the framework's levels, sensitivities,
    statistics and iteration all survive (without the framework state the losses differ).
    Memory is not measured here: the CPU profiler takes seconds per compressed step."""
    monkeypatch.setattr(vision_train, "allocated_during", lambda forward, device: (0, forward()))
    argv = [*COMPRESSED[framework], "--epochs", "2"]
    whole = train(tmp_path, *argv)
    checkpoint = str(tmp_path / "run.pt")
    save = vision_train.save_checkpoint

    def save_and_stop(path, state):
        save(path, state)
        raise KeyboardInterrupt
    monkeypatch.setattr(vision_train, "save_checkpoint", save_and_stop)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, *argv, "--checkpoint", checkpoint)
    monkeypatch.setattr(vision_train, "save_checkpoint", save)
    resumed = train(tmp_path, *argv, "--checkpoint", checkpoint, "--resume")
    for key in ("train_loss", "test_loss", "test_accuracy", "lr"):
        assert [e[key] for e in resumed["epochs"]] == [e[key] for e in whole["epochs"]], key


def test_resume_refuses_a_checkpoint_of_another_setup(tmp_path, capsys):
    checkpoint = str(tmp_path / "run.pt")
    train(tmp_path, "--epochs", "1", "--checkpoint", checkpoint)
    with pytest.raises(SystemExit):
        train(tmp_path, "--epochs", "2", "--lr", "0.1", "--checkpoint", checkpoint, "--resume")
    assert "--lr 0.05 (checkpoint) vs 0.1" in capsys.readouterr().err


def cifar_records(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    records = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
    records[:, 0] = np.arange(n) % 10
    return records


def test_cifar10_binary_batches_are_read(tmp_path):
    batches = [cifar_records(24, 0), cifar_records(24, 1)]
    for i, records in enumerate(batches, 1):
        records.tofile(tmp_path / f"data_batch_{i}.bin")
    test = cifar_records(20, 2)
    test.tofile(tmp_path / "test_batch.bin")
    args = vision_train.parser().parse_args(["--data", str(tmp_path)])
    data = vision_train.load_data(args, torch.device("cpu"))
    train_raw = np.concatenate(batches)
    images = torch.from_numpy(train_raw[:, 1:]).float().div(255).view(-1, 3, 32, 32)
    mean, std = images.mean((0, 2, 3), keepdim=True), images.std((0, 2, 3), keepdim=True)
    assert data.train_x.shape == (48, 3, 32, 32) and data.image_size == 32 and data.classes == 10
    torch.testing.assert_close(data.train_x, (images - mean) / std)
    torch.testing.assert_close(data.test_x * std + mean,
                               torch.from_numpy(test[:, 1:]).float().div(255).view(-1, 3, 32, 32))
    assert data.train_y.tolist() == train_raw[:, 0].tolist()
    assert data.test_y.tolist() == test[:, 0].tolist()
    log = vision_train.main(["--data", str(tmp_path), "--batch", "16", "--epochs", "1",
                             "--out", str(tmp_path / "log.json")])
    assert log["data"].startswith("CIFAR-10 binary")
    assert (log["train_size"], log["test_size"]) == (48, 20)


@pytest.mark.parametrize("script", [vision_train, mem_speed])
def test_a_bad_alg_names_the_valid_forms(script, capsys):
    with pytest.raises(SystemExit) as exit:
        script.main(["--model", "small", "--alg", "gact-L9"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "unknown algorithm 'gact-L9'" in err and "exact, checkpoint, actnn-LEVEL" in err
    assert "L2.2" in err and "L3-aq0.5-1.25b" in err
    with pytest.raises(ValueError, match="valid: exact, checkpoint"):
        vision_train.Algorithm("actnn")


def test_bits_a_level_refuses_are_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        vision_train.main([*TINY, "--alg", "gact-L1", "--bit", "1.25"])
    assert "--alg gact-L1: a fixed level needs bit in" in capsys.readouterr().err


@pytest.mark.skipif(vision_train.importlib.util.find_spec("torchvision") is not None,
                    reason="torchvision is installed")
def test_torchvision_models_without_torchvision_point_to_small(capsys):
    with pytest.raises(SystemExit):
        vision_train.main([*TINY, "--model", "resnet50"])
    assert "--model small is the built-in ResNet" in capsys.readouterr().err


def test_crop_and_flip_moves_pixels_only():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    out = vision_train.crop_and_flip(x, torch.Generator().manual_seed(0), pad=0)
    for sample, image in zip(out, x):
        assert torch.equal(sample, image) or torch.equal(sample, image.flip(-1))
    padded = vision_train.crop_and_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert padded.shape == x.shape and set(padded.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def measure(tmp_path: Path, *argv: str) -> dict:
    report = mem_speed.main(["--model", "small", "--resolution", "16", "--steps", "2", "--warmup", "1",
                             "--out", str(tmp_path / "mem.json"), *argv])
    assert json.loads((tmp_path / "mem.json").read_text()) == json.loads(json.dumps(report))
    return report


def test_mem_speed_measures_every_algorithm(tmp_path):
    report = measure(tmp_path, "--batch", "16", "--alg", "exact", "checkpoint", "gact-L2.2", "actnn-L3",
                     "--bit", "1.25", "--aq-bit", "0.5")
    assert {"command", "device", "torch", "date", "model", "batch", "resolution"} <= set(report)
    rows = {r["alg"]: r for r in report["records"]}
    assert list(rows) == ["exact", "checkpoint", "gact-L2.2", "actnn-L3"]
    assert rows["exact"]["bit"] is None and rows["gact-L2.2"]["bit"] == 1.25
    assert rows["exact"]["step_vs_exact"] == 1 and rows["exact"]["peak_mib"] is None
    for row in report["records"]:
        assert row["step_ms"] > 0 and row["images_per_s"] > 0 and row["activation_mib"] > 0
    assert rows["checkpoint"]["activation_reduction"] > 2
    for alg in ("gact-L2.2", "actnn-L3"):
        assert rows[alg]["activation_reduction"] > 10


def test_the_grid_is_every_bit_of_every_compressing_algorithm():
    grid = mem_speed.configurations(["exact", "gact-L2.2", "actnn-L0", "actnn-L3"], [2, 1.25], [1, 0.5])
    assert [(a.mode, a.bit, a.aq_bit) for a in grid] == [
        ("exact", 0, 0), *[("gact-L2.2", b, q) for b in (2, 1.25) for q in (1, 0.5)],
        ("actnn-L0", 0, 0), *[("actnn-L3", b, q) for b in (2, 1.25) for q in (1, 0.5)]]
    with pytest.raises(ValueError, match="--alg gact-L1 --bit 1.25 --aq-bit 0: a fixed level"):
        mem_speed.configurations(["gact-L1"], [1.25], [0])


def test_max_batch_on_the_cpu_needs_a_memory_limit(tmp_path, capsys):
    with pytest.raises(SystemExit):
        measure(tmp_path, "--alg", "exact", "--max-batch")
    assert "needs a CUDA device" in capsys.readouterr().err


def test_max_batch_searches_against_the_activation_limit(tmp_path):
    limit = 1.0
    report = measure(tmp_path, "--batch", "4", "--alg", "exact", "--max-batch", "--memory-limit-mib",
                     str(limit), "--max-batch-limit", "64")
    row, = report["records"]
    per_image = row["activation_mib"] / 4
    assert row["max_batch"] == pytest.approx(limit / per_image, abs=1.5)
    for batch, fits in row["max_batch_probes"]:
        assert fits == (batch <= row["max_batch"])


@pytest.mark.parametrize("limit, expected", [(37, 37), (3, 3), (0, 0), (10_000, 1000)])
def test_largest_doubles_then_bisects(limit, expected):
    calls = []

    def fit(n):
        calls.append(n)
        return n <= limit
    found, probes = mem_speed.largest(fit, 8, 1000)
    assert found == expected and [n for n, _ in probes] == calls
    assert len(calls) <= 2 * 10 + 2
