"""benchmark/text_classification/run_glue.py and mem_speed.py end to end on the CPU with a
tiny BERT: the JSON they write, GLUE TSV folders, and clear errors for bad arguments."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")  # BERT from a config (the bench extra)

FOLDER = Path(__file__).resolve().parents[1] / "benchmark" / "text_classification"


def load(name: str):
    """By path, under a name of its own (vision's mem_speed.py shares the file name)."""
    spec = importlib.util.spec_from_file_location(f"text_{name}", FOLDER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


run_glue = load("run_glue")
mem_speed = load("mem_speed")

TINY = ["--model-size", "tiny", "--epochs", "1", "--batch", "16", "--max-seq-len", "24",
        "--train-size", "64", "--dev-size", "32"]
GACT = ["--gact", "--opt_level", "L2.2", "--bit", "1.25", "--aq-bit", "0.5"]
EPOCH_FIELDS = {"epoch", "train_loss", "dev_loss", "dev_accuracy", "train_s"}


def glue(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "log.json"
    log = run_glue.main([*TINY, "--out", str(out), *argv])
    assert json.loads(out.read_text()) == json.loads(json.dumps(log))
    return log


@pytest.mark.parametrize("compressed", [False, True], ids=["exact", "gact"])
def test_builtin_task_logs_loss_accuracy_memory_and_speed(tmp_path, compressed):
    log = glue(tmp_path, *(GACT if compressed else []), "--get-mem", "--get-speed", "--warmup", "1")
    assert {"command", "device", "torch", "date", "task", "model", "config"} <= set(log)
    assert log["command"].startswith("python benchmark/text_classification/run_glue.py --model-size tiny")
    assert log["device"] == "cpu" and log["task"] == "builtin-majority"
    assert log["alg"] == ("gact-L2.2" if compressed else "exact")
    assert [set(e) for e in log["epochs"]] == [EPOCH_FIELDS]
    assert 0 <= log["epochs"][0]["dev_accuracy"] <= 1
    assert log["memory"]["activation_mib"] > 0 and log["memory"]["peak_mib"] is None
    assert log["speed"]["step_ms"] > 0 and log["speed"]["timed_steps"] == 2  # 4 steps: 1 warm-up, 1 memory


def test_without_flags_no_memory_or_speed(tmp_path):
    log = glue(tmp_path)
    assert log["memory"] is None and log["speed"] is None


def write_sst2(folder: Path, n: int) -> None:
    folder.mkdir()
    words = {1: ["good", "great", "fine", "lovely"], 0: ["bad", "awful", "dull", "poor"]}
    for name, count in (("train.tsv", n), ("dev.tsv", n // 2)):
        rows = ["sentence\tlabel"]
        for i in range(count):
            label = i % 2
            rows.append(f'a "{words[label][i % 4]}" film , {words[label][(i + 1) % 4]} too .\t{label}')
        (folder / name).write_text("\n".join(rows) + "\n")


def test_glue_tsv_folder_is_read_and_trained_on(tmp_path):
    write_sst2(tmp_path / "SST-2", 128)
    log = glue(tmp_path, "--task", "sst2", "--data", str(tmp_path / "SST-2"), "--epochs", "6",
               "--lr", "3e-3", *GACT)
    assert log["task"] == "sst2" and log["train_size"] == 128 and log["dev_size"] == 64
    assert log["num_labels"] == 2 and len(log["epochs"]) == 6
    assert log["epochs"][-1]["dev_accuracy"] > 0.9  # the label words decide it
    assert log["epochs"][-1]["train_loss"] < 0.5 * log["epochs"][0]["train_loss"]


def test_pair_task_columns_and_hash_tokenizer(tmp_path):
    folder = tmp_path / "RTE"
    folder.mkdir()
    labels = ("entailment", "not_entailment")
    rows = ["index\tsentence1\tsentence2\tlabel"] + \
        [f"{i}\tA man sleeps {i}.\tSomeone sleeps.\t{labels[i % 2]}" for i in range(8)]
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("\n".join(rows) + "\n")
    texts, labels = run_glue.read_tsv(folder / "train.tsv", run_glue.GLUE_TASKS["rte"])
    assert texts[1] == ("A man sleeps 1.", "Someone sleeps.") and labels[:2] == [0, 1]
    tokens = run_glue.HashTokenizer(100)(texts[:2], max_len=6)
    assert tokens["input_ids"].shape == (2, 6)
    assert tokens["input_ids"][0].tolist().count(run_glue.SEP) == 2
    assert tokens["token_type_ids"][0].tolist()[-1] == 1
    again = run_glue.HashTokenizer(100)(texts[:2], max_len=6)
    assert tokens["input_ids"].equal(again["input_ids"])  # deterministic across runs


@pytest.mark.parametrize("argv, message", [
    (GACT[:2] + ["L9"], "unknown optimization level 'L9'"),
    (["--task", "sst2"], "needs --data"),
    (["--data", "x"], "needs --task"),
])
def test_bad_arguments_are_clear_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        run_glue.main([*TINY, "--out", str(tmp_path / "log.json"), *argv])
    assert message in capsys.readouterr().err


def test_datasets_folder_without_datasets_is_a_clear_error(tmp_path):
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed")
    except ImportError:
        pass
    folder = tmp_path / "sst2"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
    with pytest.raises(SystemExit, match="needs the `datasets` package"):
        run_glue.main([*TINY, "--task", "sst2", "--data", str(folder), "--out", str(tmp_path / "l.json")])


def test_mem_speed_exact_and_gact(tmp_path):
    out = tmp_path / "mem.json"
    report = mem_speed.main(["--model-size", "tiny", "--hidden-size", "32", "--layers", "2",
                             "--batch", "8", "--seq-len", "16", "--bit", "1.25", "--aq-bit", "0.5",
                             "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["hidden_size"] == 32 and report["layers"] == 2
    exact, gact = report["records"]
    assert (exact["alg"], gact["alg"], gact["bit"], gact["aq_bit"]) == ("exact", "gact-L2.2", 1.25, 0.5)
    for record in (exact, gact):
        assert record["step_ms"] > 0 and record["activation_mib"] > 0 and record["peak_mib"] is None
    assert gact["activation_reduction"] > 2


def test_mem_speed_max_batch_needs_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit):
        mem_speed.main(["--model-size", "tiny", "--max-batch", "--device", "cpu",
                        "--out", str(tmp_path / "m.json")])
    assert "needs a CUDA device" in capsys.readouterr().err
