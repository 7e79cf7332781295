"""A worker process for the shared-tier tests: its own Llama and AgentMemory on its own
cache_dir, one shared Redis; commands as JSON lines on stdin, one JSON reply per line.

    python shared_worker.py CACHE_DIR REDIS_URL

Commands: {"op": "chat", "agent": A, "messages": [...], "max_tokens": N} -> the answer, where
the agent's KV came from, the tokens evaluated and a hash of the last logits;
{"op": "stats"} -> MemoryStats as a dict; {"op": "quit"}.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import xxhash

from agentkv import AgentMemory
from conftest import last_logits, make_llm


def main() -> None:
    cache_dir, url = sys.argv[1], sys.argv[2]
    llm = make_llm()
    with AgentMemory(llm, cache_dir=cache_dir, shared=url) as mem:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            if cmd["op"] == "stats":
                print(json.dumps(dataclasses.asdict(mem.stats())), flush=True)
                continue
            out = mem.create_chat_completion(cmd["agent"], messages=cmd["messages"],
                                             temperature=0, max_tokens=cmd["max_tokens"])
            turn = mem.last_turn
            print(json.dumps({"answer": out["choices"][0]["message"]["content"],
                              "source": turn.source, "evaluated": turn.prompt_tokens_evaluated,
                              "logits": xxhash.xxh3_128_hexdigest(last_logits(llm).tobytes())}),
                  flush=True)


if __name__ == "__main__":
    main()
