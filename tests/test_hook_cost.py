"""benchmark/hook_cost.py runs end to end on a tiny BERT and counts every save."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_hook_cost_counts_packs_and_unpacks(tmp_path):
    out = tmp_path / "hook_cost.json"
    subprocess.run([sys.executable, str(ROOT / "benchmark" / "hook_cost.py"), "--layers", "1",
                    "--hidden", "32", "--heads", "2", "--batch", "2", "--seq-len", "16",
                    "--steps", "2", "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    report = json.loads(out.read_text())
    assert report["command"].startswith("python") and report["device"] == "cpu"
    assert report["packs_per_step"] > 10 and report["unpacks_per_step"] > 10
    assert report["pack_us"] > 0 and report["unpack_us"] > 0
    assert 0 < report["hooks_share_of_step"] < 1
