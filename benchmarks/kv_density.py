"""Density and quality of what agentkv stores: bytes per token and agents per GB per storage
mode, restore time per mode, a team sharing a system prompt, incremental saves, and the
quality of the lossy at-rest formats.

Commands (the figures of BENCHMARKS.md sections 3 and 4)::

    # section 4: every storage mode at 2,000 and 4,000 tokens (bytes, restore time), a team of
    # 8 sharing a 1,500-token prompt, incremental saves at ~4,000 tokens, and quality
    .venv/bin/python benchmarks/kv_density.py --ctx-tokens 2000,4000 --repeats 5 --team 8 \\
        --system-tokens 1500 --quality --json density.json --plot density.png
    # section 3: four agents sharing a 1,024-token prompt (+512 own tokens), saves, per block size
    .venv/bin/python benchmarks/kv_density.py --ctx-tokens 4000 --modes f16 --repeats 0 \\
        --team 4 --system-tokens 1024 --task-tokens 512 --block-tokens 256 --json prefix.json
    # tiny smoke run
    .venv/bin/python benchmarks/kv_density.py --ctx-tokens 300 --repeats 1 --team 2 \\
        --system-tokens 300 --task-tokens 20 --saves-tokens 300 --save-turns 2 --quality \\
        --quality-formats q8_0 --continue 4

Storage modes: ``f16`` (live f16 KV, stored exactly), ``live-q8_0`` and ``live-q4_0`` (the Llama
runs with ``type_k=type_v=q8_0/q4_0``; stored as they run), and ``at-rest-q8_0``,
``at-rest-q4_0``, ``at-rest-iq4_nl`` (live f16, transcoded on the way to disk). For each mode
and each context length T, one agent with a T-token context is evicted to disk
(``ram_budget=0``): its bytes are what ``stats().disk_bytes`` reports, next to the size of its
bare sequence state (``llama_state_seq_get_size``). Bytes per token = disk bytes / tokens;
KV bytes per token leaves out the carried logits (1.05 MB of float32 per agent; the lossy
at-rest modes carry none); agents per GB = 1e9 / disk bytes per agent.

Restore time (``--repeats N``, 0 skips it): the agent is brought back from disk once untimed,
then N times with no new tokens, each time evicted again; the median of
``last_turn.restore_seconds`` (read, checks, transcoding back, set_data), its ratio to the
exact f16 restore of the same context in the same run, and the re-prefill time of the same
context on the same Llama (one bare ``llm.eval``, which is also the warm-up).

Team (``--team N``, 0 skips it): N agents whose prompts start with the same S-token system
prompt, each with its own ``--task-tokens`` of task. ``stats().disk_bytes`` once all are on
disk, against the sum of their whole sequence states (what a whole-file store writes) and of
their whole agentkv snapshots (SWA margin and carried logits included); the cuts stored.

Incremental saves (``--saves-tokens T``, 0 skips it): one agent grows to T tokens, then adds
``--save-step`` tokens per turn for ``--save-turns`` turns; bytes written per save against
(step + one block) x bytes per token x 1.2, bytes per token being the KV one token owns in
every layer (base and SWA caches, cell record included).

Quality (``--quality``): every ``--quality-formats`` format against the exact restore, on 8
chat prompts and a held-out text (top-1, KL, greedy continuation, held-out perplexity; see
benchmarks/quality.py). ``--quality-from PATH`` reads those figures from an earlier JSON of
this script instead (or of the former kv_quality.py). Progress goes to stderr, the figures and
the machine to stdout, everything to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from typing import Any, Dict, List, Optional

import llama_cpp
from llama_cpp import Llama

from agentkv import AgentMemory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil as bu  # noqa: E402

MODES = [{"mode": "f16", "live": "f16", "at_rest": None, "lossy": False},
         {"mode": "live-q8_0", "live": "q8_0", "at_rest": None, "lossy": True},
         {"mode": "live-q4_0", "live": "q4_0", "at_rest": None, "lossy": True},
         {"mode": "at-rest-q8_0", "live": "f16", "at_rest": "q8_0", "lossy": True},
         {"mode": "at-rest-q4_0", "live": "f16", "at_rest": "q4_0", "lossy": True},
         {"mode": "at-rest-iq4_nl", "live": "f16", "at_rest": "iq4_nl", "lossy": True}]


def open_memory(llm: Llama, cache_dir: str, at_rest: Optional[str],
                block_tokens: int) -> AgentMemory:
    return AgentMemory(llm, cache_dir=cache_dir, ram_budget=0, at_rest=at_rest,
                       block_tokens=block_tokens)


def filler(i: int, n_words: int) -> str:
    return " ".join(f"Fact {i}.{j}: the service keeps request {j} for {(j * 7) % 31} days."
                    for j in range(n_words))


def prompt_tokens(llm: Llama, text: str, n: int, bos: bool = True) -> List[int]:
    toks = llm.tokenize(text.encode(), add_bos=bos)
    if len(toks) < n:
        raise ValueError(f"filler text too short: {len(toks)} < {n} tokens")
    return toks[:n]


def turn(mem: AgentMemory, agent_id: str, tokens: List[int]) -> int:
    """Run one turn for the agent; returns its bare sequence-state size after the turn."""
    with mem.agent(agent_id) as live:
        live.create_completion(tokens, max_tokens=1, temperature=0)
        return int(llama_cpp.llama_state_seq_get_size(live.ctx, 0))


def measure_single(args, mode: Dict[str, Any], ctx_tokens: int, n_ctx: int) -> Dict[str, Any]:
    """One agent of ``ctx_tokens`` in this mode: bytes on disk and restore time from disk."""
    llm = bu.load_llm(args.model, n_ctx, args.threads, mode["live"])
    cache_dir = tempfile.mkdtemp(prefix=f"kv-density-{mode['mode']}-", dir=args.workdir)
    try:
        tokens = prompt_tokens(llm, filler(0, ctx_tokens // 10 + 20), ctx_tokens)
        prefill_s = None
        if args.repeats > 0:
            prefill_s = bu.prefill(llm, tokens)  # the re-prefill figure, and the warm-up
            bu.clear_kv(llm)
        with open_memory(llm, cache_dir, mode["at_rest"], args.block_tokens) as mem:
            state = turn(mem, "agent", tokens)
            mem.evict("agent")
            mem.flush()
            stats = mem.stats()
            info = {a.agent_id: a for a in mem.agents()}["agent"]
            restores = []
            for r in range(args.repeats + 1 if args.repeats > 0 else 0):
                mem.create_completion("agent", tokens, max_tokens=1, temperature=0)
                assert mem.last_turn.source == "disk", mem.last_turn
                if r:  # the first return is the warm-up
                    restores.append(mem.last_turn.restore_seconds)
                mem.evict("agent")
        disk = stats.disk_bytes
        kv_bytes = info.nbytes - (0 if mode["at_rest"] else 4 * llm.n_vocab())  # lossy: no logits
        row = {**mode, "ctx_tokens": ctx_tokens, "tokens": info.n_tokens, "state_bytes": state,
               "disk_bytes": disk, "agent_nbytes": info.nbytes, "kv_bytes": kv_bytes,
               "bytes_per_token": disk / info.n_tokens,
               "kv_bytes_per_token": kv_bytes / info.n_tokens,
               "state_bytes_per_token": state / info.n_tokens, "agents_per_gb": 1e9 / disk}
        if restores:
            row.update(restore=bu.summarize(restores),
                       restore_ms=statistics.median(restores) * 1e3, prefill_ms=prefill_s * 1e3)
        return row
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        llm.close()


def measure_team(args, mode: Dict[str, Any], n_ctx: int) -> Dict[str, Any]:
    """``--team`` agents sharing a system prompt: disk bytes against their whole states."""
    llm = bu.load_llm(args.model, n_ctx, args.threads, mode["live"])
    cache_dir = tempfile.mkdtemp(prefix=f"kv-density-team-{mode['mode']}-", dir=args.workdir)
    team = args.team
    try:
        system = prompt_tokens(llm, filler(99, args.system_tokens // 10 + 20), args.system_tokens)
        states, snapshots = [], []
        with open_memory(llm, cache_dir, mode["at_rest"], args.block_tokens) as mem:
            for i in range(team):
                task = prompt_tokens(llm, filler(i, args.task_tokens // 10 + 5), args.task_tokens,
                                     bos=False)
                states.append(turn(mem, f"member{i}", system + task))
                snapshots.append(mem.inspect().live_state_bytes())
                bu.log(f"[team] member {i}: {len(system + task)} tokens, "
                       f"source={mem.last_turn.source}, "
                       f"evaluated={mem.last_turn.prompt_tokens_evaluated}")
            mem.flush()
            mem.evict(f"member{team - 1}")
            stats = mem.stats()
            cuts = sorted(c.n_tokens for c in mem.inspect().cuts())
        whole, snaps, disk = sum(states), sum(snapshots), stats.disk_bytes
        return {**mode, "team": team, "system_tokens": args.system_tokens,
                "task_tokens": args.task_tokens, "block_tokens": args.block_tokens,
                "sum_of_states": whole, "sum_of_snapshots": snaps, "disk_bytes": disk,
                "sharing_factor": whole / disk if disk else None,
                "vs_snapshots": snaps / disk if disk else None, "cuts": cuts,
                "hits": stats.hits, "agents_per_gb": 1e9 * team / disk}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        llm.close()


def measure_saves(args) -> Dict[str, Any]:
    """One agent at ``--saves-tokens`` adding ``--save-step`` tokens a turn: bytes per save."""
    B, step, n = args.block_tokens, args.save_step, args.save_turns
    llm = bu.load_llm(args.model, args.saves_tokens + (n + 1) * step + 256, args.threads)
    cache_dir = tempfile.mkdtemp(prefix="kv-density-saves-", dir=args.workdir)
    try:
        with open_memory(llm, cache_dir, None, B) as mem:
            tokens = prompt_tokens(llm, filler(7, args.saves_tokens // 10 + 20), args.saves_tokens)
            bu.log(f"[saves] building a {args.saves_tokens}-token agent")
            mem.create_completion("long", tokens, max_tokens=1, temperature=0)
            mem.flush()
            shape = mem.inspect().record("long").shape
            per_token = sum(12 + sum(r for _, r in s["k"]) + sum(r for _, r in s["v"])
                            for c in shape["caches"] for s in c if s)
            more = prompt_tokens(llm, filler(8, n * step // 10 + 20), n * step, bos=False)
            saves = []
            history = list(mem.inspect().live()[1])
            for t in range(n):
                history = history + more[t * step:(t + 1) * step]
                before = mem.stats().bytes_written
                mem.create_completion("long", history, max_tokens=1, temperature=0)
                history = list(mem.inspect().live()[1])
                mem.flush()
                saves.append(mem.stats().bytes_written - before)
                bu.log(f"[saves] turn {t}: {mem.last_turn.prompt_tokens_evaluated} tokens "
                       f"evaluated, {saves[-1] / 1e6:.2f} MB written, context {len(history)}")
            whole = int(llama_cpp.llama_state_seq_get_size(llm.ctx, 0))
        bound = (step + B) * per_token * 1.2
        return {"tokens": args.saves_tokens, "step": step, "block_tokens": B,
                "bytes_per_token": per_token, "logits_bytes": llm.n_vocab() * 4,
                "per_save_bytes": saves, "median_save_bytes": statistics.median(saves),
                "max_save_bytes": max(saves), "bound_bytes": bound,
                "max_save_over_bound": max(saves) / bound, "whole_state_bytes": whole}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        llm.close()


def quality_by_mode(doc: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Quality rows keyed by storage mode, from quality.measure's result (or a JSON holding
    it under "quality", as this script writes, or at the top, as kv_quality.py wrote)."""
    doc = doc.get("quality") or doc
    names = {"exact": "f16"}
    return {names.get(k, f"at-rest-{k}"): v for k, v in doc.get("formats", {}).items()
            if isinstance(v, dict)}


def short_quality(q: Dict[str, Any]) -> str:
    keys = ("top1", "kl", "heldout_ppl_change", "greedy_same_mean")
    return " ".join(f"{k}={q[k]:.4g}" for k in keys if isinstance(q.get(k), (int, float)))


def plot(rows: List[Dict[str, Any]], path: str, title: str) -> None:
    plt = bu.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = [r["mode"] for r in rows]
    values = [r["bytes_per_token"] / 1024 for r in rows]
    bars = ax.bar(names, values, color=["tab:blue" if not r["lossy"] else "tab:orange" for r in rows])
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['bytes_per_token'] / 1024:.1f} KiB\n{r['agents_per_gb']:.0f}/GB",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylabel("bytes on disk per token (KiB)")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_modes(rows: List[Dict[str, Any]], quality: Dict[str, Dict[str, Any]]) -> None:
    for ctx in sorted({r["ctx_tokens"] for r in rows}):
        group = [r for r in rows if r["ctx_tokens"] == ctx]
        base = next((r for r in group if r["mode"] == "f16"), group[0])
        print(f"\none agent, {ctx}-token context, on disk (KV: the carried logits apart)")
        print(f"{'mode':15s} {'state MB':>9s} {'disk MB':>8s} {'B/token':>8s} {'KV B/tok':>9s} "
              f"{'smaller':>8s} {'agents/GB':>9s}  quality")
        for r in group:
            r["kv_smaller_than_f16"] = base["kv_bytes_per_token"] / r["kv_bytes_per_token"]
            q = quality.get(r["mode"])
            shown = "exact" if not r["lossy"] else (short_quality(q) if q else "n/a")
            print(f"{r['mode']:15s} {r['state_bytes'] / 1e6:9.2f} {r['disk_bytes'] / 1e6:8.2f} "
                  f"{r['bytes_per_token']:8.0f} {r['kv_bytes_per_token']:9.0f} "
                  f"{r['kv_smaller_than_f16']:7.2f}x {r['agents_per_gb']:9.1f}  {shown}")
        if "restore_ms" not in base:
            continue
        n = base["restore"]["n"]
        print(f"restore from disk, median of {n} (read, checks, transcoding back, set_data)")
        print(f"{'mode':15s} {'restore':>10s} {'p90':>9s} {'vs exact':>9s} {'re-prefill':>11s} "
              f"{'prefill/restore':>15s}")
        for r in group:
            r["restore_vs_exact"] = r["restore_ms"] / base["restore_ms"]
            print(f"{r['mode']:15s} {r['restore_ms']:8.1f}ms {r['restore']['p90_ms']:7.1f}ms "
                  f"{r['restore_vs_exact']:8.2f}x {r['prefill_ms']:9.0f}ms "
                  f"{r['prefill_ms'] / r['restore_ms']:14.0f}x")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx-tokens", default="2000", help="context length(s), comma-separated")
    ap.add_argument("--modes", default=None,
                    help=f"comma-separated subset of {','.join(m['mode'] for m in MODES)}")
    ap.add_argument("--block-tokens", type=int, default=256)
    ap.add_argument("--team", type=int, default=8, help="agents sharing the system prompt (0: skip)")
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--task-tokens", type=int, default=100)
    ap.add_argument("--team-modes", default="f16", help="modes to run the team in ('all')")
    ap.add_argument("--saves-tokens", type=int, default=4000,
                    help="incremental saves of an agent of this length (0: skip)")
    ap.add_argument("--save-step", type=int, default=100, help="tokens added per turn")
    ap.add_argument("--save-turns", type=int, default=6)
    ap.add_argument("--quality", action="store_true", help="measure the at-rest formats' quality")
    ap.add_argument("--quality-formats", default="q8_0,q4_0,q4_1,iq4_nl")
    ap.add_argument("--continue", dest="n_cont", type=int, default=64,
                    help="greedy continuation length for --quality")
    ap.add_argument("--quality-from", default=None, metavar="JSON",
                    help="quality figures from an earlier --json of this script instead")
    bu.add_common_args(ap, repeats=3)  # --model, --repeats (timed restores per mode, 0: none),
    #                                     --threads, --json
    ap.add_argument("--workdir", default=None, help="where the temporary cache dirs go")
    ap.add_argument("--plot", default=None, help="PNG: bytes per token per storage mode")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    args.model = args.model or bu.default_model()
    sizes = [int(x) for x in args.ctx_tokens.split(",") if x]
    modes = MODES
    if args.modes:
        wanted = args.modes.split(",")
        unknown = set(wanted) - {m["mode"] for m in MODES}
        if unknown:
            raise SystemExit(f"unknown modes: {', '.join(sorted(unknown))}")
        modes = [m for m in MODES if m["mode"] in wanted]
    n_ctx = max(max(sizes), args.system_tokens + args.task_tokens) + 256
    m = bu.machine()
    print(bu.machine_line(m))
    print(f"model {os.path.basename(args.model)}, {args.threads} threads, "
          f"block_tokens={args.block_tokens}")
    doc: Dict[str, Any] = {"machine": m, "args": vars(args), "model": args.model}

    quality: Dict[str, Any] = {}
    if args.quality:
        import quality as q  # benchmarks/quality.py
        formats = [f for f in args.quality_formats.split(",") if f]
        bu.log(f"[quality] formats {formats}")
        doc["quality"] = q.measure(args.model, args.threads, formats, args.n_cont)
        quality = quality_by_mode(doc["quality"])
    elif args.quality_from:
        with open(args.quality_from) as f:
            quality = quality_by_mode(json.load(f))

    rows = []
    for ctx in sizes:
        for mode in modes:
            bu.log(f"[{ctx} tokens] {mode['mode']} ...")
            r = measure_single(args, mode, ctx, n_ctx)
            r["quality"] = quality.get(mode["mode"])
            rows.append(r)
    print_modes(rows, quality)
    doc["modes"] = rows
    if args.quality:
        import quality as q
        q.print_table(doc["quality"])

    teams = []
    if args.team > 0:
        team_modes = modes if args.team_modes == "all" else \
            [m for m in modes if m["mode"] in args.team_modes.split(",")]
        print(f"\nteam of {args.team} sharing a {args.system_tokens}-token system prompt "
              f"(+{args.task_tokens} tokens each), block_tokens={args.block_tokens}:")
        print(f"{'mode':15s} {'states MB':>10s} {'snapshots MB':>12s} {'disk MB':>8s} "
              f"{'vs states':>9s} {'vs snaps':>8s} {'agents/GB':>9s}  cuts")
        for mode in team_modes:
            t = measure_team(args, mode, n_ctx)
            teams.append(t)
            print(f"{t['mode']:15s} {t['sum_of_states'] / 1e6:10.2f} "
                  f"{t['sum_of_snapshots'] / 1e6:12.2f} {t['disk_bytes'] / 1e6:8.2f} "
                  f"{t['sharing_factor']:8.2f}x {t['vs_snapshots']:7.2f}x "
                  f"{t['agents_per_gb']:9.1f}  {t['cuts']}", flush=True)
    doc["teams"] = teams

    if args.saves_tokens > 0:
        s = doc["saves"] = measure_saves(args)
        print(f"\nincremental saves at ~{s['tokens']} tokens, +{s['step']} a turn: median "
              f"{s['median_save_bytes'] / 1e6:.2f} MB, max {s['max_save_bytes'] / 1e6:.2f} MB "
              f"per save (incl. {s['logits_bytes'] / 1e6:.2f} MB logits) vs bound "
              f"{s['bound_bytes'] / 1e6:.2f} MB ({s['max_save_over_bound']:.2f} of it); "
              f"whole state {s['whole_state_bytes'] / 1e6:.1f} MB; "
              f"{s['bytes_per_token']} B of KV per token")

    bu.write_json(args.json, doc)
    if args.plot and rows:
        longest = [r for r in rows if r["ctx_tokens"] == max(sizes)]
        plot(longest, args.plot, f"{os.path.basename(args.model)}, {max(sizes)}-token context")
    return 0


if __name__ == "__main__":
    sys.exit(main())
