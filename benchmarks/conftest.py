"""pytest-benchmark suite: restore vs re-prefill, save, block assembly, transcode.

Run it with ``.venv/bin/python -m pytest benchmarks --benchmark-only`` (add
``--benchmark-json bench.json`` for the figures), or once untimed with ``--benchmark-disable``.
Without one of the two every benchmark here is skipped, so collecting this folder never slows a
test run; ``pytest tests`` does not collect it at all. ``AGENTKV_BENCH_SIZES`` (default 512,2000,4000) sets the context lengths,
``AGENTKV_BENCH_ROUNDS`` (default 5) and ``AGENTKV_BENCH_PREFILL_ROUNDS`` (default 2) set
the measured rounds of the fast and of the re-prefill benchmarks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Dict, List

import pytest
from llama_cpp import Llama

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import benchutil as bu  # noqa: E402

SIZES = tuple(int(x) for x in os.environ.get("AGENTKV_BENCH_SIZES", "512,2000,4000").split(","))
ROUNDS = int(os.environ.get("AGENTKV_BENCH_ROUNDS", "5"))
PREFILL_ROUNDS = int(os.environ.get("AGENTKV_BENCH_PREFILL_ROUNDS", "2"))


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False) or \
            config.getoption("benchmark_disable", default=False):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest benchmarks --benchmark-only` "
                                   "(or once, untimed, with --benchmark-disable)")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_llm() -> Llama:
    llm = bu.load_llm(None, max(SIZES) + 512, int(os.environ.get("AGENTKV_BENCH_THREADS", "2")))
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def context(bench_llm) -> Callable[[int], List[int]]:
    """Token ids of an n-token context (cached per n)."""
    text = " ".join(f"Step {j}: the team reviewed part {j} and wrote down finding {(j * 7) % 97}."
                    for j in range(max(SIZES) // 10 + 100))
    tokens = bench_llm.tokenize(text.encode())
    cache: Dict[int, List[int]] = {}

    def get(n: int) -> List[int]:
        if n not in cache:
            assert len(tokens) >= n, "context text too short"
            cache[n] = list(tokens[:n])
        return cache[n]

    return get
