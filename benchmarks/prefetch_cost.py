"""What a prefetch costs the turn it runs during: paired turns, interleaved in one run.

```bash
.venv/bin/python benchmarks/prefetch_cost.py --ctx-tokens 4000 --pairs 12 --max-tokens 8 \
    --json benchmarks/results/prefetch_cost_4000.json
```

One ``AgentMemory`` (RAM for about one and a half agents) holds a host agent and G guests of
``--ctx-tokens`` tokens each, all on disk. Each pair runs two turns of the host, live in the
context at both (an untimed turn brings it back before the pair), in an order
that alternates from pair to pair so that a drift of the machine's speed falls on both sides:
one turn asks ``mem.prefetch(guest)`` as its first token arrives (a cold read: the page cache
is dropped before it), the other asks nothing. The figure is each turn's time from its first
token to its end (the decode of ``--max-tokens`` tokens, and the end of the turn), with and
without the read running beside it. After each pair the guest takes its turn (untimed): the
read is used, and the next pair's guest is another agent, cold again.

``benchmarks/agent_memory_bench.py --prefetch`` measures the same thing on its own schedule,
but its two modes run one after the other, so a drift of the machine between them shows up
as a cost (or a gain) of the prefetch; here each pair's two turns are a second apart.
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
    ap.add_argument("--guests", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens each timed turn decodes")
    ap.add_argument("--cache-root", default=None, help="where the cache directory is made")
    args = bu.parse_common(ap, argv)
    n_ctx = max(4096, args.ctx_tokens + args.pairs * 2 * (args.max_tokens + 40) + 512)
    llm = bu.load_llm(args.model, n_ctx, args.threads)
    names = ["host"] + [f"guest{g}" for g in range(args.guests)]
    history = {a: llm.tokenize(context_text(i, steps=max(40, args.ctx_tokens // 25)).encode())
               [: args.ctx_tokens] for i, a in enumerate(names)}
    cache_dir = tempfile.mkdtemp(prefix="agentkv-pfcost-", dir=args.cache_root)
    progress = bu.Progress(len(names) + 3 * args.pairs, label=f"prefetch cost {args.ctx_tokens}")
    rows: List[Dict[str, Any]] = []
    try:
        with AgentMemory(llm, cache_dir=cache_dir + "-probe", ram_budget="10GiB") as probe:
            probe.create_completion("probe", history["host"], max_tokens=1, temperature=0)
            probe.create_completion("other", "Hi", max_tokens=1, temperature=0)
            one = [a for a in probe.agents() if a.agent_id == "probe"][0].nbytes  # in RAM
        shutil.rmtree(cache_dir + "-probe", ignore_errors=True)
        budget = int(one * 1.5)
        with AgentMemory(llm, cache_dir=cache_dir, ram_budget=budget, disk_budget="50GiB") as mem:
            for a in names:  # build: each agent's context, then on disk only (untimed)
                mem.create_completion(a, history[a], max_tokens=1, temperature=0)
                history[a] = [int(t) for t in llm.input_ids[: llm.n_tokens]]
                progress.step(f"build {a}")
            for a in names:
                mem.evict(a)
            for p in range(args.pairs):
                guest = names[1 + p % args.guests]
                order = (True, False) if p % 2 == 0 else (False, True)
                # untimed: the host comes back, so that both timed turns start with it live
                mem.create_completion("host", history["host"], max_tokens=1, temperature=0)
                history["host"] = [int(t) for t in llm.input_ids[: llm.n_tokens]]
                for with_prefetch in order:
                    bu.drop_page_cache(cache_dir, keep_open=True)  # untimed
                    prompt = history["host"] + llm.tokenize(user_message(0, 2 * p + with_prefetch)
                                                            .encode(), add_bos=False)[:32]
                    m = ttft_and_decode(  # the read is asked as the first token arrives
                        mem.create_completion("host", prompt, max_tokens=args.max_tokens,
                                              temperature=0, stream=True),
                        on_first=(lambda: mem.prefetch(guest)) if with_prefetch else None)
                    history["host"] = [int(t) for t in llm.input_ids[: llm.n_tokens]]
                    if with_prefetch:  # the read is over before the other turn of the pair
                        held = mem.inspect().prefetched(guest)
                        m["prefetched"] = held is not None
                    rows.append({"pair": p, "prefetch": with_prefetch, "guest": guest, **m})
                    progress.log(f"pair {p:2d} {'with   ' if with_prefetch else 'without'} "
                                 f"prefetch of {guest}: first token to end "
                                 f"{m['after_first_s'] * 1e3:7.1f} ms ({m['generated']} tokens)")
                    progress.step(f"pair {p}")
                mem.create_completion(guest, history[guest], max_tokens=1, temperature=0)
                if mem.last_turn.source != "prefetch":
                    progress.log(f"  {guest}'s turn came from {mem.last_turn.source}, not the "
                                 f"prefetch")
                history[guest] = [int(t) for t in llm.input_ids[: llm.n_tokens]]
                mem.evict(guest)
                progress.step(f"{guest}'s turn")
            hits = dict(mem.stats().hits)
    finally:
        llm.close()
        shutil.rmtree(cache_dir, ignore_errors=True)
    pairs = {}
    for r in rows:
        pairs.setdefault(r["pair"], {})[r["prefetch"]] = r["after_first_s"]
    ratios = [v[True] / v[False] for v in pairs.values() if len(v) == 2]
    parts = {f"{k}_ms_{'with' if w else 'without'}": statistics.median(r[k] for r in rows
                                                                       if r["prefetch"] == w) * 1e3
             for k in ("decode_s", "end_of_turn_s") for w in (True, False)}
    with_pf = statistics.median(r["after_first_s"] for r in rows if r["prefetch"])
    without = statistics.median(r["after_first_s"] for r in rows if not r["prefetch"])
    summary = {"pairs": len(ratios), "max_tokens": args.max_tokens,
               "after_first_ms_with_prefetch": with_pf * 1e3,
               "after_first_ms_without": without * 1e3, "slowdown": with_pf / without - 1.0,
               "median_pairwise_slowdown": statistics.median(ratios) - 1.0,
               "prefetched": sum(1 for r in rows if r.get("prefetched")),
               "hits": hits, **parts}
    print(bu.machine_line())
    print(f"ctx_tokens={args.ctx_tokens} guests={args.guests} pairs={args.pairs} "
          f"max_tokens={args.max_tokens} threads={args.threads}; hits {hits}")
    print(f"prefetch cost ({summary['pairs']} pairs, first token to end of turn): "
          f"{with_pf * 1e3:.1f} ms with a cold prefetch beside it, {without * 1e3:.1f} ms "
          f"without: {100 * summary['slowdown']:+.1f}% (median of per-pair ratios "
          f"{100 * summary['median_pairwise_slowdown']:+.1f}%); "
          f"{summary['prefetched']} of {summary['pairs']} reads kept")
    print(f"  of which decode (first to last token) {parts['decode_s_ms_with']:.1f} ms with, "
          f"{parts['decode_s_ms_without']:.1f} ms without; end of the turn (its save) "
          f"{parts['end_of_turn_s_ms_with']:.1f} ms with, {parts['end_of_turn_s_ms_without']:.1f} "
          f"ms without")
    bu.write_json(args.json, {"machine": bu.machine(), "args": vars(args), "summary": summary,
                              "turns": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
