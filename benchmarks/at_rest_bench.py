"""Storage modes side by side: bytes per token on disk and returning-agent restore time.

Command::

    .venv/bin/python benchmarks/at_rest_bench.py [--sizes 2000,4000] [--repeats 3] [--json out.json]

For each context length and each mode (exact f16, live q8_0, live q4_0, f16 live with q8_0 /
q4_0 / iq4_nl at rest): one agent of that length is stored (``ram_budget=0``, so every return
reads disk), displaced by a small agent, and brought back ``--repeats`` times with no new
tokens. Reports the bytes on disk per token of context (KV only: the carried logits, 1 MB of
float32 per agent, are counted apart; the lossy at-rest modes do not store them), the ratio to exact f16, the median restore time (read,
checks, transcoding back, set_data: ``last_turn.restore_seconds``) and its ratio to the exact
restore measured in the same run, and the re-prefill time of the same context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from llama_cpp import Llama

import benchutil as bu
from agentkv import AgentMemory

MODES = [("f16 exact", {}, None), ("live q8_0", {"type_k": 8, "type_v": 8}, None),
         ("live q4_0", {"type_k": 2, "type_v": 2}, None), ("q8_0 at rest", {}, "q8_0"),
         ("q4_0 at rest", {}, "q4_0"), ("iq4_nl at rest", {}, "iq4_nl")]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(model: str, kw: Dict[str, Any], at_rest: Optional[str], tokens: List[int],
            repeats: int, threads: int) -> Dict[str, float]:
    llm = Llama(model_path=model, n_ctx=len(tokens) + 256, flash_attn=True, n_threads=threads,
                verbose=False, **kw)
    try:
        t0 = time.perf_counter()
        llm.eval(tokens)
        prefill = time.perf_counter() - t0
        llm.reset()
        with tempfile.TemporaryDirectory() as tmp, \
                AgentMemory(llm, cache_dir=tmp, ram_budget=0, at_rest=at_rest) as mem:
            mem.create_completion("long", tokens, max_tokens=1, temperature=0)
            mem.create_completion("other", tokens[:16], max_tokens=1, temperature=0)
            mem.flush()
            (info,) = [a for a in mem.agents() if a.agent_id == "long"]
            kv_bytes = info.nbytes - (0 if at_rest else 4 * llm.n_vocab())  # lossy: no logits
            restores = []
            for _ in range(repeats):
                mem.create_completion("long", tokens, max_tokens=1, temperature=0)
                assert mem.last_turn.source == "disk", mem.last_turn
                restores.append(mem.last_turn.restore_seconds)
                mem.create_completion("other", tokens[:16], max_tokens=1, temperature=0)
            return {"kv_bytes": kv_bytes, "bytes_per_token": kv_bytes / len(tokens),
                    "restore_ms": statistics.median(restores) * 1e3, "prefill_ms": prefill * 1e3}
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bu.add_common_args(ap)
    ap.add_argument("--sizes", default="2000,4000")
    args = bu.parse_common(ap)
    probe = Llama(model_path=args.model, n_ctx=64, verbose=False, vocab_only=True)
    text = " ".join(f"Record {i}: shipment {i * 7 % 31} left dock {i % 5} at hour {i % 24}."
                    for i in range(1500)).encode()
    all_tokens = probe.tokenize(text)
    result: Dict[str, Any] = {}
    for n in [int(x) for x in args.sizes.split(",")]:
        tokens = all_tokens[:n]
        rows = {}
        for name, kw, at_rest in MODES:
            log(f"[{n} tokens] {name} ...")
            rows[name] = measure(args.model, kw, at_rest, tokens, args.repeats, args.threads)
        base = rows["f16 exact"]
        print(f"\n{n}-token context (KV bytes on disk; carried logits, 1.05 MB per agent, apart)")
        print(f"{'mode':16s} {'B/token':>9s} {'smaller':>8s} {'restore':>10s} {'vs exact':>9s} "
              f"{'re-prefill':>11s} {'prefill/restore':>15s}")
        for name, r in rows.items():
            r["smaller_than_f16"] = base["bytes_per_token"] / r["bytes_per_token"]
            r["restore_vs_exact"] = r["restore_ms"] / base["restore_ms"]
            print(f"{name:16s} {r['bytes_per_token']:9.0f} {r['smaller_than_f16']:7.2f}x "
                  f"{r['restore_ms']:8.1f}ms {r['restore_vs_exact']:8.2f}x {r['prefill_ms']:9.0f}ms "
                  f"{r['prefill_ms'] / r['restore_ms']:14.0f}x")
        result[str(n)] = rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
