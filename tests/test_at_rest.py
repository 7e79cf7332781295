"""Quantized at rest: opt-in, smaller on disk, close to exact, never mixed with exact KV."""

from __future__ import annotations

import numpy as np
import pytest

from agentkv import AgentMemory, ConfigError
from agentkv._format import pieces as seqpieces
from agentkv._store.atrest import RestPiece
from conftest import last_logits

PROMPT = "Ledger: " + " ".join(f"entry {i} moves {i * 3 % 17} crates to dock {i % 4}." for i in range(70))
OTHER = "Weather log: " + " ".join(f"day {i} was windy." for i in range(40))


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = np.exp(p_logits - p_logits.max()); p /= p.sum()
    q = np.exp(q_logits - q_logits.max()); q /= q.sum()
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))


def run(llm, cache_dir, at_rest):
    """Agent a, displaced by b (through disk), returns with a new question."""
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=0, at_rest=at_rest) as mem:
        mem.create_completion("a", PROMPT, max_tokens=1, temperature=0)
        mem.create_completion("b", OTHER, max_tokens=1, temperature=0)
        mem.flush()
        disk = mem.stats().disk_bytes
        out = mem.create_completion("a", PROMPT + " Which dock is busiest?", max_tokens=1,
                                    temperature=0)  # logits: the first answer token's
        assert mem.last_turn.source == "disk"
        return out["choices"][0]["text"], last_logits(llm), disk


@pytest.mark.parametrize("fmt,max_ratio,max_kl", [("q8_0", 0.62, 0.02), ("q4_0", 0.40, 0.2),
                                                   ("iq4_nl", 0.40, 0.2)])
def test_at_rest_is_smaller_and_close(llm, tmp_path, fmt, max_ratio, max_kl):
    _, exact_logits, exact_disk = run(llm, tmp_path / "exact", None)
    _, logits, disk = run(llm, tmp_path / fmt, fmt)
    logits_bytes = 2 * 4 * llm.n_vocab()  # two agents' carried logits (exact mode only)
    assert disk < max_ratio * (exact_disk - logits_bytes)
    assert kl(exact_logits, logits) < max_kl
    if fmt == "q8_0":  # its top token is the exact one, or ties with it within 0.1 logit
        # (this prompt's top two are 0.018 apart on AVX2 builds: q8_0 may swap them there)
        assert exact_logits[int(np.argmax(logits))] >= exact_logits.max() - 0.1
    assert not np.array_equal(logits, exact_logits)  # it really went through the lossy format


def test_at_rest_and_exact_stores_never_mix(llm, tmp_path):
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        exact_fp = mem.fingerprint
        mem.create_completion("a", PROMPT, max_tokens=1, temperature=0)
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0, at_rest="q4_0") as mem:
        assert mem.fingerprint != exact_fp
        assert mem.agents() == []  # the exact agent is not this memory's
        mem.create_completion("a", PROMPT + " More.", max_tokens=1, temperature=0)
        assert mem.last_turn.source == "cold"


def test_ram_restores_stay_exact_with_at_rest(llm, tmp_path):
    llm.reset()  # a never-evicted agent: the same two turns on the bare Llama
    llm.create_completion(PROMPT, max_tokens=1, temperature=0)
    ref = llm.create_completion(PROMPT + " Which dock?", max_tokens=4, temperature=0)
    ref_logits = last_logits(llm)
    with AgentMemory(llm, cache_dir=tmp_path, at_rest="q4_0") as mem:  # RAM holds both agents
        mem.create_completion("a", PROMPT, max_tokens=1, temperature=0)
        mem.create_completion("b", OTHER, max_tokens=1, temperature=0)
        out = mem.create_completion("a", PROMPT + " Which dock?", max_tokens=4, temperature=0)
        assert mem.last_turn.source == "ram"
        assert out["choices"][0]["text"] == ref["choices"][0]["text"]
        assert np.array_equal(last_logits(llm), ref_logits)


def test_unknown_at_rest_format_is_a_config_error(llm, tmp_path):
    with pytest.raises(ConfigError, match="at_rest"):
        AgentMemory(llm, cache_dir=tmp_path, at_rest="q3_k")


def test_restore_decodes_in_place_to_the_same_state(llm, tmp_path):
    """A restore's read (scratch) decodes at-rest pieces straight into the assembled state;
    it must give the bytes the plain read's decoded pieces assemble to."""
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0, at_rest="q4_0") as mem:
        mem.create_completion("a", PROMPT, max_tokens=1, temperature=0)
        mem.flush()
        plain = mem.inspect().stored("a")
        want = bytes(seqpieces.assemble(plain.state.shape, plain.state.pieces))
        lazy = mem.inspect().stored("a", in_place=True)
        assert any(isinstance(p, RestPiece) for p in lazy.state.pieces)
        assert not any(isinstance(p, RestPiece) for p in plain.state.pieces)
        assert bytes(seqpieces.assemble(lazy.state.shape, lazy.state.pieces)) == want
