"""A cache written on another CPU architecture: refused by the fingerprint, with its reason.

The KV bytes of a ggml type have one layout on x86_64 and aarch64, but the kernels that compute
them differ (AVX2 / AVX-512 against NEON, SVE and KleidiAI), so their values and the stored
logits differ too: an agent restored from another machine's state would not continue as a
never-evicted agent does here. agentkv's fingerprint therefore names the machine and llama.cpp
build (settings.compute), and the refusal says which machine wrote the state.

These tests need a cache written on the other architecture, so the suite does not collect this
file (its name is not test_*.py): ``scripts/arm64.sh crossarch`` writes one cache on x86_64 and
one under aarch64 emulation (tests/foreign_cache.py), then runs this file on each side with
AGENTKV_FOREIGN_CACHE naming the other side's cache::

    AGENTKV_FOREIGN_CACHE=/path/to/cache python -m pytest tests/crossarch_check.py
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil

import pytest

from agentkv import AgentMemory
from foreign_cache import PROMPT, QUESTION, computed

FOREIGN = os.environ.get("AGENTKV_FOREIGN_CACHE", "")


@pytest.fixture(scope="module")
def origin() -> dict:
    if not FOREIGN:
        pytest.fail("set AGENTKV_FOREIGN_CACHE to a cache tests/foreign_cache.py wrote on "
                    "another CPU architecture (scripts/arm64.sh crossarch does both)")
    with open(os.path.join(FOREIGN, "origin.json")) as f:
        data = json.load(f)
    assert data["machine"] != platform.machine(), "the cache was written on this architecture"
    return data


def test_a_state_from_another_architecture_is_refused_and_the_turn_answers(
        llm, origin, tmp_path, caplog):
    cache = tmp_path / "cache"
    shutil.copytree(FOREIGN, cache)  # the original stays as it was written
    caplog.set_level(logging.WARNING, logger="agentkv")
    with AgentMemory(llm, cache_dir=str(cache)) as mem:
        out = mem.create_completion("planner", PROMPT + QUESTION, max_tokens=6, temperature=0)
        turn = mem.last_turn
        stats = mem.stats()
        answer = out["choices"][0]["text"]
        again = mem.create_completion("planner", PROMPT + QUESTION + answer + "\nQ: And then?\nA:",
                                      max_tokens=4, temperature=0)
        assert mem.last_turn.source == "live" and again["choices"][0]["text"] is not None
    assert turn.source == "cold" and turn.prompt_tokens_restored == 0
    assert stats.rejected == 1
    refusal = [r.getMessage() for r in caplog.records if "not restored" in r.getMessage()]
    assert len(refusal) == 1, caplog.text
    assert "another machine or llama.cpp build" in refusal[0]
    assert f"({origin['machine']}:" in refusal[0] and f"here {platform.machine()}:" in refusal[0]
    llm.reset()
    bare = llm.create_completion(PROMPT + QUESTION, max_tokens=6, temperature=0)
    assert answer == bare["choices"][0]["text"]


def test_the_other_architecture_computed_other_values(llm, origin):
    """Why the refusal is right: the same tokens, the same model and settings, and the state
    llama.cpp computed there is not the one it computes here."""
    here = computed(llm, PROMPT)
    assert here["tokens"] == origin["tokens"]
    assert (here["kv"], here["logits"]) != (origin["kv"], origin["logits"])
