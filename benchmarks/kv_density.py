"""Density: bytes per token and agents per GB for each storage mode, and for a team sharing a
system prompt.

Command (figures for BENCHMARKS.md; quality columns come from kv_quality.py's JSON if given)::

    .venv/bin/python benchmarks/kv_density.py --ctx-tokens 2000 --team 8 --system-tokens 1500 \\
        --json density.json --plot density.png [--quality quality.json]

Storage modes: ``f16`` (live f16 KV, stored exactly), ``live-q8_0`` and ``live-q4_0`` (the Llama
runs with ``type_k=type_v=q8_0/q4_0``; stored as they run), and, when ``AgentMemory`` accepts
``at_rest=`` (detected with ``inspect.signature``), ``at-rest-q8_0`` / ``at-rest-q4_0`` (live f16,
transcoded on the way to disk). For each mode one agent with a T-token context is evicted to
disk; its bytes are what ``stats().disk_bytes`` reports, next to the size of its bare sequence
state (``llama_state_seq_get_size``). Bytes per token = disk bytes / tokens; agents per GB =
1e9 / disk bytes per agent.

Team: N agents whose prompts start with the same S-token system prompt, each with its own short
task. ``stats().disk_bytes`` after all of them are on disk, against the sum of their whole
states: with content-addressed blocks (issue 3) the shared prefix is stored once.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional

import llama_cpp
from llama_cpp import Llama

from agentkv import AgentMemory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil as bu  # noqa: E402


def storage_modes() -> List[Dict[str, Any]]:
    """(name, live cache type, at_rest, lossy); at-rest modes only if AgentMemory has them."""
    modes = [{"mode": "f16", "live": "f16", "at_rest": None, "lossy": False},
             {"mode": "live-q8_0", "live": "q8_0", "at_rest": None, "lossy": True},
             {"mode": "live-q4_0", "live": "q4_0", "at_rest": None, "lossy": True}]
    if "at_rest" in inspect.signature(AgentMemory).parameters:
        modes += [{"mode": "at-rest-q8_0", "live": "f16", "at_rest": "q8_0", "lossy": True},
                  {"mode": "at-rest-q4_0", "live": "f16", "at_rest": "q4_0", "lossy": True}]
    return modes


def open_memory(llm: Llama, cache_dir: str, at_rest: Optional[str]) -> AgentMemory:
    kw = {"at_rest": at_rest} if at_rest else {}
    return AgentMemory(llm, cache_dir=cache_dir, ram_budget=0, **kw)


def filler(i: int, n_words: int) -> str:
    return " ".join(f"Fact {i}.{j}: the service keeps request {j} for {(j * 7) % 31} days."
                    for j in range(n_words))


def prompt_tokens(llm: Llama, text: str, n: int) -> List[int]:
    toks = llm.tokenize(text.encode())
    if len(toks) < n:
        raise ValueError(f"filler text too short: {len(toks)} < {n} tokens")
    return toks[:n]


def turn(mem: AgentMemory, agent_id: str, tokens: List[int]) -> int:
    """Run one turn for the agent; returns its bare sequence-state size after the turn."""
    with mem.agent(agent_id) as live:
        live.create_completion(tokens, max_tokens=1, temperature=0)
        return int(llama_cpp.llama_state_seq_get_size(live.ctx, 0))


def llm_for(model: str, mode: Dict[str, Any], n_ctx: int, threads: int) -> Llama:
    """A Llama whose live KV cache has the mode's type."""
    t = bu.CACHE_TYPES[mode["live"]]
    return Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, flash_attn=True, type_k=t,
                 type_v=t, verbose=False)


