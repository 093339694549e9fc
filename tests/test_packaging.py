"""The conda environment files and setup.cfg must agree (setup.cfg is the one source)."""
import configparser
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def requirement_names(lines):
    return {re.split(r"[<>=!~\[ ;]", line.strip(), maxsplit=1)[0].lower()
            for line in lines if line.strip()}


def conda_dependencies(path):
    """(conda packages, pip lines) of an environment file (a list-only YAML subset)."""
    conda, pip, section = [], [], None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line.startswith(" "):
            section = line.split(":", 1)[0]
            continue
        item = line.strip()
        if section != "dependencies" or not item.startswith("- "):
            continue
        item = item[2:].strip()
        if item == "pip:":
            continue
        (pip if raw.startswith("      ") else conda).append(item)
    return conda, pip


TORCH_PIN = "torch==2.13.0"
CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"


def test_the_environment_files_are_a_cpu_and_a_cuda_variant():
    assert sorted(p.name for p in (ROOT / "requirements").iterdir()) == ["cpu.yaml", "cuda.yaml"]


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_environment_files_install_this_repo_and_agree_with_setup_cfg(name):
    path = ROOT / "requirements" / f"{name}.yaml"
    text = path.read_text()
    assert re.search(rf"^name: aq-act-{name}$", text, re.M)
    conda, pip = conda_dependencies(path)
    cfg = setup_cfg()
    extras = set(cfg["options.extras_require"])
    installs = [line for line in pip if line.startswith("-e ")]
    assert installs, "the pip section must install this repository"
    for line in installs:
        target = line[3:].strip()
        assert (path.parent / target.split("[")[0]).resolve() == ROOT
        wanted = set(re.findall(r"\[(.*)\]", target)[0].split(",")) if "[" in target else set()
        assert wanted <= extras, f"unknown extras {wanted - extras}"
    declared = requirement_names(cfg["options"]["install_requires"].splitlines())
    for section in extras:
        declared |= requirement_names(cfg["options.extras_require"][section].splitlines())
    named = requirement_names(c for c in conda if not c.startswith(("python", "pip")))
    named |= requirement_names(p for p in pip if not p.startswith("-"))
    aliases = {"pytorch": "torch"}
    assert {aliases.get(n, n) for n in named} <= declared


@pytest.mark.parametrize("name, cpu_index", [("cpu", True), ("cuda", False)])
def test_torch_is_pinned_to_a_version_setup_cfg_allows_with_the_build_the_name_says(name, cpu_index):
    from packaging.requirements import Requirement

    _, pip = conda_dependencies(ROOT / "requirements" / f"{name}.yaml")
    assert TORCH_PIN in pip and (CPU_INDEX in pip) == cpu_index
    runtime = [Requirement(line) for line in setup_cfg()["options"]["install_requires"].split()]
    torch_spec = next(r.specifier for r in runtime if r.name == "torch")
    assert torch_spec.contains(TORCH_PIN.split("==")[1])


def test_setup_cfg_declares_the_packages_and_dependencies():
    cfg = setup_cfg()
    include = cfg["options.packages.find"]["include"].split()
    for package in ("aqcore", "actnn_aq", "gact_aq", "aal"):
        assert package in include
        assert (ROOT / package / "__init__.py").exists()
    runtime = requirement_names(cfg["options"]["install_requires"].splitlines())
    assert runtime == {"torch", "numpy", "scipy", "ninja", "tqdm"}
    assert requirement_names(cfg["options.extras_require"]["test"].splitlines()) >= {
        "pytest", "hypothesis"}
    # transformers: BERT in benchmark/train_step.py; accelerate: transformers' Trainer
    # (gact_aq.integrations); matplotlib: PNG plots of benchmark results
    assert requirement_names(cfg["options.extras_require"]["bench"].splitlines()) == {
        "matplotlib", "transformers", "accelerate"}
