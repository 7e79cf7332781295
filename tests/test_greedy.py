"""Greedy sampling by argmax (agentkv/_llama/greedy.py) picks what llama.cpp's sampler picks."""

from __future__ import annotations

import llama_cpp
import numpy as np
from llama_cpp import Llama

from agentkv import AgentMemory
from agentkv._llama.greedy import plain_greedy
from conftest import make_llm

PROMPT = "List the planets of the solar system, one per line, with one fact about each:\n"


def _llama_picks(llm) -> int:
    """llama.cpp's own greedy pick of the last logits row (the chain generate would build)."""
    llm._sampler = llm._init_sampler(temp=0.0)
    return Llama.sample(llm, temp=0.0, idx=llm.n_tokens - 1)


def _row(llm) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def _cold(llm, **kw) -> str:
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    return llm.create_completion(PROMPT, temperature=0, **kw)["choices"][0]["text"]


def test_wrapped_greedy_turns_equal_the_bare_llama(tmp_path):
    llm = make_llm(n_ctx=2048)
    ref = _cold(llm, max_tokens=48)
    penalised = _cold(llm, max_tokens=24, repeat_penalty=1.3)
    assert penalised != ref[:len(penalised)]  # the penalty changes the text: a real check
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    with AgentMemory(llm, cache_dir=tmp_path) as mem:
        assert "sample" in llm.__dict__  # installed while wrapped
        out = mem.create_completion("a", PROMPT, max_tokens=48, temperature=0)
        assert out["choices"][0]["text"] == ref
        out = mem.create_completion("b", PROMPT, max_tokens=24, temperature=0, repeat_penalty=1.3)
        assert out["choices"][0]["text"] == penalised  # llama.cpp's sampler: not plain greedy
    assert "sample" not in llm.__dict__  # gone with the wrapper


def test_ties_nan_and_other_settings():
    llm = make_llm(n_ctx=512)
    llm.eval(llm.tokenize(PROMPT.encode()))
    idx = {"idx": llm.n_tokens - 1}
    row = _row(llm)
    assert plain_greedy(llm, (), {"temp": 0.0, **idx}) == _llama_picks(llm) == int(row.argmax())
    top = float(row.max())
    row[[7, 4000, 90000]] = top + 1.0  # a three-way tie: both take the first of them
    assert plain_greedy(llm, (), {"temp": 0.0, **idx}) == _llama_picks(llm) == 7
    row[7] = np.nan  # llama.cpp compares past a NaN; left to it
    assert plain_greedy(llm, (), {"temp": 0.0, **idx}) is None
    assert _llama_picks(llm) != 7
    for other in ({"temp": 0.7}, {"temp": 0.0, "repeat_penalty": 1.1},
                  {"temp": 0.0, "presence_penalty": 0.5}, {"temp": 0.0, "grammar": object()},
                  {"temp": 0.0, "logits_processor": [lambda ids, x: x]}):
        assert plain_greedy(llm, (), {**other, **idx}) is None
    assert plain_greedy(llm, (0.0,), idx) is None  # by position: not how generate calls it
    assert plain_greedy(llm, (), {"temp": 0.0}) is None  # no idx: not how generate calls it