def measure_single(model: str, mode: Dict[str, Any], ctx_tokens: int, n_ctx: int, threads: int,
                   workdir: Optional[str]) -> Dict[str, Any]:
    llm = llm_for(model, mode, n_ctx, threads)
    cache_dir = tempfile.mkdtemp(prefix=f"kv-density-{mode['mode']}-", dir=workdir)
    try:
        tokens = prompt_tokens(llm, filler(0, ctx_tokens // 10 + 20), ctx_tokens)
        with open_memory(llm, cache_dir, mode["at_rest"]) as mem:
            state = turn(mem, "agent", tokens)
            mem.evict("agent")
            stats = mem.stats()
            info = {a.agent_id: a for a in mem.agents()}["agent"]
        disk = stats.disk_bytes
        return {**mode, "tokens": info.n_tokens, "state_bytes": state, "disk_bytes": disk,
                "agent_nbytes": info.nbytes, "bytes_per_token": disk / info.n_tokens,
                "state_bytes_per_token": state / info.n_tokens, "agents_per_gb": 1e9 / disk}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        llm.close()


def measure_team(model: str, mode: Dict[str, Any], team: int, system_tokens: int,
                 task_tokens: int, n_ctx: int, threads: int, workdir: Optional[str]) -> Dict[str, Any]:
    llm = llm_for(model, mode, n_ctx, threads)
    cache_dir = tempfile.mkdtemp(prefix=f"kv-density-team-{mode['mode']}-", dir=workdir)
    try:
        system = prompt_tokens(llm, filler(99, system_tokens // 10 + 20), system_tokens)
        states = []
        with open_memory(llm, cache_dir, mode["at_rest"]) as mem:
            for i in range(team):
                task = llm.tokenize(filler(i, task_tokens // 10 + 5).encode(),
                                    add_bos=False)[:task_tokens]
                states.append(turn(mem, f"member{i}", system + task))
            mem.flush()
            mem.evict(f"member{team - 1}")
            stats = mem.stats()
        whole = sum(states)
        return {**mode, "team": team, "system_tokens": system_tokens, "task_tokens": task_tokens,
                "sum_of_states": whole, "disk_bytes": stats.disk_bytes,
                "sharing_factor": whole / stats.disk_bytes if stats.disk_bytes else None,
                "hits": stats.hits, "agents_per_gb": 1e9 * team / stats.disk_bytes}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        llm.close()


def load_quality(path: Optional[str]) -> Dict[str, Dict[str, Any]]:
    """Quality metrics per mode from kv_quality.py's JSON.

    kv_quality.py writes ``{"formats": {"exact": {...}, "q8_0": {...}, "q4_0": {...}}}`` (at-rest
    formats of f16 KV); also accepted: ``{mode: {...}}``, ``{"modes": {...}}`` or a list of rows
    with a "mode" key (under "results" or at the top).
    """
    if not path:
        return {}
    with open(path) as f:
        doc = json.load(f)
    if isinstance(doc, dict) and isinstance(doc.get("formats"), dict):
        names = {"exact": "f16"}
        return {names.get(k, k if k.startswith(("live-", "at-rest-")) else f"at-rest-{k}"): v
                for k, v in doc["formats"].items() if isinstance(v, dict)}
    if isinstance(doc, dict) and "modes" in doc:
        doc = doc["modes"]
    if isinstance(doc, dict) and "results" in doc:
        doc = doc["results"]
    if isinstance(doc, list):
        return {str(r["mode"]): {k: v for k, v in r.items() if k != "mode"}
                for r in doc if isinstance(r, dict) and "mode" in r}
    return {str(k): v for k, v in doc.items() if isinstance(v, dict)}


def short_quality(q: Dict[str, Any]) -> str:
    """The headline quality metrics, when present (kv_quality.py's names)."""
    keys = ("top1", "kl", "heldout_ppl_change", "greedy_same_mean")
    shown = {k: q[k] for k in keys if isinstance(q.get(k), (int, float))}
    if not shown:
        return json.dumps(q)[:80]
    return " ".join(f"{k}={v:.4g}" for k, v in shown.items())


def plot(rows: List[Dict[str, Any]], path: str, title: str) -> None:
    plt = bu.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["mode"] for r in rows]
    values = [r["bytes_per_token"] / 1024 for r in rows]
    bars = ax.bar(names, values, color=["tab:blue" if not r["lossy"] else "tab:orange" for r in rows])
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['bytes_per_token'] / 1024:.1f} KiB\n{r['agents_per_gb']:.0f}/GB",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylabel("bytes on disk per token (KiB)")
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx-tokens", type=int, default=2000)
    ap.add_argument("--team", type=int, default=8, help="agents sharing the system prompt (0: skip)")
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--task-tokens", type=int, default=100)
    ap.add_argument("--modes", default=None, help="comma-separated subset of the modes")
    ap.add_argument("--team-modes", default="f16", help="modes to run the team in ('all')")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="a GGUF path (default: the gemma3 270M package)")
    ap.add_argument("--workdir", default=None, help="where the temporary cache dirs go")
    ap.add_argument("--quality", default=None, help="kv_quality.py's JSON, for the lossy modes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG: bytes per token per storage mode")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    model = args.model or bu.default_model()
    modes = storage_modes()
    if not any(m["at_rest"] for m in modes):
        print("note: AgentMemory has no at_rest= parameter here; at-rest modes skipped")
    if args.modes:
        wanted = set(args.modes.split(","))
        modes = [m for m in modes if m["mode"] in wanted]
    quality = load_quality(args.quality)
    n_ctx = max(args.ctx_tokens, args.system_tokens + args.task_tokens) + 256

    rows = []
    print(f"{'mode':13s} {'tokens':>6s} {'state MB':>9s} {'disk MB':>8s} {'B/token':>8s} "
          f"{'agents/GB':>9s}  quality")
    for mode in modes:
        r = measure_single(model, mode, args.ctx_tokens, n_ctx, args.threads, args.workdir)
        r["quality"] = quality.get(mode["mode"], {} if not mode["lossy"] else None)
        rows.append(r)
        q = "exact" if not mode["lossy"] else (short_quality(r["quality"]) if r["quality"] else "n/a")
        print(f"{r['mode']:13s} {r['tokens']:6d} {r['state_bytes'] / 1e6:9.2f} "
              f"{r['disk_bytes'] / 1e6:8.2f} {r['bytes_per_token']:8.0f} {r['agents_per_gb']:9.1f}  {q}",
              flush=True)

    teams = []
    if args.team > 0:
        team_modes = modes if args.team_modes == "all" else \
            [m for m in modes if m["mode"] in args.team_modes.split(",")]
        print(f"\nteam of {args.team} sharing a {args.system_tokens}-token system prompt "
              f"(+{args.task_tokens} tokens each):")
        print(f"{'mode':13s} {'sum of states MB':>16s} {'disk MB':>8s} {'sharing':>8s} {'agents/GB':>9s}")
        for mode in team_modes:
            t = measure_team(model, mode, args.team, args.system_tokens, args.task_tokens, n_ctx,
                             args.threads, args.workdir)
            teams.append(t)
            print(f"{t['mode']:13s} {t['sum_of_states'] / 1e6:16.2f} {t['disk_bytes'] / 1e6:8.2f} "
                  f"{t['sharing_factor']:7.2f}x {t['agents_per_gb']:9.1f}", flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": bu.machine(), "args": vars(args), "model": model,
                       "modes": rows, "teams": teams}, f, indent=1)
    if args.plot:
        plot(rows, args.plot, f"{os.path.basename(model)}, {args.ctx_tokens}-token context")
    return 0


if __name__ == "__main__":
    sys.exit(main())
