"""Prefetch: a team taking turns finds the next agent already in RAM, and answers as before."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from agentkv import AgentMemory
from conftest import last_logits

PROMPTS = {name: f"{name} notes: " + " ".join(f"item {j} is {(j * len(name)) % 7}." for j in range(90))
           for name in ("planner", "coder", "critic")}


def run_team(llm, cache_dir, budget, prefetch, rounds=3):
    """The three agents in turn; per turn (text, logits after it, source)."""
    seen = []
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=budget, prefetch=prefetch) as mem:
        for r in range(rounds):
            for name, prompt in PROMPTS.items():
                out = mem.create_completion(name, prompt + f" Round {r}:", max_tokens=3,
                                            temperature=0)
                seen.append((out["choices"][0]["text"], last_logits(llm), mem.last_turn.source))
        stats = mem.stats()
        assert stats.ram_bytes <= budget  # prefetched states count, and fit
    return seen, stats


def one_snapshot(llm, tmp_path):
    with AgentMemory(llm, cache_dir=tmp_path / "probe", ram_budget="10GiB") as probe:
        probe.create_completion("x", PROMPTS["planner"], max_tokens=3, temperature=0)
        probe.create_completion("y", "Hi", max_tokens=1, temperature=0)
        return [a for a in probe.agents() if a.agent_id == "x"][0].nbytes


def test_a_round_robin_team_returns_from_prefetched_ram_exactly(llm, tmp_path):
    """RAM holds about one agent: without prefetch every return of the three reads the disk;
    with it, the agent predicted next (learnt in round 0) is read into RAM during the turn
    before its own, and its return restores from there. Texts and logits are equal."""
    budget = int(one_snapshot(llm, tmp_path) * 1.5)
    plain, plain_stats = run_team(llm, tmp_path / "plain", budget, prefetch=False)
    fetched, stats = run_team(llm, tmp_path / "fetched", budget, prefetch=True)
    assert plain_stats.hits["prefetch"] == 0 and plain_stats.hits["disk"] >= 5
    for (t0, l0, _), (t1, l1, _) in zip(plain, fetched):
        assert t0 == t1
        assert np.array_equal(l0, l1)
    sources = [s for _, _, s in fetched]
    assert sources[:4] == ["cold"] * 3 + ["disk"], sources
    # round 1's first turn completes the order (critic -> planner); from then on, each turn
    # prefetches the next agent, and every return is restored from what it read
    assert sources[4:] == ["prefetch"] * 5, sources
    assert stats.hits["prefetch"] == 5 and stats.prefetch_reads >= 5 and stats.prefetch_bytes > 0
    assert stats.rejected == 0


def test_prefetch_on_request_and_what_it_refuses(llm, tmp_path):
    """mem.prefetch(agent) reads an agent on disk into RAM for its next turn; an agent larger
    than the RAM budget, an unknown one or the live one is not prefetched (nothing breaks)."""
    budget = int(one_snapshot(llm, tmp_path) * 1.5)
    with AgentMemory(llm, cache_dir=tmp_path / "c", ram_budget=budget) as mem:
        for name in ("planner", "coder"):
            mem.create_completion(name, PROMPTS[name], max_tokens=2, temperature=0)
        mem.evict("planner")  # on disk only
        mem.prefetch("planner")
        mem.prefetch("nobody")  # unknown: nothing to read
        mem.prefetch("coder")  # live: nothing to do
        mem.create_completion("planner", PROMPTS["planner"] + " More:", max_tokens=2,
                              temperature=0)
        assert mem.last_turn.source == "prefetch"
    with AgentMemory(llm, cache_dir=tmp_path / "c", ram_budget=1000) as small:
        small.prefetch("coder")  # larger than the whole budget: read at its turn instead
        small.create_completion("coder", PROMPTS["coder"] + " More:", max_tokens=2, temperature=0)
        assert small.last_turn.source == "disk"
        assert small.stats().prefetch_reads == 0


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's idle scheduling class only")
def test_the_prefetch_thread_reads_in_the_idle_class(llm, tmp_path):
    """The thread that reads blocks into place runs in Linux's idle scheduling class, so a
    read ahead takes no CPU the decode wants; the one that opens them (and so starts the
    disk's readahead) and the caller's thread, whose turn decodes, keep their class."""
    mine = os.sched_getscheduler(0)
    with AgentMemory(llm, cache_dir=tmp_path / "c", prefetch=True):
        threads = {t.name: t for t in threading.enumerate() if t.name.startswith("agentkv-prefetch")}
        assert set(threads) == {"agentkv-prefetch", "agentkv-prefetch-read"}
        reader = threads["agentkv-prefetch-read"].native_id
        deadline = time.monotonic() + 5.0  # the thread sets its class as it starts
        while os.sched_getscheduler(reader) != os.SCHED_IDLE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.sched_getscheduler(reader) == os.SCHED_IDLE
        assert os.sched_getscheduler(threads["agentkv-prefetch"].native_id) == mine
        assert os.sched_getscheduler(0) == mine



def test_a_long_prefetched_state_is_laid_out_before_its_turn(tmp_path):
    """An agent whose restore pads its SWA cache (a long context, flash attention) is read
    ahead as a RestoreImage, laid out in the background, so that its return loads it with no
    copy inside its time to first token; it answers as it does from disk without prefetch."""
    from conftest import make_llm
    llm = make_llm(n_ctx=2048)
    long = {name: f"{name} log: " + " ".join(f"a stone numbered {i} rolls {name}ward."
                                             for i in range(180)) for name in ("ann", "bob", "cy")}
    try:
        with AgentMemory(llm, cache_dir=tmp_path / "probe", ram_budget="10GiB") as probe:
            probe.create_completion("x", long["ann"], max_tokens=3, temperature=0)
            probe.create_completion("y", "Hi", max_tokens=1, temperature=0)
            budget = int([a for a in probe.agents() if a.agent_id == "x"][0].nbytes * 1.5)
        runs = {}
        for prefetch in (False, True):
            seen, laid = [], []
            with AgentMemory(llm, cache_dir=tmp_path / str(prefetch), ram_budget=budget,
                             prefetch=prefetch) as mem:
                names = list(long)
                for r in range(3):
                    for i, name in enumerate(names):
                        out = mem.create_completion(name, long[name] + f" Round {r}:",
                                                    max_tokens=3, temperature=0)
                        seen.append((out["choices"][0]["text"], last_logits(llm),
                                     mem.last_turn.source))
                        nxt = names[(i + 1) % len(names)]  # what it read for the next agent
                        held = mem.inspect().prefetched(nxt)
                        if held is not None:  # its padding on the zero page, not in its RAM
                            layout, owned, loaded = held
                            laid.append(layout == "image" and owned < loaded)
            runs[prefetch] = seen, laid
        (plain, _), (fetched, laid) = runs[False], runs[True]
        assert [s for _, _, s in plain] == ["cold"] * 3 + ["disk"] * 6
        assert [s for _, _, s in fetched][4:] == ["prefetch"] * 5
        for (t0, l0, _), (t1, l1, _) in zip(plain, fetched):
            assert t0 == t1 and np.array_equal(l0, l1)
        assert len(laid) >= 5 and all(laid), laid
    finally:
        llm.close()
