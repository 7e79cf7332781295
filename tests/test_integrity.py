"""Damaged, foreign or hostile input is detected, never restored, and loses nothing else."""

from __future__ import annotations

import os
import pickle
import shutil

import diskcache
import numpy as np
import pytest

from agentkv import (AgentKVError, AgentMemory, ConfigError, InvalidAgentId, MemoryClosed,
                     NotALlama, UnknownAgent)
from agentkv._store.disk import agent_key
from conftest import MODEL_PATH, last_logits, make_llm

PROMPT_A = "Inventory: " + " ".join(f"box {i} holds {i * 3} apples." for i in range(120))
PROMPT_B = "Weather: " + " ".join(f"day {i} was sunny." for i in range(120))


def cold_run(llm, prompt):
    llm.reset()
    out = llm.create_completion(prompt, max_tokens=8, temperature=0)
    return out["choices"][0]["text"], last_logits(llm)


def save_two_agents(llm, cache_dir, part="tail"):
    """Store agents a and b; return the key of one of a's payloads: its tail, or a block."""
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=0) as mem:
        mem.create_completion("a", PROMPT_A, max_tokens=1, temperature=0)
        mem.create_completion("b", PROMPT_B, max_tokens=1, temperature=0)
        record = mem.inspect().record("a")
    return record.tail if part == "tail" else record.blocks[-1][0]


def payload_file_of(cache_dir, kv_key):
    with diskcache.Cache(str(cache_dir)) as raw:
        _, name = raw._sql("SELECT key, filename FROM Cache WHERE key = ?", (kv_key,)).fetchone()
    return os.path.join(str(cache_dir), name)


@pytest.mark.parametrize("part,damage", [("tail", "flip"), ("tail", "truncate"),
                                         ("tail", "empty"), ("block", "flip")])
def test_damaged_payload_is_refused_and_prefilled(llm, tmp_path, part, damage, caplog):
    key_a = save_two_agents(llm, tmp_path, part)
    path = payload_file_of(tmp_path, key_a)
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 1000]
    else:
        data = bytearray()
    open(path, "wb").write(bytes(data))
    text, logits = cold_run(llm, PROMPT_A + " More:")

    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        out = mem.create_completion("a", PROMPT_A + " More:", max_tokens=8, temperature=0)
        assert mem.last_turn.source == "cold"
        assert out["choices"][0]["text"] == text
        assert np.array_equal(last_logits(llm), logits)
        mem.create_completion("b", PROMPT_B, max_tokens=1, temperature=0)
        assert mem.last_turn.source == "disk"  # the other agent survived
        assert mem.stats().rejected == 1
    assert "damaged" in caplog.text


@pytest.mark.parametrize("part", ["tail", "block"])
def test_missing_payload_is_a_miss(llm, tmp_path, part):
    key_a = save_two_agents(llm, tmp_path, part)
    os.remove(payload_file_of(tmp_path, key_a))
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("a", PROMPT_A, max_tokens=1, temperature=0)
        assert mem.last_turn.source == "cold"
        mem.create_completion("b", PROMPT_B, max_tokens=1, temperature=0)
        assert mem.last_turn.source == "disk"


def test_payload_swapped_between_agents_is_refused(llm, tmp_path):
    """A payload moved under another key fails the content-address check."""
    key_a = save_two_agents(llm, tmp_path)
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        key_b = mem.inspect().record("b").tail
    shutil.copyfile(payload_file_of(tmp_path, key_b), payload_file_of(tmp_path, key_a))
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("a", PROMPT_A, max_tokens=1, temperature=0)
        assert mem.last_turn.source == "cold"


def test_foreign_model_with_same_shapes_is_refused(llm, tmp_path, caplog):
    """A copy of the model with one weight byte changed: same tensor shapes, other model."""
    save_two_agents(llm, tmp_path / "cache")
    other_path = tmp_path / "other.gguf"
    shutil.copyfile(MODEL_PATH, other_path)
    with open(other_path, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        byte = f.read(1)
        f.seek(-64, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    other = make_llm(str(other_path))
    try:
        with AgentMemory(other, cache_dir=tmp_path / "cache", ram_budget=0) as mem:
            with AgentMemory(llm, cache_dir=tmp_path / "x") as ref:
                assert ref.fingerprint != mem.fingerprint
            mem.create_completion("a", PROMPT_A, max_tokens=1, temperature=0)
            assert mem.last_turn.source == "cold"
            assert mem.stats().rejected == 1
        assert "another model" in caplog.text
    finally:
        other.close()


def test_context_settings_enter_the_fingerprint(llm, tmp_path):
    q8 = make_llm(type_k=8, type_v=8)  # GGML_TYPE_Q8_0
    try:
        with AgentMemory(llm, cache_dir=tmp_path) as a, AgentMemory(q8, cache_dir=tmp_path) as b:
            assert a.fingerprint != b.fingerprint
    finally:
        q8.close()


def test_pickled_rows_are_never_unpickled(llm, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    cache_dir = tmp_path / "cache"
    save_two_agents(llm, cache_dir)
    with diskcache.Cache(str(cache_dir)) as raw:  # a plain Cache pickles what is not bytes
        raw.set(agent_key("a"), Exploit())
        raw.set(agent_key("evil"), [Exploit()])
        raw.set(pickle.dumps("key"), b"x")  # a key that is not a str
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=0) as mem:
        assert "evil" not in [a.agent_id for a in mem.agents()]
        mem.create_completion("a", PROMPT_A, max_tokens=1, temperature=0)
        assert mem.last_turn.source == "cold"
        mem.create_completion("b", PROMPT_B, max_tokens=1, temperature=0)
        assert mem.last_turn.source == "disk"
    assert not marker.exists()


HOSTILE_IDS = ["../../escape", "/etc/passwd", "a/b/c", "..", ".", "C:\\win", "nul\x00byte",
               "ünïcødé 🤖", "x" * 5000, "\ud800lone-surrogate", " ", "agent/" + "0" * 32]


def test_hostile_agent_ids_stay_inside_cache_dir(llm, tmp_path):
    cache_dir = tmp_path / "inner" / "cache"
    before = set(os.listdir(tmp_path))
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=0) as mem:
        for i, agent_id in enumerate(HOSTILE_IDS):
            mem.create_completion(agent_id, f"Hello {i}", max_tokens=1, temperature=0)
    assert set(os.listdir(tmp_path)) == before | {"inner"}
    assert os.listdir(tmp_path / "inner") == ["cache"]
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=0) as mem:
        assert sorted(a.agent_id for a in mem.agents()) == sorted(HOSTILE_IDS)
        mem.create_completion("../../escape", "Hello 0 again", max_tokens=1, temperature=0)
        assert mem.last_turn.source == "disk"


