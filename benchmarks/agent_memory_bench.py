"""Returning-agent TTFT: agentkv restore vs naive re-prefill vs the floor, measured in one run.

Commands (BENCHMARKS.md and the README's table come from them; run on a quiet machine)::

    .venv/bin/python benchmarks/agent_memory_bench.py --agents 4 --ram-slots 1 --rounds 3 \\
        --ctx-tokens 4000 --turn-tokens 64 --repeats 3 --json ttft_4000.json --plot ttft_4000.png
    .venv/bin/python benchmarks/agent_memory_bench.py --agents 4 --ram-slots 1 --rounds 3 \\
        --ctx-tokens 4000 --cold-disk --repeats 3 --json ttft_4000_cold.json
    .venv/bin/python benchmarks/agent_memory_bench.py --agents 3 --ram-slots 1 --rounds 2 \\
        --ctx-sweep 512,2000,4000,8000 --json sweep.json --plot sweep.png
    redis-server --port 6390 --bind 127.0.0.1 --save '' --appendonly no --daemonize yes
    .venv/bin/python benchmarks/agent_memory_bench.py --agents 4 --ram-slots 1 --rounds 3 \\
        --ctx-sweep 2000,4000 --shared redis://127.0.0.1:6390/0 --json shared.json
    .venv/bin/python benchmarks/agent_memory_bench.py --agents 4 --rounds 2 --turn-tokens 0 \\
        --ctx-tokens 1536 --system-tokens 1024 --new-agents 1 --repeats 3 --json new_agents.json
    # (the same with --block-tokens 128 / 512: BENCHMARKS.md section 3's other rows)
    # agentkv's peers in the same run: llama-cpp-python's LlamaRAMCache and LlamaDiskCache
    .venv/bin/python benchmarks/agent_memory_bench.py --agents 4 --ram-slots 1 --rounds 3 \\
        --ctx-tokens 4000 --turn-tokens 64 --peers ram,disk --json peers_4000.json

Schedule: N agents, each with its own ~T-token context (round 0 builds them cold), visited
round-robin, so with K RAM slots most returns come from disk. Then R-1 rounds of *resume*
(the agent returns with its context and no new tokens: the reference port's protocol) and
R-1 rounds of *turn* (the agent returns with a U-token user message; ``--turn-tokens 0`` makes
every return a resume). ``--repeats M`` runs the whole schedule M times (fresh cache each time)
and pools the returns. The naive baseline replays the very same prompts on the same Llama with
the KV dropped (a full re-prefill).

TTFT is measured from the caller: from the call until the first streamed token, with the
snapshot of the displaced agent, the disk read, checks and the restore all inside it.
``--cold-disk`` writes back and drops every file of the cache from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)``) before each returning turn, outside the timing;
without it, every file of the cache is read once before each returning turn (untimed), so
that "warm" holds on hosts that page out idle page cache (this VM drops it after 60 s idle).

The floor, measured in the same run on the same Llama from the naive run's own KV (bare
llama-cpp-python calls, no agentkv): for a resume, a bare ``llama_state_seq_set_data`` of the
history's sequence state from RAM (plus, in the issue's definition, tokenizing the prompt
text: reported separately, since the benchmark hands agentkv token ids); for a return from
disk, plus the bytes agentkv read at the read bandwidth measured on the cache's own files
(cold if ``--cold-disk``); for a new turn, bare set_data plus the prefill of the same suffix.
The "exact floor" is the same with the state laid out as an exact restore needs it (its SWA
cache padded by the masked cells ``layout.load_from`` asks for at this thread count).
Prints one line per turn (stderr) and a progress bar, then medians, p90s and ratios; ``--json``
writes everything (machine, versions, per-turn rows, summary); ``--plot`` draws TTFT per turn
(or, with ``--ctx-sweep``, the speedup against context length).

``--prefetch`` runs agentkv with ``AgentMemory(prefetch=True)``: each turn reads the agent
predicted next into RAM (returns counted under tier "prefetch"); with ``--cold-disk``, the
page cache is dropped after that read, so what a return reads is what the prefetch kept. The
same schedule also runs without prefetch (rows "agentkv-plain"), and the time from each turn's
first token to its end is compared turn by turn: what the prefetch costs the turn it runs in.

``--peers ram,disk`` (or ``all``) adds, in the same run, on the same Llama and prompts,
llama-cpp-python's own caches through ``llm.set_cache``: ``LlamaRAMCache`` and ``LlamaDiskCache``,
what a llama-cpp-python user picks today (benchmarks/peers.py says how they behave). Reported
per return kind against naive and agentkv, with the prefix each cache held for the prompt.

``--shared URL`` adds, in the same run, the schedule on two workers (two Llamas in this
process, each with its own cache_dir, one Redis): every return lands on the worker that did
not run the agent's last turn, so it is restored from the shared tier. A "full" return is the
agent's first on that worker (every payload read from Redis); a "delta" one finds the agent's
older turn in the worker's own cache_dir and reads only what changed. Reported against the
single worker's warm-disk returns and naive, with the bytes read from and sent to Redis.

``--new-agents K`` adds, in the same run, K new agents that share a system prompt with a team
(BENCHMARKS.md section 3): ``--agents`` members whose prompts are the same S-token system
prompt (``--system-tokens``, default two thirds of the context) and their own rest of the
context are stored (``ram_budget=0``, untimed; agentkv stores a shared prefix only where a cold
prefill gives the same KV, a multiple of 512 tokens on this model, so S < 512 shares nothing); then each new agent's first turn (same system
prompt, its own rest) is timed. Reported: the prompt tokens it evaluates (bound: prompt - S +
one block, the prefix restored from the members' blocks) and its TTFT against a cold first
turn of the same prompt on an empty cache_dir, medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from llama_cpp import Llama

from agentkv import AgentMemory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil as bu  # noqa: E402
import peers as peermod  # noqa: E402

TOPICS = ["the migration plan", "the failing test suite", "the release notes", "the cost model",
          "the cache design", "the API review", "the user study", "the security audit"]


def context_text(i: int, steps: int = 2000) -> str:
    topic = TOPICS[i % len(TOPICS)]
    lines = [f"Agent {i} works on {topic}."]
    for j in range(steps):
        lines.append(f"Step {j}: agent {i} reviewed part {j} of {topic} and wrote down finding "
                     f"{(j * 7 + i) % 97}, which changes the estimate by {(j * 13) % 11} percent.")
    return " ".join(lines)


def user_message(i: int, r: int) -> str:
    return (f" User: for round {r}, agent {i}, please reconsider the three riskiest findings, "
            f"explain the trade-offs you see between speed and safety, and propose one concrete "
            f"next step with an owner and a date for each of them, in plain words. Keep it short, "
            f"number the items, and flag anything that needs a second opinion. Assistant:")


def ttft_and_decode(chunks, on_first: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """TTFT and decode speed of a stream, timed from before the call that made ``chunks``;
    ``on_first`` runs as the first token arrives (after it is timed)."""
    t0 = time.perf_counter()
    first: Optional[float] = None
    last = t0
    n = 0
    for _ in chunks:
        last = time.perf_counter()
        n += 1
        if first is None:
            first = last
            if on_first is not None:
                on_first()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("the stream produced no token")
    return {"ttft_s": first - t0, "decode_tok_s": (n - 1) / (end - first) if n > 1 else 0.0,
            "generated": n, "after_first_s": end - first, "decode_s": last - first,
            "end_of_turn_s": end - last}


def ram_budget_for(llm: Llama, tokens: List[int], slots: int, block_tokens: int) -> int:
    """A RAM budget that holds ``slots`` snapshots of a ``tokens``-long context."""
    if slots <= 0:
        return 0
    from agentkv._llama.engine import Engine
    bu.clear_kv(llm)
    llm.eval(tokens)
    engine = Engine(llm)  # the snapshot agentkv keeps: window + margin, logits, tokens
    engine.block_tokens = block_tokens
    probe = engine.snapshot().nbytes
    bu.clear_kv(llm)
    return int(probe * (slots + 0.5))


def run_agentkv(llm: Llama, args, contexts, extra, cache_dir: str, ram_budget: int, rep: int,
                progress: bu.Progress, mode: str = "agentkv", prefetch: Optional[bool] = None
                ) -> Tuple[List[dict], List[dict], Any]:
    """The schedule through AgentMemory; returns per-turn rows, the returning prompts, stats.
    ``prefetch``: AgentMemory(prefetch=) (default ``args.prefetch``); ``mode`` labels the rows."""
    records: List[dict] = []
    prompts: List[dict] = []
    history = {a: list(toks) for a, toks in contexts.items()}
    use_prefetch = args.prefetch if prefetch is None else prefetch
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=ram_budget, disk_budget="50GiB",
                     block_tokens=args.block_tokens, prefetch=use_prefetch) as mem:
        for kind, r in schedule(args):
            for i, agent_id in enumerate(history):
                suffix = extra[(i, r)] if kind == "turn" else []
                prompt = history[agent_id] + suffix
                gap = time.perf_counter()  # the untimed work between two turns
                if args.cold_disk and kind != "build":
                    # untimed; files still being written stay, and so do the blocks a
                    # prefetch in flight has open (its readahead; a real program drops nothing)
                    bu.drop_page_cache(cache_dir, keep_open=use_prefetch)
                elif kind != "build":
                    bu.warm_page_cache(cache_dir)  # untimed: warm means in the page cache
                gap = time.perf_counter() - gap
                read_before = mem.stats().bytes_read
                m = ttft_and_decode(mem.create_completion(
                    agent_id, prompt, max_tokens=args.max_tokens, temperature=0, stream=True))
                turn = mem.last_turn
                bytes_read = mem.stats().bytes_read - read_before
                n_hist = len(history[agent_id])
                history[agent_id] = [int(t) for t in llm.input_ids[: llm.n_tokens]]
                rec = {"mode": mode, "repeat": rep, "kind": kind, "round": r,
                       "agent": agent_id, "tier": turn.source, "prompt_tokens": len(prompt),
                       "evaluated": turn.prompt_tokens_evaluated,
                       "restored": turn.prompt_tokens_restored, "bytes_read": bytes_read,
                       "restore_ms": turn.restore_seconds * 1e3,
                       "save_ms": turn.save_seconds * 1e3, "gap_ms": gap * 1e3, **m}
                records.append(rec)
                if kind != "build":
                    prompts.append({"repeat": rep, "kind": kind, "round": r, "agent": agent_id,
                                    "prompt": prompt, "history_len": n_hist})
                progress.log(f"rep {rep} {mode} {kind:6s} r{r} {agent_id}: {turn.source:6s} "
                             f"eval {turn.prompt_tokens_evaluated:5d} tok, "
                             f"TTFT {m['ttft_s'] * 1e3:9.1f} ms, {m['decode_tok_s']:5.1f} tok/s")
                progress.step(f"{mode} r{r}")
        stats = mem.stats()
    return records, prompts, stats


def run_shared(llms: List[Llama], args, contexts, extra, ram_budget: int, rep: int,
               progress: bu.Progress) -> Tuple[List[dict], Dict[str, int]]:
    """The schedule on two workers sharing one Redis: each return lands on the other worker."""
    import uuid

    from agentkv import SharedTier
    namespace = f"agentkv-bench-{uuid.uuid4().hex[:8]}"
    tier = SharedTier(args.shared, namespace=namespace, timeout=10.0)
    dirs = [tempfile.mkdtemp(prefix="agentkv-bench-w", dir=args.cache_root) for _ in llms]
    rows: List[dict] = []
    history = {a: list(toks) for a, toks in contexts.items()}
    last: Dict[str, int] = {}  # the worker that ran the agent's last turn
    seen: Dict[str, set] = {a: set() for a in history}
    mems = [AgentMemory(m, cache_dir=d, ram_budget=ram_budget, disk_budget="50GiB", shared=tier,
                        block_tokens=args.block_tokens)
            for m, d in zip(llms, dirs)]
    try:
        for kind, r in schedule(args):
            for i, agent_id in enumerate(history):
                # built on both workers (each has run a turn: its buffers are warm), then
                # every return on the worker that did not run the agent's last turn
                w = i % 2 if kind == "build" else 1 - last[agent_id]
                mem, other = mems[w], mems[1 - w]
                other.wait_durable(agent_id, timeout=120)  # untimed: long done in a real team
                if kind != "build":
                    bu.warm_page_cache(dirs[w])
                suffix = extra[(i, r)] if kind == "turn" else []
                prompt = history[agent_id] + suffix
                before = mem.stats()
                m = ttft_and_decode(mem.create_completion(
                    agent_id, prompt, max_tokens=args.max_tokens, temperature=0, stream=True))
                turn = mem.last_turn
                after = mem.stats()
                history[agent_id] = [int(t) for t in mem.llm.input_ids[: mem.llm.n_tokens]]
                rows.append({"mode": "shared", "repeat": rep, "kind": kind, "round": r,
                             "agent": agent_id, "tier": turn.source, "worker": w,
                             "fetch": "delta" if w in seen[agent_id] else "full",
                             "prompt_tokens": len(prompt), "prompt": prompt,
                             "shared_bytes_read": after.shared_bytes_read - before.shared_bytes_read,
                             "restore_ms": turn.restore_seconds * 1e3, **m})
                last[agent_id] = w
                seen[agent_id].add(w)
                progress.log(f"rep {rep} shared  {kind:6s} r{r} {agent_id}: worker {w} "
                             f"{turn.source:6s} {rows[-1]['fetch']:5s} "
                             f"{rows[-1]['shared_bytes_read'] / 1e6:6.1f} MB from Redis, "
                             f"TTFT {m['ttft_s'] * 1e3:9.1f} ms")
                progress.step(f"shared r{r}")
        for mem in mems:
            mem.flush()
        totals = {"shared_bytes_sent": sum(m.stats().shared_bytes_sent for m in mems),
                  "shared_bytes_read": sum(m.stats().shared_bytes_read for m in mems),
                  "shared_errors": sum(m.stats().shared_errors for m in mems),
                  "shared_refused": sum(m.stats().shared_refused for m in mems)}
    finally:
        for mem in mems:
            mem.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        _drop_namespace(args.shared, namespace)
    return rows, totals


def _drop_namespace(url: str, namespace: str) -> None:
    import redis
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=namespace + ":*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])
    client.close()


def summarize_shared(rows: List[dict], shared_rows: List[dict]) -> Dict[str, Any]:
    """Per return kind: shared returns (full and delta fetches) against the same run's
    single-worker disk returns and naive, matched by prompt position."""
    key = lambda x: (x["repeat"], x["kind"], x["round"], x["agent"])  # noqa: E731
    naive = {key(x): x["ttft_s"] for x in rows if x["mode"] == "naive"}
    out: Dict[str, Any] = {}
    for kind in ("resume", "turn"):
        disk = [x["ttft_s"] for x in rows
                if x["mode"] == "agentkv" and x["kind"] == kind and x["tier"] == "disk"]
        for fetch in ("full", "delta"):
            g = [x for x in shared_rows if x["kind"] == kind and x["fetch"] == fetch]
            if not g or not disk:
                continue
            ttft = statistics.median(x["ttft_s"] for x in g)
            n = statistics.median(naive[key(x)] for x in g)
            out[f"{kind}/{fetch}"] = {
                "returns": len(g), "tiers": sorted({x["tier"] for x in g}),
                "shared_ttft_ms": ttft * 1e3, "warm_disk_ttft_ms": statistics.median(disk) * 1e3,
                "naive_ttft_ms": n * 1e3,
                "shared_over_warm_disk": ttft / statistics.median(disk),
                "speedup_vs_naive": n / ttft,
                "mb_from_redis_median": statistics.median(x["shared_bytes_read"] for x in g) / 1e6}
    return out


def system_text(rules: int) -> str:
    return "You are a careful member of a software team. " + " ".join(
        f"Rule {j}: before step {j}, reread the plan, note one risk and its owner."
        for j in range(rules))


def run_new_agents(llm: Llama, args, ctx_tokens: int) -> Tuple[List[dict], Dict[str, Any]]:
    """New agents sharing the members' system prompt: first-turn TTFT, prefix vs cold."""
    n_sys = args.system_tokens or ctx_tokens * 2 // 3
    if not 0 < n_sys < ctx_tokens:
        raise SystemExit(f"--system-tokens must be between 1 and --ctx-tokens - 1 ({ctx_tokens})")
    block = args.block_tokens
    system = llm.tokenize(system_text(n_sys // 8 + 20).encode())[:n_sys]
    steps = max(40, (ctx_tokens - n_sys) // 25)

    def prompt(i: int) -> List[int]:
        own = llm.tokenize(context_text(i, steps).encode(), add_bos=False)
        return system + own[: ctx_tokens - n_sys]

    members, news = range(args.agents), range(args.agents, args.agents + args.new_agents)
    progress = bu.Progress(args.repeats * (args.agents + 2 * args.new_agents),
                           label=f"new agents {ctx_tokens}")
    rows: List[dict] = []
    for rep in range(args.repeats):
        for mode in ("prefix", "cold"):
            cache_dir = tempfile.mkdtemp(prefix=f"agentkv-bench-{mode}-", dir=args.cache_root)
            try:
                with AgentMemory(llm, cache_dir=cache_dir, ram_budget=0, disk_budget="50GiB",
                                 block_tokens=block) as mem:
                    for i in members if mode == "prefix" else ():
                        mem.create_completion(f"agent{i}", prompt(i), max_tokens=args.max_tokens,
                                              temperature=0)
                        progress.step(f"member {i}")
                    for i in news:
                        mem.flush()  # untimed: the members' (and earlier new agents') saves
                        if args.cold_disk:
                            bu.drop_page_cache(cache_dir)
                        else:
                            bu.warm_page_cache(cache_dir)
                        p = prompt(i)
                        m = ttft_and_decode(mem.create_completion(
                            f"agent{i}", p, max_tokens=args.max_tokens, temperature=0,
                            stream=True))
                        turn = mem.last_turn
                        rows.append({"mode": mode, "repeat": rep, "agent": f"agent{i}",
                                     "tier": turn.source, "prompt_tokens": len(p),
                                     "evaluated": turn.prompt_tokens_evaluated,
                                     "restored": turn.prompt_tokens_restored,
                                     "restore_ms": turn.restore_seconds * 1e3, **m})
                        progress.log(f"rep {rep} new agent{i} ({mode}): {turn.source:6s} eval "
                                     f"{turn.prompt_tokens_evaluated:5d} of {len(p)} tok, TTFT "
                                     f"{m['ttft_s'] * 1e3:9.1f} ms")
                        progress.step(f"new {mode}")
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
    bu.clear_kv(llm)
    pre = [x for x in rows if x["mode"] == "prefix"]
    cold = [x for x in rows if x["mode"] == "cold"]
    n_prompt = statistics.median(x["prompt_tokens"] for x in pre)
    pre_ttft = [x["ttft_s"] for x in pre]
    cold_ttft = [x["ttft_s"] for x in cold]
    summary = {"members": args.agents, "new_agents": args.new_agents, "system_tokens": n_sys,
               "block_tokens": block, "prompt_tokens": n_prompt,
               "tiers": sorted({x["tier"] for x in pre}),
               "evaluated_median": statistics.median(x["evaluated"] for x in pre),
               "evaluated_max": max(x["evaluated"] for x in pre),
               "cold_evaluated_median": statistics.median(x["evaluated"] for x in cold),
               "bound": n_prompt - n_sys + block,
               "prefix": bu.summarize(pre_ttft), "cold": bu.summarize(cold_ttft),
               "speedup_vs_cold": statistics.median(cold_ttft) / statistics.median(pre_ttft)}
    return rows, summary


def print_new_agents(point: Dict[str, Any]) -> None:
    s = point["new_agents"]
    print(f"\nnew agents sharing a {s['system_tokens']}-token system prompt with {s['members']} "
          f"stored members (ctx {point['ctx_tokens']}, block {s['block_tokens']}): "
          f"{s['prefix']['n']} first turns, tiers {','.join(s['tiers'])}")
    print(f"  evaluated median {s['evaluated_median']:.0f} (max {s['evaluated_max']}) of "
          f"{s['prompt_tokens']:.0f} prompt tokens (bound {s['bound']:.0f}; cold evaluates "
          f"{s['cold_evaluated_median']:.0f})")
    print(f"  TTFT median {s['prefix']['median_ms']:.1f} ms (p90 {s['prefix']['p90_ms']:.1f}) vs "
          f"cold first turn {s['cold']['median_ms']:.1f} ms = {s['speedup_vs_cold']:.2f}x")


def run_naive_and_floor(llm: Llama, args, prompts: List[dict], progress: bu.Progress) -> List[dict]:
    """For each returning prompt: naive TTFT, then the floor from the naive run's own KV."""
    rows = []
    for p in prompts:
        prompt, n_hist = p["prompt"], p["history_len"]
        bu.clear_kv(llm)  # naive: the KV is dropped; the whole prompt is prefilled again
        m = ttft_and_decode(llm.create_completion(prompt, max_tokens=args.max_tokens,
                                                  temperature=0, stream=True))
        rows.append({"mode": "naive", "repeat": p["repeat"], "kind": p["kind"],
                     "round": p["round"], "agent": p["agent"], "tier": "prefill",
                     "prompt_tokens": len(prompt), "evaluated": len(prompt), **m})
        # The history's KV as the naive prefill computed it: drop what came after it.
        llm._ctx.kv_cache_seq_rm(-1, n_hist, -1)
        llm.n_tokens = n_hist
        blob = bu.seq_state(llm)
        text = llm.detokenize(prompt[1:] if prompt and prompt[0] == llm.token_bos() else prompt)
        floor = {"mode": "floor", "repeat": p["repeat"], "kind": p["kind"], "round": p["round"],
                 "agent": p["agent"], "state_bytes": int(blob.nbytes),
                 "tokenize_s": bu.tokenize_seconds(llm, text)}
        suffix = prompt[n_hist:]
        # The exact floor: the same KV laid out as agentkv's exact restore loads it (the minimal
        # padding of layout.load_from for this thread count); the bare state above restores a
        # layout whose logits differ in the last bits (see README, "Exact restores").
        floor["exact_set_data_s"] = bu.bare_set_data(llm, bu.exact_layout(llm, blob))
        if suffix:
            floor.update(bu.set_data_then_prefill(llm, blob, prompt[:n_hist], suffix))
        else:
            floor.update({"set_data_s": bu.bare_set_data(llm, blob), "suffix_prefill_s": 0.0})
        rows.append(floor)
        progress.log(f"rep {p['repeat']} naive   {p['kind']:6s} r{p['round']} {p['agent']}: "
                     f"TTFT {m['ttft_s'] * 1e3:9.1f} ms; floor set_data "
                     f"{floor['set_data_s'] * 1e3:.2f} ms + prefill "
                     f"{floor['suffix_prefill_s'] * 1e3:.1f} ms ({len(suffix)} tok)")
        progress.step(f"naive r{p['round']}")
    bu.clear_kv(llm)
    return rows


def schedule(args) -> List[Tuple[str, int]]:
    rounds = [("build", 0)] + [("resume", r) for r in range(1, args.rounds)]
    if args.turn_tokens > 0:
        rounds += [("turn", r) for r in range(args.rounds, 2 * args.rounds - 1)]
    return rounds


def attach_floors(rows: List[dict], bandwidth: Dict[str, float]) -> None:
    """Per returning agentkv row: its floor (same prompt, same run) and the ratios."""
    key = lambda x: (x["repeat"], x["kind"], x["round"], x["agent"])  # noqa: E731
    floors = {key(x): x for x in rows if x["mode"] == "floor"}
    naive = {key(x): x for x in rows if x["mode"] == "naive"}
    for x in rows:
        if x["mode"] != "agentkv" or x["kind"] == "build":
            continue
        f = floors[key(x)]
        read_s = x["bytes_read"] / bandwidth["bytes_per_s"] if x["bytes_read"] else 0.0
        x["floor_set_data_s"] = f["set_data_s"]
        x["floor_suffix_prefill_s"] = f["suffix_prefill_s"]
        x["floor_tokenize_s"] = f["tokenize_s"]
        x["floor_s"] = f["set_data_s"] + f["suffix_prefill_s"] + read_s
        x["floor_read_s"] = read_s
        x["floor_with_tokenize_s"] = x["floor_s"] + f["tokenize_s"]
        x["floor_exact_s"] = f["exact_set_data_s"] + f["suffix_prefill_s"] + read_s
        x["naive_ttft_s"] = naive[key(x)]["ttft_s"]


def summarize(rows: List[dict]) -> Dict[str, Any]:
    """Per return kind, for all returns and per tier: medians, p90s, ratios to naive and floor."""
    out: Dict[str, Any] = {}
    ours_all = [x for x in rows if x["mode"] == "agentkv" and x["kind"] != "build"]
    for kind in ("resume", "turn"):
        ours = [x for x in ours_all if x["kind"] == kind]
        if not ours:
            continue
        groups = {"all": ours}
        for tier in sorted({x["tier"] for x in ours}):
            groups[tier] = [x for x in ours if x["tier"] == tier]
        out[kind] = {}
        for name, g in groups.items():
            a = [x["ttft_s"] for x in g]
            n = [x["naive_ttft_s"] for x in g]
            fl = [x["floor_s"] for x in g]
            ft = [x["floor_with_tokenize_s"] for x in g]
            fe = [x["floor_exact_s"] for x in g]
            row = {"returns": len(g), "evaluated_median": statistics.median(x["evaluated"] for x in g),
                   "naive": bu.summarize(n), "agentkv": bu.summarize(a), "floor": bu.summarize(fl),
                   "floor_with_tokenize": bu.summarize(ft), "floor_exact": bu.summarize(fe),
                   "floor_parts_median_ms": {
                       part: statistics.median(x[f"floor_{part}_s"] for x in g) * 1e3
                       for part in ("set_data", "read", "suffix_prefill", "tokenize")},
                   "restore_median_ms": statistics.median(x["restore_ms"] for x in g),
                   "save_median_ms": statistics.median(x["save_ms"] for x in g)}
            row["speedup_vs_naive"] = statistics.median(n) / statistics.median(a)
            row["agentkv_over_floor"] = statistics.median(a) / statistics.median(fl)
            row["agentkv_over_floor_with_tokenize"] = statistics.median(a) / statistics.median(ft)
            row["agentkv_over_exact_floor"] = statistics.median(a) / statistics.median(fe)
            out[kind][name] = row
    return out


def print_summary(summary: Dict[str, Any], args, extra: Dict[str, Any]) -> None:
    print("\n" + bu.machine_line(extra["machine"]))
    print(f"agents={args.agents} ram_slots={args.ram_slots} rounds={args.rounds} "
          f"ctx_tokens={extra['ctx_tokens']} turn_tokens={args.turn_tokens} "
          f"repeats={args.repeats} threads={args.threads} cold_disk={args.cold_disk} "
          f"(cache on {extra['cache_fs']})")
    print(f"hits (all repeats): {extra['hits']}   bytes on disk: {extra['disk_bytes'] / 1e6:.1f} MB   "
          f"read bandwidth ({'cold' if args.cold_disk else 'warm'}): "
          f"{extra['read_bandwidth']['bytes_per_s'] / 1e6:.0f} MB/s")
    hdr = (f"{'return':8s} {'tier':6s} {'n':>3s} {'naive med':>10s} {'agentkv med':>11s} "
           f"{'p90':>9s} {'floor med':>10s} {'+tokenize':>10s} {'naive/akv':>10s} "
           f"{'akv/floor':>9s} {'akv/fl+tok':>10s} {'exact fl':>9s} {'akv/exact':>9s}")
    print(hdr)
    for kind, groups in summary.items():
        for name, row in groups.items():
            label = "resume" if kind == "resume" else f"turn+{args.turn_tokens}"
            print(f"{label:8s} {name:6s} {row['returns']:3d} {row['naive']['median_ms']:8.1f}ms "
                  f"{row['agentkv']['median_ms']:9.2f}ms {row['agentkv']['p90_ms']:7.2f}ms "
                  f"{row['floor']['median_ms']:8.2f}ms "
                  f"{row['floor_with_tokenize']['median_ms']:8.2f}ms "
                  f"{row['speedup_vs_naive']:9.1f}x {row['agentkv_over_floor']:8.2f}x "
                  f"{row['agentkv_over_floor_with_tokenize']:9.2f}x "
                  f"{row['floor_exact']['median_ms']:7.2f}ms {row['agentkv_over_exact_floor']:8.2f}x")


def print_shared(point: Dict[str, Any]) -> None:
    t = point["shared_totals"]
    print(f"\nshared tier, two workers (ctx {point['ctx_tokens']}): "
          f"{t['shared_bytes_sent'] / 1e6:.1f} MB sent, {t['shared_bytes_read'] / 1e6:.1f} MB read, "
          f"{t['shared_errors']} errors, {t['shared_refused']} refused")
    print(f"{'return/fetch':14s} {'n':>3s} {'tiers':14s} {'MB/Redis':>8s} {'shared':>9s} "
          f"{'warm disk':>10s} {'naive':>10s} {'shared/disk':>11s} {'naive/shared':>12s}")
    for name, row in point["shared_summary"].items():
        print(f"{name:14s} {row['returns']:3d} {','.join(row['tiers']):14s} "
              f"{row['mb_from_redis_median']:8.1f} {row['shared_ttft_ms']:7.1f}ms "
              f"{row['warm_disk_ttft_ms']:8.1f}ms {row['naive_ttft_ms']:8.1f}ms "
              f"{row['shared_over_warm_disk']:10.2f}x {row['speedup_vs_naive']:11.1f}x")


def plot_turns(rows: List[dict], path: str, title: str) -> None:
    """TTFT per returning turn: naive re-prefill vs agentkv, agentkv points marked by tier."""
    plt = bu.pyplot()
    ours = [x for x in rows if x["mode"] == "agentkv" and x["kind"] != "build"]
    kinds = [k for k in ("resume", "turn") if any(x["kind"] == k for x in ours)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        g = [x for x in ours if x["kind"] == kind]
        xs = list(range(len(g)))
        ax.plot(xs, [x["naive_ttft_s"] * 1e3 for x in g], "-", color="tab:red", label="naive re-prefill")
        ax.plot(xs, [x["floor_s"] * 1e3 for x in g], ":", color="black", label="floor")
        for tier in sorted({x["tier"] for x in g}):
            color, marker = bu.TIER_STYLE.get(tier, ("tab:cyan", "o"))
            pts = [(i, x["ttft_s"] * 1e3) for i, x in enumerate(g) if x["tier"] == tier]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker,
                       label=f"agentkv ({tier})", zorder=3)
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("returning turn (round-robin over agents)")
        ax.set_ylabel("TTFT from the caller (ms)")
        ax.set_title("resume (no new tokens)" if kind == "resume" else "new turn")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(points: List[dict], path: str, title: str) -> None:
    plt = bu.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("resume", "o-"), ("turn", "s--")):
        pts = [(p["ctx_tokens"], p["summary"][kind]["all"]["speedup_vs_naive"])
               for p in points if kind in p["summary"]]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=kind)
            for x, y in pts:
                ax.annotate(f"{y:.0f}x", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("median TTFT speedup vs naive re-prefill")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_ctx(llm: Llama, args, ctx_tokens: int, second: Optional[Llama] = None) -> Dict[str, Any]:
    """The whole measurement at one context length: M repeats of agentkv, naive and floor
    (and with ``second``, a second worker's Llama: the two-worker schedule on Redis)."""
    n_agents = args.agents
    contexts = {f"agent{i}": llm.tokenize(context_text(i, steps=max(40, ctx_tokens // 25)).encode())
                [:ctx_tokens] for i in range(n_agents)}
    extra = {(i, r): llm.tokenize(user_message(i, r).encode(), add_bos=False)[: args.turn_tokens]
             for i in range(n_agents) for r in range(2 * args.rounds)}
    ram_budget = ram_budget_for(llm, contexts["agent0"], args.ram_slots,
                                args.block_tokens)  # also the warm-up
    sched = schedule(args)
    n_returning = (len(sched) - 1) * n_agents
    names = peer_names(args)
    per_rep = (len(sched) * n_agents * (2 if second is not None else 1) + n_returning
               + len(names) * len(sched) * n_agents + (len(sched) * n_agents if args.prefetch else 0))
    progress = bu.Progress(args.repeats * per_rep, label=f"ctx {ctx_tokens}")
    shared_rows: List[dict] = []
    shared_totals: Dict[str, int] = {}
    rows: List[dict] = []
    hits: Dict[str, int] = {}
    bandwidth: Dict[str, float] = {"bytes_per_s": float("inf")}
    disk_bytes = 0
    cache_fs = "unknown"
    for rep in range(args.repeats):
        cache_dir = tempfile.mkdtemp(prefix="agentkv-bench-", dir=args.cache_root)
        cache_fs = bu.fs_type(cache_dir)
        try:
            ours, prompts, stats = run_agentkv(llm, args, contexts, extra, cache_dir, ram_budget,
                                               rep, progress)
            disk_bytes = stats.disk_bytes  # the last repeat's: every repeat stores the same
            for tier, n in stats.hits.items():
                hits[tier] = hits.get(tier, 0) + n
            payloads = [p for p in bu.files_under(cache_dir) if os.path.getsize(p) >= 1 << 16]
            if not args.cold_disk:  # warm: what agentkv reads is in the page cache
                bu.read_bandwidth(payloads, cold=False)
            bandwidth = bu.read_bandwidth(payloads, cold=args.cold_disk)
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        rows += ours
        if args.prefetch:  # the same schedule without prefetch: what the prefetch costs a turn
            plain_dir = tempfile.mkdtemp(prefix="agentkv-bench-plain-", dir=args.cache_root)
            try:
                rows += run_agentkv(llm, args, contexts, extra, plain_dir, ram_budget, rep,
                                    progress, mode="agentkv-plain", prefetch=False)[0]
            finally:
                shutil.rmtree(plain_dir, ignore_errors=True)
        rows += run_naive_and_floor(llm, args, prompts, progress)
        attach_floors([x for x in rows if x.get("repeat") == rep], bandwidth)
        if names:
            rows += peermod.run_peers(llm, names, args, contexts, extra, sched, prompts, rep,
                                      ttft_and_decode, progress)
        if second is not None:
            got, totals = run_shared([llm, second], args, contexts, extra, ram_budget, rep,
                                     progress)
            mine = {(p["kind"], p["round"], p["agent"]): p["prompt"] for p in prompts}
            for x in got:  # the same prompts, or the comparison with naive is not like for like
                if x["kind"] != "build":
                    assert x.pop("prompt") == mine[(x["kind"], x["round"], x["agent"])]
                x.pop("prompt", None)
            shared_rows += got
            for k, v in totals.items():
                shared_totals[k] = shared_totals.get(k, 0) + v
    summary = summarize(rows)
    point = {"ctx_tokens": ctx_tokens, "ram_budget": ram_budget, "disk_bytes": disk_bytes,
             "hits": hits, "read_bandwidth": bandwidth,
             "cache_fs": cache_fs, "summary": summary, "turns": rows}
    if names:
        point["peers"] = peermod.summarize_peers(rows, names)
    if args.prefetch:
        point["prefetch_cost"] = prefetch_cost(rows)
    if second is not None:
        point.update({"shared_summary": summarize_shared(rows, shared_rows),
                      "shared_totals": shared_totals, "shared_turns": shared_rows})
    if args.new_agents:
        point["new_agent_turns"], point["new_agents"] = run_new_agents(llm, args, ctx_tokens)
    return point


def prefetch_cost(rows: List[dict]) -> Dict[str, Any]:
    """What prefetching costs the turn it runs during: each returning turn's time from its
    first token to its end (the decode, and the end of the turn, where a prefetch that found
    no room yet runs), with prefetch and in the same schedule without, paired turn by turn
    (the restores differ, so the time to the first token is left out)."""
    key = lambda x: (x["repeat"], x["kind"], x["round"], x["agent"])  # noqa: E731
    plain = {key(x): x for x in rows if x["mode"] == "agentkv-plain" and x["kind"] != "build"}
    pairs = [(x["after_first_s"], plain[key(x)]["after_first_s"]) for x in rows
             if x["mode"] == "agentkv" and key(x) in plain]
    if not pairs:
        return {}
    with_pf = statistics.median(a for a, _ in pairs)
    without = statistics.median(b for _, b in pairs)
    gaps = [x.get("gap_ms", 0.0) for x in rows if x["mode"] == "agentkv" and x["kind"] != "build"]
    return {"turns": len(pairs), "after_first_ms_with_prefetch": with_pf * 1e3,
            "after_first_ms_without": without * 1e3, "slowdown": with_pf / without - 1.0,
            "median_pairwise_slowdown": statistics.median(a / b for a, b in pairs) - 1.0,
            "gap_ms_median": statistics.median(gaps) if gaps else 0.0}


def print_prefetch_cost(cost: Dict[str, Any]) -> None:
    if not cost:
        return
    print(f"prefetch cost ({cost['turns']} turns, first token to end of turn): "
          f"{cost['after_first_ms_with_prefetch']:.1f} ms with prefetch, "
          f"{cost['after_first_ms_without']:.1f} ms without: {100 * cost['slowdown']:+.1f}% "
          f"(median of per-turn ratios {100 * cost['median_pairwise_slowdown']:+.1f}%); "
          f"untimed gap before each turn (page-cache drop or warm-up) "
          f"{cost.get('gap_ms_median', 0.0):.1f} ms")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--ram-slots", type=int, default=1, help="agents' snapshots RAM holds")
    ap.add_argument("--rounds", type=int, default=3, help="round 0 builds; R-1 rounds per kind")
    ap.add_argument("--ctx-tokens", type=int, default=2000)
    ap.add_argument("--ctx-sweep", default=None,
                    help="comma-separated context lengths, e.g. 512,2000,4000,8000 (one Llama)")
    ap.add_argument("--turn-tokens", type=int, default=64, help="0: every return is a resume")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="whole schedule M times, pooled")
    ap.add_argument("--cold-disk", action="store_true",
                    help="drop the cache's files from the page cache before each return")
    ap.add_argument("--cache-root", default=None, help="where the temporary cache dirs go")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="a GGUF path (default: the gemma3 270M package)")
    ap.add_argument("--json", default=None, help="write machine, per-turn rows and summary here")
    ap.add_argument("--plot", default=None, help="PNG: TTFT per turn (or speedup per context)")
    ap.add_argument("--shared", default=None, metavar="URL",
                    help="also run the schedule on two workers sharing this Redis")
    ap.add_argument("--prefetch", action="store_true",
                    help="AgentMemory(prefetch=True): the next agent is read into RAM during the "
                         "turn before its own (hits['prefetch'])")
    ap.add_argument("--peers", default=None, metavar="ram,disk",
                    help="also run llama-cpp-python's LlamaRAMCache / LlamaDiskCache (llm.set_cache) "
                         "on the same Llama and prompts; 'all' for both")
    ap.add_argument("--block-tokens", type=int, default=256, help="AgentMemory(block_tokens=)")
    ap.add_argument("--new-agents", type=int, default=0, metavar="K",
                    help="also time K new agents' first turns, sharing a system prompt")
    ap.add_argument("--system-tokens", type=int, default=None,
                    help="the shared system prompt of --new-agents (default: 2/3 of the context)")
    args = ap.parse_args(argv)
    if args.agents < 1 or args.rounds < 2 or args.repeats < 1:
        ap.error("need --agents >= 1, --rounds >= 2, --repeats >= 1")
    return args


def peer_names(args) -> List[str]:
    """The peers ``--peers`` names ("ram", "disk", "all"), in a fixed order."""
    if not args.peers:
        return []
    asked = {"ram", "disk"} if args.peers == "all" else set(args.peers.split(","))
    unknown = asked - set(peermod.PEERS)
    if unknown:
        raise SystemExit(f"--peers: unknown peer(s) {sorted(unknown)}; use ram, disk or all")
    return [p for p in peermod.PEERS if p in asked]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    model = args.model or bu.default_model()
    sweep = [int(x) for x in args.ctx_sweep.split(",")] if args.ctx_sweep else [args.ctx_tokens]
    longest = max(sweep)
    n_ctx = max(4096, longest + args.rounds * (args.turn_tokens + 2 * args.max_tokens) + 256)
    llm = bu.load_llm(model, n_ctx, args.threads)
    second = None if args.shared is None else bu.load_llm(model, n_ctx, args.threads)
    points = []
    try:
        for ctx_tokens in sweep:
            point = run_ctx(llm, args, ctx_tokens, second)
            point["machine"] = bu.machine()
            print_summary(point["summary"], args, point)
            if second is not None:
                print_shared(point)
            if args.new_agents:
                print_new_agents(point)
            if "peers" in point:
                peermod.print_peers(point["peers"], args.turn_tokens)
            if "prefetch_cost" in point:
                print_prefetch_cost(point["prefetch_cost"])
            points.append(point)
    finally:
        llm.close()
        if second is not None:
            second.close()
    doc: Dict[str, Any] = {"machine": bu.machine(), "args": vars(args), "model": model,
                           "n_ctx": n_ctx}
    if args.ctx_sweep:
        doc["sweep"] = points
        print("\nspeedup vs context length (median TTFT naive / agentkv):")
        for p in points:
            cells = "  ".join(f"{k} {p['summary'][k]['all']['speedup_vs_naive']:7.1f}x "
                              f"(akv/floor {p['summary'][k]['all']['agentkv_over_floor']:.2f})"
                              for k in ("resume", "turn") if k in p["summary"])
            print(f"  {p['ctx_tokens']:6d} tokens: {cells}")
    else:
        doc.update(points[0])
    bu.write_json(args.json, doc)
    if args.plot:
        title = (f"{os.path.basename(model)}, {args.agents} agents, {args.ram_slots} RAM slot(s), "
                 f"{'cold' if args.cold_disk else 'warm'} disk, {args.threads} threads")
        if args.ctx_sweep:
            plot_sweep(points, args.plot, title)
        else:
            plot_turns(points[0]["turns"], args.plot, f"{title}, {sweep[0]} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
