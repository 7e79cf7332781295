"""A small cache written on one machine, for tests/crossarch_check.py to open on another.

    python tests/foreign_cache.py DIR

runs one turn of agent "planner" with the test suite's settings (conftest.make_llm) into the
cache DIR, and writes DIR/origin.json: this machine's architecture and llama.cpp build, and
hashes of the prompt's tokens, of the KV llama.cpp computed for them and of the last logits.
scripts/arm64.sh runs it on x86_64 and under aarch64 emulation, then the test on the other one.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import sys
from typing import Any, Dict

import llama_cpp
import numpy as np
import xxhash

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import last_logits, make_llm  # noqa: E402

# ~70 tokens: a turn under emulation takes seconds, not minutes
PROMPT = "You are a careful planner. " + " ".join(f"Rule {i}: check step {i}." for i in range(8))
QUESTION = "\nQ: What is the first step?\nA:"


def computed(llm: Any, text: str) -> Dict[str, Any]:
    """Hashes of what this machine computes for ``text`` from an empty context."""
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    tokens = llm.tokenize(text.encode())
    llm.eval(tokens)
    n = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    buf = (ctypes.c_uint8 * n)()
    llama_cpp.llama_state_seq_get_data(llm.ctx, buf, n, 0)
    return {"tokens": xxhash.xxh3_64_hexdigest(np.asarray(tokens, np.int32).tobytes()),
            "kv": xxhash.xxh3_64_hexdigest(bytes(buf)),
            "logits": xxhash.xxh3_64_hexdigest(last_logits(llm).tobytes())}


def main(cache_dir: str) -> None:
    from agentkv import AgentMemory
    llm = make_llm()
    with AgentMemory(llm, cache_dir=cache_dir) as mem:
        out = mem.create_completion("planner", PROMPT, max_tokens=4, temperature=0)
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    origin = {"machine": platform.machine(), "system_info": " ".join(info.split()),
              "answer": out["choices"][0]["text"], **computed(llm, PROMPT)}
    with open(os.path.join(cache_dir, "origin.json"), "w") as f:
        json.dump(origin, f, indent=1)
    llm.close()
    print(json.dumps(origin))


if __name__ == "__main__":
    main(sys.argv[1])
