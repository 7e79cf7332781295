"""agentkv installs beside a llama-cpp-python the user built, and its sdist builds the kernels.

A fresh virtual environment gets the llama-cpp-python 0.3.36 wheel this machine built (with
its own CMake flags, as a user's KleidiAI, Metal or CUDA build would be); then the sdist that
``python -m build`` makes is installed into it. pip must leave llama-cpp-python as it is, and
the installed agentkv must load its native kernels (built by CMake from the sdist's native/).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

import llama_cpp
import pytest

REPO = Path(__file__).resolve().parent.parent


def _llama_wheel() -> str:
    """The llama-cpp-python wheel pip built and cached on this machine (scripts/setup.sh)."""
    out = subprocess.run([sys.executable, "-m", "pip", "cache", "list", "llama_cpp_python",
                          "--format", "abspath"], capture_output=True, text=True).stdout.split()
    wheels = [w for w in out if f"-{llama_cpp.__version__}-" in os.path.basename(w)]
    if not wheels:
        pytest.skip("pip's cache holds no llama-cpp-python wheel (scripts/setup.sh builds one)")
    return wheels[0]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_sdist_installs_beside_a_users_llama_cpp_and_loads_its_kernels(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    pip = [py, "-m", "pip", "--disable-pip-version-check", "install", "-q"]
    subprocess.run(pip + [_llama_wheel()], check=True, timeout=600)
    site = Path(subprocess.run([py, "-c", "import llama_cpp, os; print(os.path.dirname("
                                "llama_cpp.__file__))"], capture_output=True, text=True,
                               check=True).stdout.strip())
    before = _digest(site)

    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(dist), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    (sdist,) = dist.glob("agentkv-*.tar.gz")
    out = subprocess.run(pip[:-1] + [str(sdist)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _digest(site) == before, "pip replaced the user's llama-cpp-python"
    assert "Collecting llama-cpp-python" not in out.stdout

    check = ("import agentkv, agentkv._quant.kernels as q, llama_cpp;"
             "print(agentkv.__version__, q.BACKEND, q.NATIVE is not None, llama_cpp.__version__)")
    env = {k: v for k, v in os.environ.items() if k != "AGENTKV_PUREPYTHON"}
    got = subprocess.run([py, "-c", check], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env=env).stdout.split()
    from agentkv import __version__
    assert got == [__version__, "native", "True", llama_cpp.__version__]

    subprocess.run([py, "-m", "pip", "uninstall", "-q", "-y", "agentkv"], check=True)
    out = subprocess.run(pip + [str(REPO)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _digest(site) == before, "pip install of the repository replaced llama-cpp-python"


ROOT = Path(__file__).resolve().parent.parent


def test_mypy_accepts_the_annotations():
    """``py.typed`` ships: the annotations must be ones mypy accepts (settings in pyproject)."""
    out = subprocess.run([sys.executable, "-m", "mypy", "agentkv"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "Success: no issues found" in out.stdout, out.stdout + out.stderr


def test_the_house_layout():
    """The layers show in the tree: a few top-level modules (the public surface is
    ``agentkv/__init__.py``), every other module in a private subpackage; no module over ~400
    lines, and a function over 60 lines says why in the comment above it."""
    import ast
    pkg = ROOT / "agentkv"
    top = {p.name for p in pkg.glob("*.py")}
    assert top == {"__init__.py", "__main__.py", "_version.py", "memory.py", "stats.py",
                   "config.py", "errors.py", "cli.py"}, top
    subs = {p.name for p in pkg.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert subs and all(s.startswith("_") for s in subs), subs
    for path in sorted(pkg.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        assert len(lines) <= 410, f"{path.relative_to(ROOT)} has {len(lines)} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno - node.lineno + 1 > 60:
                above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                assert above.startswith("#"), f"{path.name}: {node.name} is long and says not why"
