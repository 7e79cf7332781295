"""Peers of agentkv in agent_memory_bench.py's run: llama-cpp-python's own prompt caches.

What a llama-cpp-python user picks today to keep agents' KV: ``llm.set_cache(LlamaRAMCache(...))``
or ``llm.set_cache(LlamaDiskCache(...))``. Each peer runs the very schedule agentkv ran, on the
same ``Llama``, with the same prompts (each agent's history is what the Llama holds after its
turn, so a greedy decode gives agentkv's prompts again; that is checked). Both caches run with
llama-cpp-python's default capacity (2 GiB), what a user gets from ``LlamaRAMCache()``; that is
more RAM than agentkv's RAM budget in this benchmark's schedules, so the RAM peer is not starved.
``LlamaDiskCache``'s files are warmed or dropped from the page cache as agentkv's are.

How those caches work (llama-cpp-python 0.3.36, ``Llama._create_completion``): before a call,
the stored state whose tokens share the longest prefix with the prompt is loaded when that
prefix is longer than the live context's own; after the call, the whole context state is
stored (``Llama.save_state``) under prompt + completion. A hit then re-evaluates the prompt from
the end of the shared prefix (for a resume: the last token). ``LlamaDiskCache`` *removes* the
entry it finds on every lookup, used or not, and stores a state again only at the end of the
call: with agents taking turns, the next agent's lookup (which shares the BOS token with every
entry) takes the previous agent's state away. Reported per return: TTFT, and the prefix the
peer's cache held for the prompt (measured untimed before the call).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import statistics
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from llama_cpp import Llama, LlamaDiskCache, LlamaRAMCache

import benchutil as bu

__all__ = ["PEERS", "run_peers", "summarize_peers", "print_peers"]

PEERS = ("ram", "disk")


def _cached_prefix(cache: Any, prompt: List[int]) -> int:
    """Tokens of ``prompt`` the cache's best entry shares (llama-cpp-python's own lookup)."""
    key = cache._find_longest_prefix_key(tuple(prompt))  # the peer's object, not agentkv's
    return 0 if key is None else Llama.longest_token_prefix(list(key), prompt)


def run_peer(llm: Llama, name: str, args: Any, contexts: Dict[str, List[int]],
             extra: Dict[Tuple[int, int], List[int]], schedule: List[Tuple[str, int]],
             prompts: Dict[Tuple[str, int, str], List[int]], rep: int,
             ttft_and_decode: Any, progress: Any) -> List[dict]:
    """The schedule on ``llm`` with peer ``name``'s cache set; one row per turn."""
    cache_dir: Optional[str] = None
    if name == "ram":
        cache: Any = LlamaRAMCache()
    else:
        cache_dir = tempfile.mkdtemp(prefix="agentkv-peer-", dir=args.cache_root)
        cache = LlamaDiskCache(cache_dir=cache_dir)
    rows: List[dict] = []
    history = {a: list(toks) for a, toks in contexts.items()}
    bu.clear_kv(llm)
    llm.set_cache(cache)
    try:
        for kind, r in schedule:
            for i, agent_id in enumerate(history):
                prompt = history[agent_id] + (extra[(i, r)] if kind == "turn" else [])
                if cache_dir is not None and kind != "build":
                    if args.cold_disk:
                        bu.drop_page_cache(cache_dir)
                    else:
                        bu.warm_page_cache(cache_dir)
                held = _cached_prefix(cache, prompt) if kind != "build" else 0
                with contextlib.redirect_stderr(io.StringIO()):  # LlamaDiskCache prints
                    m = ttft_and_decode(llm.create_completion(
                        prompt, max_tokens=args.max_tokens, temperature=0, stream=True))
                history[agent_id] = [int(t) for t in llm.input_ids[: llm.n_tokens]]
                same = kind == "build" or prompts.get((kind, r, agent_id)) == prompt
                rows.append({"mode": f"peer-{name}", "repeat": rep, "kind": kind, "round": r,
                             "agent": agent_id, "prompt_tokens": len(prompt),
                             "cached_prefix": held, "same_prompt": same, **m})
                progress.log(f"rep {rep} peer-{name} {kind:6s} r{r} {agent_id}: cached prefix "
                             f"{held:5d} of {len(prompt)}, TTFT {m['ttft_s'] * 1e3:9.1f} ms")
                progress.step(f"peer-{name} r{r}")
    finally:
        llm.set_cache(None)
        bu.clear_kv(llm)
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return rows


