"""An agent evicted between every turn answers exactly like one that never left the context."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from agentkv import AgentMemory
from conftest import QUESTIONS, chat_chain, last_logits, new_process_step, plain_step


def reference(llm):
    llm.reset()
    answers = chat_chain(plain_step(llm))
    return answers, last_logits(llm)


@pytest.mark.parametrize("laid", [True, False], ids=["laid-out", "compact"])
def test_exact_through_ram(llm, tmp_path, laid):
    ref_answers, ref_logits = reference(llm)
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget="1GiB", ram_laid_out=laid) as mem:
        other = iter(QUESTIONS * 2)

        def step(messages):
            out = mem.create_chat_completion("planner", messages=messages, temperature=0,
                                             max_tokens=16)
            logits = last_logits(llm)
            mem.create_completion("critic", next(other), max_tokens=4, temperature=0)
            step.logits = logits
            # held in RAM laid out for the restore (its padding on the zero page)
            step.laid += mem.inspect().ram_layout("planner") == "image"
            return out

        step.laid = 0
        answers = chat_chain(step)
        stats = mem.stats()
    assert answers == ref_answers
    assert np.array_equal(step.logits, ref_logits)
    assert step.laid == (len(QUESTIONS) if laid else 0)
    assert stats.hits["ram"] >= 2 * (len(QUESTIONS) - 1)
    assert stats.hits["disk"] == 0


def test_exact_through_disk(llm, tmp_path):
    ref_answers, ref_logits = reference(llm)
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        def step(messages):
            out = mem.create_chat_completion("planner", messages=messages, temperature=0,
                                             max_tokens=16)
            step.logits = last_logits(llm)
            mem.create_completion("critic", "Hello", max_tokens=2, temperature=0)
            return out

        answers = chat_chain(step)
        stats = mem.stats()
    assert answers == ref_answers
    assert np.array_equal(step.logits, ref_logits)
    assert stats.hits["ram"] == 0
    assert stats.hits["disk"] >= 2 * (len(QUESTIONS) - 1)
    assert stats.bytes_read > 0 and stats.rejected == 0


def test_exact_through_restart(llm, tmp_path):
    """Each turn runs in a new process on the same cache_dir."""
    ref_answers, ref_logits = reference(llm)
    step = new_process_step(tmp_path, max_tokens=16, ram_budget="1GiB")
    results = step.results
    answers = chat_chain(step)
    assert answers == ref_answers
    assert results[-1]["logits"] == xxhash.xxh3_128_hexdigest(ref_logits.tobytes())
    assert [r["source"] for r in results] == ["cold"] + ["disk"] * (len(QUESTIONS) - 1)
    assert all(r["evaluated"] < 40 for r in results[1:])


def test_returning_agent_evaluates_only_the_new_suffix(llm, tmp_path):
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        history = "Notes: " + " ".join(f"item {i} is ready." for i in range(150))
        mem.create_completion("writer", history, max_tokens=1, temperature=0)
        n_history = mem.agents()[0].n_tokens
        mem.create_completion("other", "Hi", max_tokens=1, temperature=0)
        suffix = " Next, item 150 is ready."
        mem.create_completion("writer", history + suffix, max_tokens=1, temperature=0)
        turn = mem.last_turn
        n_suffix = len(llm.tokenize((history + suffix).encode())) - n_history
    assert n_history > 600
    assert turn.source == "disk"
    assert turn.prompt_tokens_evaluated <= n_suffix + 1
    assert turn.prompt_tokens_restored >= n_history - 1


def test_resume_samples_carried_logits_without_replay(llm, tmp_path):
    """An agent resumed with exactly its history samples at once, like a never-evicted one."""
    prompt = "Notes: " + " ".join(f"item {i} is ready." for i in range(150))
    llm.reset()
    llm.create_completion(prompt, max_tokens=4, temperature=0)
    history = [int(t) for t in llm.input_ids[: llm.n_tokens]]
    ref = llm.create_completion(history, max_tokens=6, temperature=0)["choices"][0]["text"]
    ref_logits = last_logits(llm)
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("a", prompt, max_tokens=4, temperature=0)
        mem.create_completion("b", "Hi", max_tokens=1, temperature=0)
        out = mem.create_completion("a", history, max_tokens=6, temperature=0)
        turn = mem.last_turn
    assert turn.source == "disk"
    assert turn.prompt_tokens_evaluated == 0
    assert out["choices"][0]["text"] == ref
    assert np.array_equal(last_logits(llm), ref_logits)


HISTORY = "Log: " + " ".join(f"event {i} passed." for i in range(200))


def rewrite_after_restore(llm, tmp_path, rewritten):
    """Evict an agent holding HISTORY to disk, then send ``rewritten``; return (text, turn)."""
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("a", HISTORY, max_tokens=1, temperature=0)
        mem.evict("a")
        out = mem.create_completion("a", rewritten, max_tokens=12, temperature=0)
        return out["choices"][0]["text"], mem.last_turn


def test_divergence_before_the_swa_window_prefills_correctly(llm, tmp_path):
    """A prompt that rewrites history further back than the stored SWA window reaches."""
    rewritten = HISTORY[:200] + " a different ending, long enough to matter." * 3
    llm.reset()
    cold = llm.create_completion(rewritten, max_tokens=12, temperature=0)["choices"][0]["text"]
    cold_logits = last_logits(llm)
    text, turn = rewrite_after_restore(llm, tmp_path, rewritten)
    assert turn.source == "disk"
    assert turn.prompt_tokens_evaluated == len(llm.tokenize(rewritten.encode()))
    assert text == cold
    assert np.array_equal(last_logits(llm), cold_logits)


def test_shallow_rewrite_after_restore_stays_exact(llm, tmp_path):
    """Rewriting the last few tokens (within the stored margin) continues from the restore."""
    rewritten = HISTORY[:-40] + " and then everything stopped."
    llm.reset()
    llm.create_completion(HISTORY, max_tokens=1, temperature=0)
    ref = llm.create_completion(rewritten, max_tokens=12, temperature=0)["choices"][0]["text"]
    ref_logits = last_logits(llm)
    text, turn = rewrite_after_restore(llm, tmp_path, rewritten)
    assert turn.source == "disk"
    assert turn.prompt_tokens_evaluated < 30
    assert text == ref
    assert np.array_equal(last_logits(llm), ref_logits)


def test_stale_tokens_of_another_agent_are_evaluated_not_reused(llm, tmp_path):
    """After a restore, Llama's input_ids past n_tokens still hold the previous agent's tokens;
    the guard's prefix reuse (done in place of generate's own) must stop at n_tokens, so a
    prompt that goes on with those same tokens evaluates them."""
    shared = llm.tokenize(b"Both agents open with the same few words about the weather. " * 3)
    more = llm.tokenize(b" Then the longer agent keeps talking about rain and wind.", add_bos=False)
    prompt = shared + more
    llm.reset()  # the reference: the same two evaluations in a fresh context
    llm.eval(shared)
    llm.eval(more)
    want = last_logits(llm)
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget="1GiB") as mem:
        mem.create_completion("short", shared, max_tokens=1, temperature=0)
        mem.create_completion("long", prompt, max_tokens=1, temperature=0)
        assert list(llm.input_ids[:len(prompt)]) == prompt
        mem.create_completion("short", prompt, max_tokens=1, temperature=0)
        turn = mem.last_turn
        got = last_logits(llm)
    assert turn.source == "ram" and turn.prompt_tokens_evaluated == len(more)
    assert np.array_equal(got, want)


def test_assembly_buffer_reads_as_zeros_after_every_turn(llm, tmp_path):
    """Restores lay states out in a reused buffer whose padding must be zeros: each turn
    ends with the bytes its restore wrote zeroed again (RAM and disk restores alike)."""
    long = "Notes: " + " ".join(f"item {i} is fine." for i in range(200))  # past the SWA window
    for budget in ("1GiB", 0):
        with AgentMemory(llm, cache_dir=tmp_path / str(budget), ram_budget=budget) as mem:
            for turn in range(3):
                for agent in ("a", "b"):
                    mem.create_completion(agent, long + f" {agent}{turn}", max_tokens=2,
                                          temperature=0)
                    nbytes, zeroed = mem.inspect().restore_buffer()
                    assert nbytes > 0 or turn == 0
                    assert zeroed
            assert mem.stats().hits["ram" if budget else "disk"] >= 4
