"""RAM and disk budgets hold, and what they push out comes back the right way."""

from __future__ import annotations

import os

import pytest

from agentkv import AgentMemory, parse_size
from conftest import payload_files

PROMPTS = {f"agent{i}": f"Agent {i} notes: " + " ".join(f"fact {i}.{j} holds." for j in range(80))
           for i in range(4)}


def visit_all(mem, rounds=2, check=None):
    for r in range(rounds):
        for agent_id, prompt in PROMPTS.items():
            mem.create_completion(agent_id, prompt + f" Round {r}.", max_tokens=2, temperature=0)
            if check:
                check(mem)


def test_ram_budget_bounds_snapshots(llm, tmp_path):
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget="10GiB") as probe:
        probe.create_completion("x", PROMPTS["agent0"], max_tokens=2, temperature=0)
        probe.create_completion("y", "Hi", max_tokens=1, temperature=0)
        one = [a for a in probe.agents() if a.agent_id == "x"][0].nbytes
    budget = int(one * 2.5)
    seen = []
    with AgentMemory(llm, cache_dir=tmp_path / "c", ram_budget=budget) as mem:
        visit_all(mem, check=lambda m: seen.append(m.stats().ram_bytes))
        tiers = {a.agent_id: a.tier for a in mem.agents()}
        stats = mem.stats()
    assert max(seen) <= budget
    assert max(seen) > one  # it did hold two snapshots
    assert sorted(tiers.values()) == ["disk", "live", "ram", "ram"]
    assert stats.hits["disk"] > 0  # round-robin over 4 with room for 2: returns go through disk


def test_disk_budget_evicts_least_recently_used(llm, tmp_path):
    with AgentMemory(llm, cache_dir=tmp_path / "probe", ram_budget=0) as probe:
        probe.create_completion("x", PROMPTS["agent0"], max_tokens=2, temperature=0)
        probe.flush()
        one = probe.stats().disk_bytes
    budget = int(one * 2.5)
    cache_dir = tmp_path / "c"
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=0, disk_budget=budget) as mem:
        visit_all(mem, rounds=1)
        mem.flush()
        stats = mem.stats()
        on_disk = sum(os.path.getsize(p) for p in payload_files(cache_dir))
        held = {a.agent_id: a.tier for a in mem.agents()}
        mem.create_completion("agent0", PROMPTS["agent0"] + " Round 1.", max_tokens=2, temperature=0)
        assert mem.last_turn.source == "cold"  # the least recently used one was evicted
    assert stats.disk_bytes <= budget
    assert on_disk <= budget
    assert held == {"agent2": "disk", "agent3": "live"}  # agent0 and agent1 were evicted


def test_a_snapshot_larger_than_the_disk_budget_is_not_written(llm, tmp_path):
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0, disk_budget="100KB") as mem:
        visit_all(mem, rounds=1)
        mem.flush()
        assert mem.stats().disk_bytes == 0
        mem.create_completion("agent0", PROMPTS["agent0"], max_tokens=1, temperature=0)
        assert mem.last_turn.source == "cold"


@pytest.mark.parametrize("text, expected", [
    ("0", 0), (1024, 1024), ("512MiB", 512 << 20), ("1GiB", 1 << 30), ("1.5 GB", 1_500_000_000),
    ("20gib", 20 << 30), ("64 KB", 64_000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected
