"""What the previous agent's save costs the turn that runs beside it: turns of agents that
return from disk, alternately right after the previous turn (its save still running in the
background writer) and after ``mem.flush()`` (nothing running), interleaved in one run.

```bash
.venv/bin/python benchmarks/turn_beside_save.py --ctx-tokens 4000 --turns 24 --max-tokens 16 \\
    --json benchmarks/results/turn_beside_save_4000.json
```

Every agent has ``--ctx-tokens`` tokens and ``ram_budget=0``, so every turn's end queues a
save of the whole state's new blocks and tail (~24 MB at 4,000 tokens on Gemma 3 270M), and
every return reads disk. Conditions alternate in pairs whose order flips from pair to pair,
so that a drift of the machine falls on both. The figures are medians of each turn's time to
first token and of the time from its first token to its last (the decode), per condition.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil as bu  # noqa: E402
from agent_memory_bench import context_text, ttft_and_decode, user_message  # noqa: E402

from agentkv import AgentMemory  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bu.add_common_args(ap, repeats=1)
    ap.add_argument("--ctx-tokens", type=int, default=4000)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--turns", type=int, default=24, help="timed turns (half of each kind)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens each turn decodes")
    ap.add_argument("--cache-root", default=None, help="where the cache directory is made")
    args = bu.parse_common(ap, argv)
    n_ctx = max(4096, args.ctx_tokens + (args.turns // args.agents + 2) * (args.max_tokens + 40)
                + 512)
    llm = bu.load_llm(args.model, n_ctx, args.threads)
    names = [f"agent{i}" for i in range(args.agents)]
    history = {a: llm.tokenize(context_text(i, steps=max(40, args.ctx_tokens // 25)).encode())
               [: args.ctx_tokens] for i, a in enumerate(names)}
    cache_dir = tempfile.mkdtemp(prefix="agentkv-besidesave-", dir=args.cache_root)
    progress = bu.Progress(len(names) + args.turns, label=f"turn beside a save {args.ctx_tokens}")
    rows: List[Dict[str, Any]] = []
    try:
        with AgentMemory(llm, cache_dir=cache_dir, ram_budget=0, disk_budget="50GiB") as mem:
            for a in names:  # build (untimed)
                mem.create_completion(a, history[a], max_tokens=1, temperature=0)
                history[a] = [int(t) for t in llm.input_ids[: llm.n_tokens]]
                progress.step(f"build {a}")
            for t in range(args.turns):
                a = names[t % len(names)]
                beside = (t % 2 == 0) == ((t // 2) % 2 == 0)  # pairs, their order flipping
                if not beside:
                    mem.flush()  # untimed: the previous turn's save has landed
                prompt = history[a] + llm.tokenize(user_message(t % len(names), t).encode(),
                                                   add_bos=False)[:32]
                m = ttft_and_decode(mem.create_completion(a, prompt, max_tokens=args.max_tokens,
                                                          temperature=0, stream=True))
                history[a] = [int(x) for x in llm.input_ids[: llm.n_tokens]]
                rows.append({"turn": t, "beside_save": beside, "source": mem.last_turn.source, **m})
                progress.step(f"turn {t} {'beside a save' if beside else 'after flush'}: "
                              f"ttft {m['ttft_s'] * 1e3:.1f} ms, decode {m['decode_s'] * 1e3:.1f} ms")
            hits = dict(mem.stats().hits)
    finally:
        llm.close()
        shutil.rmtree(cache_dir, ignore_errors=True)

    def med(key: str, beside: bool) -> float:
        return statistics.median(r[key] for r in rows if r["beside_save"] == beside) * 1e3

    summary = {f"{k}_ms_{'beside' if b else 'alone'}": med(k, b)
               for k in ("ttft_s", "decode_s") for b in (True, False)}
    summary.update(turns=len(rows), max_tokens=args.max_tokens, hits=hits,
                   decode_cost=summary["decode_s_ms_beside"] / summary["decode_s_ms_alone"] - 1)
    print(bu.machine_line())
    print(f"ctx_tokens={args.ctx_tokens} agents={args.agents} turns={len(rows)} "
          f"max_tokens={args.max_tokens} threads={args.threads}; hits {hits}")
    print(f"decode (first to last token): {summary['decode_s_ms_beside']:.1f} ms beside the "
          f"previous agent's save, {summary['decode_s_ms_alone']:.1f} ms after a flush: "
          f"{100 * summary['decode_cost']:+.1f}%")
    print(f"time to first token: {summary['ttft_s_ms_beside']:.1f} ms beside, "
          f"{summary['ttft_s_ms_alone']:.1f} ms after a flush")
    bu.write_json(args.json, {"machine": bu.machine(), "args": vars(args), "summary": summary,
                              "turns": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
