"""Without a GPU or CUDA toolchain aqcore falls back to the reference with one warning
(the missing pieces are simulated, so these run on any machine)."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from aqcore import kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_kernels(monkeypatch):
    kernels._extension.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    kernels._extension.cache_clear()


def fallback_warnings() -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not kernels.available()
        assert not kernels.available()
    return [str(w.message) for w in caught]


def test_no_gpu_means_reference_path_and_one_warning(fresh_kernels):
    fresh_kernels.setattr(torch.version, "cuda", "13.0")
    fresh_kernels.setattr(torch.cuda, "is_available", lambda: False)
    fresh_kernels.setattr(kernels, "build", lambda *a, **k: pytest.fail("must not compile"))
    messages = fallback_warnings()
    assert len(messages) == 1
    assert "reference implementation" in messages[0] and "no CUDA GPU" in messages[0]


def test_missing_toolchain_means_reference_path_and_one_warning(fresh_kernels):
    from torch.utils import cpp_extension

    fresh_kernels.setattr(torch.version, "cuda", "13.0")
    fresh_kernels.setattr(torch.cuda, "is_available", lambda: True)
    fresh_kernels.setattr(cpp_extension, "CUDA_HOME", None)
    fresh_kernels.setattr(kernels, "build", lambda *a, **k: pytest.fail("must not compile"))
    messages = fallback_warnings()
    assert len(messages) == 1 and "nvcc" in messages[0] and "reference" in messages[0]


def test_a_failing_build_falls_back_with_its_error(fresh_kernels):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension:\nkernel.cu(1): error: something broke")

    fresh_kernels.setattr(torch.version, "cuda", "13.0")
    fresh_kernels.setattr(torch.cuda, "is_available", lambda: True)
    fresh_kernels.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    fresh_kernels.setattr(cpp_extension, "is_ninja_available", lambda: True)
    fresh_kernels.setattr(kernels, "build", broken)
    messages = fallback_warnings()
    assert len(messages) == 1 and "something broke" in messages[0]


def test_cpu_tensors_never_touch_the_kernels(fresh_kernels):
    import aqcore

    fresh_kernels.setattr(kernels, "_extension", lambda: pytest.fail("CPU path asked for kernels"))
    x = torch.randn(3, 300)
    aqcore.decompress(aqcore.compress(x, "aq0.5"))
    aqcore.decompress(aqcore.pack_mask(x > 0))


def test_prebuild_command_exits_0_where_no_cuda_build_is_possible():
    """A CPU-only machine is a supported setup: the command says why and succeeds."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/cuda covers the build")
    run = subprocess.run([sys.executable, "-m", "aqcore.build"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "not built" in run.stdout and "reference implementation" in run.stdout


def test_prebuild_command_fails_when_a_possible_build_fails(fresh_kernels, capsys):
    from aqcore import build

    def broken(*args, **kwargs):
        raise RuntimeError("kernel.cu(1): error: something broke")

    fresh_kernels.setattr(kernels, "unavailable_reason", lambda: None)
    fresh_kernels.setattr(kernels, "build", broken)
    assert build.main([]) == 1
    assert "something broke" in capsys.readouterr().out
    fresh_kernels.setattr(kernels, "unavailable_reason", lambda: "no CUDA GPU is visible")
    assert build.main([]) == 0
    assert "no CUDA GPU is visible" in capsys.readouterr().out
