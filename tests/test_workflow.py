"""The Arm benchmark workflow is valid YAML and calls only scripts and options that exist here."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "arm-bench.yml"
MADE_BY_SETUP = (".venv/",)  # created by scripts/setup.sh, an earlier step


def run_steps():
    doc = yaml.safe_load(WORKFLOW.read_text())
    steps = doc["jobs"]["arm-bench"]["steps"]
    return doc, [s["run"] for s in steps if "run" in s]


def commands():
    for script in run_steps()[1]:
        yield shlex.split(" ".join(script.split()))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workflow_is_valid_yaml_on_an_arm_runner():
    doc, runs = run_steps()
    # PyYAML reads the key `on` as the boolean True (YAML 1.1)
    assert doc.get("on", doc.get(True)) is not None
    job = doc["jobs"]["arm-bench"]
    assert job["runs-on"] == "ubuntu-24.04-arm"
    uses = [s.get("uses", "") for s in job["steps"]]
    assert any(u.startswith("actions/upload-artifact") for u in uses)
    assert any("scripts/setup.sh" in r for r in runs)
    assert "-DGGML_CPU_KLEIDIAI=ON" in (ROOT / "scripts" / "setup.sh").read_text()


def test_every_run_step_calls_files_that_exist():
    for argv in commands():
        for word in argv:
            if word.startswith("-") or "/" not in word or word.startswith("results/"):
                continue
            if word.startswith(MADE_BY_SETUP) or not word[0].isalnum() and word[0] != ".":
                continue
            assert (ROOT / word).exists(), f"workflow calls {word}, which is not in the repo"


def test_every_benchmark_step_parses_its_arguments():
    """Each benchmark command's options are accepted by the script's own argument parser."""
    seen = set()
    for argv in commands():
        scripts = [w for w in argv if w.startswith("benchmarks/") and w.endswith(".py")]
        if not scripts:
            continue
        script = scripts[0]
        module = load(ROOT / script)
        args = argv[argv.index(script) + 1:]
        module.parse_args(args)  # argparse exits (SystemExit) on an unknown option
        seen.add(script)
    assert seen == {"benchmarks/agent_memory_bench.py", "benchmarks/kv_equivalence.py",
                    "benchmarks/kv_density.py"}


def test_pytest_targets_exist():
    for argv in commands():
        if "pytest" in argv:
            targets = [w for w in argv[argv.index("pytest") + 1:] if not w.startswith("-")
                       and not w.startswith("results/")]
            assert targets and all((ROOT / t).exists() for t in targets), argv