def run_peers(llm: Llama, names: List[str], args: Any, contexts: Dict[str, List[int]],
              extra: Dict[Tuple[int, int], List[int]], schedule: List[Tuple[str, int]],
              agentkv_prompts: List[dict], rep: int, ttft_and_decode: Any,
              progress: Any) -> List[dict]:
    prompts = {(p["kind"], p["round"], p["agent"]): p["prompt"] for p in agentkv_prompts}
    rows: List[dict] = []
    for name in names:
        rows += run_peer(llm, name, args, contexts, extra, schedule, prompts, rep,
                         ttft_and_decode, progress)
    return rows


def summarize_peers(rows: List[dict], names: List[str]) -> Dict[str, Any]:
    """Per return kind and peer: TTFT medians and p90s against naive and agentkv, same prompts."""
    key = lambda x: (x["repeat"], x["kind"], x["round"], x["agent"])  # noqa: E731
    naive = {key(x): x["ttft_s"] for x in rows if x["mode"] == "naive"}
    ours = {key(x): x["ttft_s"] for x in rows if x["mode"] == "agentkv"}
    out: Dict[str, Any] = {}
    for kind in ("resume", "turn"):
        for name in names:
            g = [x for x in rows if x["mode"] == f"peer-{name}" and x["kind"] == kind]
            if not g:
                continue
            t = [x["ttft_s"] for x in g]
            n = [naive[key(x)] for x in g]
            a = [ours[key(x)] for x in g]
            out.setdefault(kind, {})[name] = {
                "returns": len(g), "peer": bu.summarize(t), "naive": bu.summarize(n),
                "agentkv": bu.summarize(a),
                "naive_over_peer": statistics.median(n) / statistics.median(t),
                "peer_over_agentkv": statistics.median(t) / statistics.median(a),
                "cached_prefix_median": statistics.median(x["cached_prefix"] for x in g),
                "prompt_tokens_median": statistics.median(x["prompt_tokens"] for x in g),
                "same_prompts": all(x["same_prompt"] for x in g)}
    return out


def print_peers(summary: Dict[str, Any], turn_tokens: int) -> None:
    print("\npeers on the same Llama and prompts (llama-cpp-python's llm.set_cache):")
    print(f"{'return':8s} {'peer':14s} {'n':>3s} {'peer med':>10s} {'p90':>10s} {'naive med':>10s} "
          f"{'agentkv med':>11s} {'naive/peer':>10s} {'peer/akv':>9s} {'cached/prompt':>14s}")
    for kind, peers in summary.items():
        label = "resume" if kind == "resume" else f"turn+{turn_tokens}"
        for name, row in peers.items():
            peer = "LlamaRAMCache" if name == "ram" else "LlamaDiskCache"
            cached = f"{row['cached_prefix_median']:.0f}/{row['prompt_tokens_median']:.0f}"
            print(f"{label:8s} {peer:14s} {row['returns']:3d} {row['peer']['median_ms']:8.1f}ms "
                  f"{row['peer']['p90_ms']:8.1f}ms {row['naive']['median_ms']:8.1f}ms "
                  f"{row['agentkv']['median_ms']:9.2f}ms {row['naive_over_peer']:9.1f}x "
                  f"{row['peer_over_agentkv']:8.1f}x {cached:>14s}"
                  + ("" if row["same_prompts"] else "  (prompts differ from agentkv's!)"))
