"""examples/agent_chain.ipynb runs top to bottom, and its agents really come back from RAM/disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "agent_chain.ipynb"


def outputs_text(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out.get("text", ""))
    return "".join(text)


def test_agent_chain_notebook_runs_and_restores(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTKV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AGENT_CHAIN_ROUNDS", "3")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    line = next(l for l in outputs_text(nb).splitlines() if l.startswith("AGENTKV_STATS "))
    stats = json.loads(line[len("AGENTKV_STATS "):])
    assert stats["turns"] == 9
    # each agent's first turn: the first is cold; the second evaluates the shared prompt's first
    # 512 tokens (a multiple of n_batch: what a cold prefill reproduces) as its own segment and
    # stores it with its sliding window, the planner's window not reaching back that far; the
    # third starts from it
    assert stats["hits"]["cold"] == 2 and stats["hits"]["prefix"] == 1
    assert stats["hits"]["ram"] + stats["hits"]["disk"] == 6  # every return was restored
    assert stats["hits"]["disk"] >= 1  # the RAM budget holds one snapshot: some returns read disk
    returns = [t for t in stats["turns_table"] if t["round"] > 0]
    assert all(t["tier"] in ("ram", "disk") for t in returns)
    assert all(t["evaluated"] < 100 for t in returns)  # only the new message, no silent prefill
    assert all(t["restored"] > 500 for t in returns)
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the TTFT plot was not drawn"
    assert any(Path(tmp_path / "cache").rglob("*")), "nothing reached the disk tier"
