"""A second process for the store tests: its own Llama and AgentMemory on a given cache_dir.

    python store_worker.py CACHE_DIR PREFIX TURNS [--forever]

Runs agents PREFIX-0..2 for TURNS rounds (every return through disk), or, with --forever,
keeps growing and flushing one agent until it is killed.
"""

from __future__ import annotations

import sys

from agentkv import AgentMemory
from conftest import make_llm
from test_sharing import SHARED


def main() -> None:
    cache_dir, prefix, turns = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = make_llm(n_ctx=2048)
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=0, block_tokens=64) as mem:
        if "--forever" in sys.argv:
            text = SHARED[:1500]
            i = 0
            while True:
                text += f" Step {i}: more words for the record."
                mem.create_completion(f"{prefix}-victim", text, max_tokens=1, temperature=0)
                mem.flush()
                print("saved", i, flush=True)
                i += 1
        for t in range(turns):
            for a in range(3):
                mem.create_completion(f"{prefix}-{a}", f"{SHARED[:1500]} Agent {prefix}-{a}, turn {t}:",
                                      max_tokens=2, temperature=0)
        print("done", mem.stats().hits, flush=True)


if __name__ == "__main__":
    main()