@pytest.mark.parametrize("bad", ["", None, 42, b"bytes", ["list"]])
def test_invalid_agent_ids_raise(llm, tmp_path, bad):
    with AgentMemory(llm, cache_dir=tmp_path) as mem:
        with pytest.raises(InvalidAgentId) as err:
            mem.create_completion(bad, "Hi", max_tokens=1)
        assert isinstance(err.value, ValueError)
        with pytest.raises(InvalidAgentId):
            with mem.agent(bad):
                pass
        with pytest.raises(InvalidAgentId):
            mem.create_chat_completion(bad, messages=[{"role": "user", "content": "x"}], stream=True)


def test_misuse_raises_named_errors(llm, tmp_path):
    with pytest.raises(NotALlama, match="not str"):
        AgentMemory("model.gguf", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="ram_budget"):
        AgentMemory(llm, cache_dir=tmp_path, ram_budget="12 parsecs")
    with pytest.raises(ConfigError, match="disk_budget"):
        AgentMemory(llm, cache_dir=tmp_path, disk_budget=-1)
    with pytest.raises(ConfigError, match="ram_laid_out"):
        AgentMemory(llm, cache_dir=tmp_path, ram_laid_out="yes")
    mem = AgentMemory(llm, cache_dir=tmp_path)
    with pytest.raises(UnknownAgent) as err:
        mem.forget("nobody")
    assert isinstance(err.value, KeyError)
    with pytest.raises(UnknownAgent):
        mem.evict("nobody")
    mem.close()
    mem.close()  # idempotent
    with pytest.raises(MemoryClosed):
        mem.create_completion("a", "Hi", max_tokens=1)
    with pytest.raises(AgentKVError):
        with mem.agent("a"):
            pass


def test_cli_lists_verifies_and_collects(llm, tmp_path):
    import subprocess
    import sys
    key = save_two_agents(llm, tmp_path, "block")
    cli = [sys.executable, "-m", "agentkv"]
    out = subprocess.run(cli + ["ls", str(tmp_path)], capture_output=True, text=True, check=True)
    assert "agent" in out.stdout and " a\n" in out.stdout and " b\n" in out.stdout
    ok = subprocess.run(cli + ["verify", str(tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.count(": ok") == 2
    path = payload_file_of(tmp_path, key)
    data = bytearray(open(path, "rb").read())
    data[100] ^= 1
    open(path, "wb").write(bytes(data))
    bad = subprocess.run(cli + ["verify", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "a: DAMAGED" in bad.stdout and "b: ok" in bad.stdout
    gc = subprocess.run(cli + ["gc", str(tmp_path)], capture_output=True, text=True, check=True)
    assert gc.stdout.startswith("0 unreferenced")


def test_gc_removes_files_a_killed_writer_left_and_keeps_every_agent(llm, tmp_path):
    """diskcache writes a payload's file before its row: a writer killed in between leaves a
    file no key reaches. gc removes it (and only it); the agents still restore from disk."""
    import subprocess
    import sys
    real = payload_file_of(tmp_path, save_two_agents(llm, tmp_path, "block"))
    stray_dir = os.path.join(str(tmp_path), "ee", "ff")
    os.makedirs(stray_dir, exist_ok=True)
    stray = os.path.join(stray_dir, "0123456789abcdef0123456789ab.val")
    with open(stray, "wb") as f:
        f.write(os.urandom(70_000))
    gc = subprocess.run([sys.executable, "-m", "agentkv", "gc", str(tmp_path)],
                        capture_output=True, text=True, check=True)
    assert gc.stdout.strip() == "0 unreferenced payloads deleted, 1 stray files removed"
    assert not os.path.exists(stray) and os.path.exists(real)
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        for agent, prompt in (("a", PROMPT_A), ("b", PROMPT_B)):
            mem.create_completion(agent, prompt, max_tokens=1, temperature=0)
            assert mem.last_turn.source == "disk"
        assert mem.stats().rejected == 0
        assert mem.inspect().garbage()[1] == 0
