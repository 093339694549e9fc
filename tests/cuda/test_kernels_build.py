"""Building the kernels on a GPU machine: the prebuild command and concurrent processes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.cuda


def test_prebuild_command_reports_the_build():
    run = subprocess.run([sys.executable, "-m", "aqcore.build"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    major, minor = torch.cuda.get_device_capability()
    assert f"{major}.{minor}" in run.stdout and "aqcore_kernels_" in run.stdout


def test_concurrent_processes_share_one_build():
    code = "import aqcore.kernels as k; assert k.available(); print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert all(out.strip() == "ok" for out, _ in results)
