"""Shared prefixes and incremental saves, measured on the default model (issue 3's figures).

Command::

    .venv/bin/python benchmarks/prefix_bench.py [--block-tokens 256] [--json out.json]

1. Density: four agents share a 1,024-token system prompt, each with its own 512-token
   history (token lists, so the counts are exact). Disk bytes of the block store against four
   whole states: llama.cpp's sequence state of each agent (what a whole-file store writes;
   our own whole snapshot adds the SWA margin and the carried logits, also printed).
2. A fifth agent with the same system prompt: prompt tokens it evaluates (bound: prompt -
   1,024 + one block) and its TTFT against a cold first turn of the same prompt (median of
   ``--repeats`` runs each, ratio from this run).
3. Incremental saves: one agent grows to ~4,000 tokens, then adds ~100 tokens per turn;
   bytes written per save against (100 + one block) x bytes per token x 1.2, where bytes per
   token is the KV one token owns in every layer (base and SWA caches, cell record included).

Progress goes to stderr; the figures to stdout (and ``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import llama_cpp
from llama_cpp import Llama

import benchutil as bu
from agentkv import AgentMemory

SYSTEM_TOKENS = 1024
HISTORY_TOKENS = 512


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def words(seed: str, n: int) -> str:
    return " ".join(f"{seed} item {i} says value {(i * 7) % 31} matters for step {i % 13}."
                    for i in range(n))


def exact_tokens(llm: Llama, text: str, n: int, bos: bool) -> List[int]:
    toks = llm.tokenize(text.encode(), add_bos=bos)
    if len(toks) < n:
        raise SystemExit(f"text too short for {n} tokens")
    return toks[:n]


def first_token_seconds(call) -> float:
    t0 = time.perf_counter()
    for _ in call():
        return time.perf_counter() - t0
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bu.add_common_args(ap)
    ap.add_argument("--block-tokens", type=int, default=256)
    args = bu.parse_common(ap)
    B = args.block_tokens
    llm = Llama(model_path=args.model, n_ctx=8192, flash_attn=True, n_threads=args.threads,
                verbose=False)
    system = exact_tokens(llm, words("system", 400), SYSTEM_TOKENS, bos=True)
    result: Dict[str, Any] = {"block_tokens": B, "model": args.model}

    with tempfile.TemporaryDirectory() as tmp:
        # 1. density ---------------------------------------------------------------------
        mem = AgentMemory(llm, cache_dir=tmp, ram_budget=0, block_tokens=B)
        seq_states, snapshots = [], []
        for i in range(4):
            prompt = system + exact_tokens(llm, words(f"agent{i} history", 200), HISTORY_TOKENS, bos=False)
            log(f"[density] agent {i}: {len(prompt)} prompt tokens")
            mem.create_completion(f"agent{i}", prompt, max_tokens=4, temperature=0)
            seq_states.append(llama_cpp.llama_state_seq_get_size(llm.ctx, 0))
            snapshots.append(mem.inspect().live_state_bytes())
            log(f"[density]   source={mem.last_turn.source} evaluated={mem.last_turn.prompt_tokens_evaluated}")
        mem.flush()
        disk = mem.stats().disk_bytes
        result["density"] = {
            "agents": 4, "system_tokens": SYSTEM_TOKENS, "history_tokens": HISTORY_TOKENS,
            "disk_bytes": disk, "whole_seq_states": sum(seq_states),
            "whole_snapshots": sum(snapshots),
            "ratio_vs_seq_states": sum(seq_states) / disk,
            "ratio_vs_snapshots": sum(snapshots) / disk,
            "cuts": [c.n_tokens for c in mem.inspect().cuts()],
        }

        # 2. a fifth agent ---------------------------------------------------------------
        prompt5 = system + exact_tokens(llm, words("agent5 own", 200), HISTORY_TOKENS, bos=False)
        stream = lambda m, name: m.create_completion(name, prompt5, max_tokens=4, temperature=0,
                                                     stream=True)
        prefix_t, evaluated = [], []
        for r in range(args.repeats):
            if r:
                mem.forget(f"agent5-{r - 1}")  # each run is a new agent's first turn
            prefix_t.append(first_token_seconds(lambda: stream(mem, f"agent5-{r}")))
            evaluated.append(mem.last_turn.prompt_tokens_evaluated)
            log(f"[fifth] prefix run {r}: {prefix_t[-1] * 1e3:.1f} ms, source={mem.last_turn.source}, "
                f"evaluated={evaluated[-1]}")
            assert mem.last_turn.source == "prefix", mem.last_turn
        mem.close()
        cold_t = []
        for r in range(args.repeats):
            with tempfile.TemporaryDirectory() as empty, \
                    AgentMemory(llm, cache_dir=empty, ram_budget=0, block_tokens=B) as cold:
                cold_t.append(first_token_seconds(lambda: stream(cold, "fresh")))
                log(f"[fifth] cold run {r}: {cold_t[-1] * 1e3:.1f} ms, source={cold.last_turn.source}")
        result["fifth_agent"] = {
            "prompt_tokens": len(prompt5), "evaluated": evaluated[0],
            "bound": len(prompt5) - SYSTEM_TOKENS + B,
            "ttft_prefix_ms": statistics.median(prefix_t) * 1e3,
            "ttft_cold_ms": statistics.median(cold_t) * 1e3,
            "ratio": statistics.median(cold_t) / statistics.median(prefix_t),
        }

    # 3. incremental saves -----------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp, \
            AgentMemory(llm, cache_dir=tmp, ram_budget=0, block_tokens=B) as mem:
        tokens = exact_tokens(llm, words("long history", 1200), 4000, bos=True)
        log("[saves] building a 4,000-token agent")
        mem.create_completion("long", tokens, max_tokens=1, temperature=0)
        mem.flush()
        shape = mem.inspect().record("long").shape
        per_token = sum(12 + sum(r for _, r in s["k"]) + sum(r for _, r in s["v"])
                        for c in shape["caches"] for s in c if s)
        more = llm.tokenize(words("turn", 600).encode(), add_bos=False)
        saves = []
        history = list(mem.inspect().live()[1])
        for t in range(6):
            history = history + more[t * 100:(t + 1) * 100]
            before = mem.stats().bytes_written
            mem.create_completion("long", history, max_tokens=1, temperature=0)
            history = list(mem.inspect().live()[1])
            mem.flush()
            written = mem.stats().bytes_written - before
            saves.append(written)
            log(f"[saves] turn {t}: {mem.last_turn.prompt_tokens_evaluated} tokens evaluated, "
                f"{written / 1e6:.2f} MB written, context {len(history)} tokens")
        bound = (100 + B) * per_token * 1.2
        result["saves"] = {
            "bytes_per_token": per_token, "logits_bytes": llm.n_vocab() * 4,
            "per_save_bytes": saves, "max_save_bytes": max(saves),
            "bound_bytes": bound, "max_save_over_bound": max(saves) / bound,
            "whole_state_bytes": llama_cpp.llama_state_seq_get_size(llm.ctx, 0),
        }

    d, f, s = result["density"], result["fifth_agent"], result["saves"]
    print(f"block_tokens={B}")
    print(f"1. density: disk {d['disk_bytes'] / 1e6:.1f} MB vs 4 whole seq states "
          f"{d['whole_seq_states'] / 1e6:.1f} MB ({d['ratio_vs_seq_states']:.2f}x smaller), "
          f"vs 4 whole snapshots {d['whole_snapshots'] / 1e6:.1f} MB ({d['ratio_vs_snapshots']:.2f}x); "
          f"cuts stored at {d['cuts']}")
    print(f"2. fifth agent: evaluated {f['evaluated']} of {f['prompt_tokens']} prompt tokens "
          f"(bound {f['bound']}); TTFT {f['ttft_prefix_ms']:.1f} ms vs cold {f['ttft_cold_ms']:.1f} ms "
          f"= {f['ratio']:.1f}x")
    print(f"3. saves at ~4,000 tokens +100/turn: max {s['max_save_bytes'] / 1e6:.2f} MB per save "
          f"(incl. {s['logits_bytes'] / 1e6:.2f} MB logits) vs bound {s['bound_bytes'] / 1e6:.2f} MB "
          f"({s['max_save_over_bound']:.2f} of it); whole state {s['whole_state_bytes'] / 1e6:.1f} MB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
