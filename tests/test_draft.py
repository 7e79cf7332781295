"""Self-draft decoding: the agent's history drafts, one batch checks, KV stays exact."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from agentkv import AgentMemory, ConfigError, NgramDraft
from agentkv._llama.draft import DraftPace, greedy_refusal, lookup_start
from conftest import SYSTEM, chat_chain, last_logits, new_process_step

# A turn that copies from its context: the planner is asked to repeat its rules.
COPY_QUESTIONS = ["Repeat rules 1 to 6 above exactly, one per line.",
                  "Now repeat rules 7 to 12 exactly.",
                  "Repeat rule 3 again, word for word.",
                  "Summarize the rules in one sentence."]


def test_lookup_finds_the_latest_occurrence_of_the_longest_suffix():
    h = np.array([5, 1, 2, 3, 9, 1, 2, 3, 7, 8, 4, 2, 3], dtype=np.int32)
    # suffix [2, 3] occurs at 2..3 and 6..7; the latest is followed by 7
    assert lookup_start(h, 4, 2) == 8
    # the longest suffix wins: [1, 2, 3] (its only earlier occurrence, 0..2, is followed by 6)
    h2 = np.array([1, 2, 3, 6, 2, 3, 4, 1, 2, 3], dtype=np.int32)
    assert lookup_start(h2, 4, 2) == 3
    assert lookup_start(np.array([1, 2, 3, 4], dtype=np.int32), 4, 2) == -1
    assert lookup_start(np.array([7], dtype=np.int32), 4, 1) == -1


def test_a_periodic_copy_drafts_past_the_present():
    pace = DraftPace(NgramDraft(min_ngram=2, start_len=8, max_len=8))
    h = np.array([9, 4, 5, 4, 5, 4, 5], dtype=np.int32)
    draft = pace.propose(h, room=100)
    assert draft.tolist() == [4, 5, 4, 5, 4, 5, 4, 5]
    assert pace.propose(h, room=3).tolist() == [4, 5, 4]


def test_pace_pauses_after_checks_that_do_not_pay_and_recovers():
    cfg = NgramDraft(min_ngram=2)
    pace = DraftPace(cfg)
    h = np.array([1, 2, 3, 1, 2], dtype=np.int32)
    assert pace.propose(h, 100).size > 0
    pace.moved(h, 4, 0)  # nothing kept: pause 1, then 2, then 4
    pauses = []
    for _ in range(3):
        skipped = 0
        while pace.propose(h, 100).size == 0:
            skipped += 1
        pauses.append(skipped)
        pace.moved(h, 4, 0)
    assert pauses == [1, 2, 4]
    pace.moved(h, 4, 4)  # a check that paid halves the pause instead of resetting it
    assert pace.misses == 3 and pace.length == 6


def test_only_greedy_sampling_drafts():
    assert greedy_refusal((), {"temp": 0.0}) is None
    assert greedy_refusal((), {"temp": 0.7, "top_k": 1}) is None
    assert "greedy" in greedy_refusal((), {"temp": 0.7})
    assert "greedy" in greedy_refusal((), {"temp": -1.0, "top_k": 1})
    assert "repeat_penalty" in greedy_refusal((), {"temp": 0.0, "repeat_penalty": 1.1})
    assert "grammar" in greedy_refusal((), {"temp": 0.0, "grammar": object()})
    assert greedy_refusal((40,), {}) is not None


def test_bad_draft_settings_are_refused_by_name(llm, tmp_path):
    with pytest.raises(ConfigError, match="draft"):
        AgentMemory(llm, cache_dir=tmp_path, draft="medusa")
    with pytest.raises(ConfigError, match="min_len"):
        NgramDraft(min_len=0)
    with pytest.raises(ConfigError, match="pays"):
        NgramDraft(pays=2.0)
    with AgentMemory(llm, cache_dir=tmp_path) as mem:
        with pytest.raises(ConfigError, match="draft"):
            mem.create_completion("a", "Hello", draft="yes")


def _copy_prompt(llm):
    return llm.tokenize((SYSTEM + "\nRepeat rules 1 to 5 exactly:\nRule 1:").encode())


def test_a_copy_turn_drafts_and_reports_it(llm, tmp_path):
    with AgentMemory(llm, cache_dir=tmp_path, draft="ngram") as mem:
        out = mem.create_completion("planner", _copy_prompt(llm), max_tokens=60, temperature=0)
        turn, stats = mem.last_turn, mem.stats()
        assert out["usage"]["completion_tokens"] == 60
        assert turn.draft_tokens > 0 and turn.draft_accepted > 0
        assert turn.draft_rejected == turn.draft_tokens - turn.draft_accepted
        assert stats.draft_tokens == turn.draft_tokens
        # per call off, and non-greedy sampling: no drafts, still an answer
        mem.create_completion("planner", _copy_prompt(llm), max_tokens=20, temperature=0,
                              draft=False)
        assert mem.last_turn.draft_tokens == 0
        out = mem.create_completion("critic", _copy_prompt(llm), max_tokens=20, temperature=0.8,
                                    seed=1)
        assert mem.last_turn.draft_tokens == 0 and out["choices"][0]["text"]
    with AgentMemory(llm, cache_dir=tmp_path) as mem:  # off by default, on per call
        mem.create_completion("writer", _copy_prompt(llm), max_tokens=30, temperature=0)
        assert mem.last_turn.draft_tokens == 0
        mem.create_completion("writer2", _copy_prompt(llm), max_tokens=30, temperature=0,
                              draft="ngram")
        assert mem.last_turn.draft_tokens > 0


@pytest.mark.parametrize("stop_after", [1, 2, 5, 9, 17, 33])
def test_stopping_anywhere_leaves_generates_bookkeeping(llm, tmp_path, stop_after):
    """A caller may stop a drafting generate at any token, inside an accepted run too: the
    context must then hold what an undrafted generate leaves (the yielded token not yet
    evaluated, the last logits the ones it was chosen from)."""
    prompt = _copy_prompt(llm)
    with AgentMemory(llm, cache_dir=tmp_path, draft="ngram") as mem:
        with mem.agent("planner") as live:
            out = []
            for tok in live.generate(prompt, temp=0.0):
                out.append(tok)
                if len(out) == stop_after:
                    break
            n = live.n_tokens
            assert n == len(prompt) + stop_after - 1
            assert live.input_ids[:n].tolist() == list(prompt) + out[:-1]
            assert int(np.argmax(last_logits(live))) == out[-1]
        assert mem.last_turn.draft_tokens > 0 or stop_after == 1


def test_streaming_a_drafted_turn_gives_the_same_text(llm, tmp_path):
    with AgentMemory(llm, cache_dir=tmp_path, draft="ngram") as mem:
        whole = mem.create_completion("a", _copy_prompt(llm), max_tokens=50, temperature=0)
        chunks = mem.create_completion("b", _copy_prompt(llm), max_tokens=50, temperature=0,
                                       stream=True)
        streamed = "".join(c["choices"][0]["text"] for c in chunks)
        assert mem.last_turn.draft_accepted > 0
    assert streamed == whole["choices"][0]["text"]


def _chain(mem, agent, llm, evict):
    """The copy-heavy chain as ``agent``; ``evict`` runs another agent between turns."""
    def step(messages):
        out = mem.create_chat_completion(agent, messages=messages, temperature=0, max_tokens=40)
        step.logits = last_logits(llm)
        step.drafted += mem.last_turn.draft_tokens
        step.sources.append(mem.last_turn.source)
        if evict:
            mem.create_completion("critic", "Hello there", max_tokens=3, temperature=0)
        return out
    step.drafted, step.sources = 0, []
    answers = chat_chain(step, questions=COPY_QUESTIONS)
    return answers, step


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_a_drafting_agent_restored_equals_one_never_evicted(llm, tmp_path, tier):
    """The exactness proof with drafting on in both runs: tokens and logits equal."""
    with AgentMemory(llm, cache_dir=tmp_path / "ref", draft="ngram") as mem:
        ref_answers, ref = _chain(mem, "planner", llm, evict=False)
    assert ref.sources == ["cold"] + ["live"] * (len(COPY_QUESTIONS) - 1)
    budget = "1GiB" if tier == "ram" else 0
    with AgentMemory(llm, cache_dir=tmp_path / "ev", ram_budget=budget, draft="ngram") as mem:
        answers, got = _chain(mem, "planner", llm, evict=True)
    assert got.sources == ["cold"] + [tier] * (len(COPY_QUESTIONS) - 1)
    assert got.drafted > 0
    assert answers == ref_answers
    assert np.array_equal(got.logits, ref.logits)


def test_a_drafting_agent_restored_in_a_new_process_equals_one_never_evicted(llm, tmp_path):
    with AgentMemory(llm, cache_dir=tmp_path / "ref", draft="ngram") as mem:
        ref_answers, ref = _chain(mem, "planner", llm, evict=False)
    step = new_process_step(tmp_path, max_tokens=40, draft="ngram")
    answers = chat_chain(step, questions=COPY_QUESTIONS)
    results = step.results
    assert [r["source"] for r in results] == ["cold"] + ["disk"] * (len(COPY_QUESTIONS) - 1)
    assert sum(r["drafted"] for r in results) > 0
    assert answers == ref_answers
    assert results[-1]["logits"] == xxhash.xxh3_128_hexdigest(ref.logits.tobytes())
