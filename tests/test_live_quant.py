"""A Llama whose live KV cache is q8_0 or q4_0 is restored exactly, from RAM and from disk."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from agentkv import AgentMemory
from conftest import QUESTIONS, chat_chain, last_logits, make_llm, plain_step

# ~560 tokens: past Gemma 3's 512-token sliding window (SWA trimming and padding run on
# quantized rows), short enough to keep the slower q4_0 prefill cheap.
SYSTEM = "You are a meticulous planner. " + " ".join(
    f"Rule {i}: always check step {i} twice before moving on." for i in range(36))

LIVE_TYPES = {"q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


@pytest.fixture(scope="module", params=sorted(LIVE_TYPES))
def quant_llm(request):
    t = LIVE_TYPES[request.param]
    llm = make_llm(n_ctx=1024, type_k=t, type_v=t, flash_attn=True)
    yield llm
    llm.close()


def test_quantized_live_cache_restores_exactly(quant_llm, tmp_path):
    """The planner is displaced by a critic every turn, and pushed to disk every other turn."""
    llm = quant_llm
    questions = QUESTIONS[:3]
    llm.reset()
    ref_answers = chat_chain(plain_step(llm, max_tokens=8), questions, SYSTEM)
    ref_logits = last_logits(llm)

    with AgentMemory(llm, cache_dir=tmp_path, ram_budget="1GiB") as mem:
        turn = iter(range(100))

        def step(messages):
            i = next(turn)
            out = mem.create_chat_completion("planner", messages=messages, temperature=0,
                                             max_tokens=8)
            step.logits = last_logits(llm)
            mem.create_completion("critic", "Check the plan.", max_tokens=2, temperature=0)
            if i % 2 == 1:
                mem.evict("planner")  # the next return comes from disk
            return out

        answers = chat_chain(step, questions, SYSTEM)
        stats = mem.stats()
    assert answers == ref_answers
    assert np.array_equal(step.logits, ref_logits)
    assert stats.hits["ram"] >= 1 and stats.hits["disk"] >= 1 and stats.rejected == 0
