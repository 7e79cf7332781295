"""Self-draft decoding (``AgentMemory(draft="ngram")``): decode speed, acceptance, identity.

Commands (each prints a table and can write JSON)::

    # speed per kind of turn, drafting on vs off in the same run, default model
    .venv/bin/python benchmarks/draft_bench.py --json draft_gemma.json
    # the same on Qwen2.5-Coder-0.5B (bash ../shared/models/get_models.sh fetches it)
    .venv/bin/python benchmarks/draft_bench.py --model ~/.cache/agentkv-models/qwen2.5-coder-0.5b-instruct.gguf
    # identity: how often a drafted greedy output differs from the undrafted one, N turns
    .venv/bin/python benchmarks/draft_bench.py --identity 200 --json identity_gemma.json

Speed: each kind of turn (copy-heavy: ``rewrite`` a function with one change, ``quote`` a
paragraph verbatim, ``repeat`` a plan from earlier in the conversation; free text: a new
answer, ``new``, ``story``, ``compare``) runs as an agent's turn through ``AgentMemory`` with
drafting on and off, alternating, ``--repeats`` times. Decode speed is (tokens made - 1) / (time from the first token to the
last): prefill is the same in both arms and is left out. Reported: medians, their ratio
(drafted / plain), the share of drafted tokens the model accepted, and whether the two
outputs are token-for-token identical.

Identity: ``--identity N`` runs N different turns (copy-heavy and free, built from varied
material) with and without drafting and counts the turns whose tokens differ; the first
divergence found is printed (position, the two continuations).

The turns are driven through ``llm.generate`` inside ``mem.agent(...)`` blocks (what
``create_completion`` runs), with the prompt rendered by the model's chat template, so that
the first-token time and the token count are exact.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import llama_cpp
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import (Progress, add_common_args, load_llm, machine, machine_line,  # noqa: E402
                       parse_common, write_json)

from agentkv import AgentMemory  # noqa: E402

CODE = '''def merge_intervals(intervals):
    """Merge overlapping intervals and return them sorted by start."""
    if not intervals:
        return []
    ordered = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(ordered[0])]
    for start, end in ordered[1:]:
        last = merged[-1]
        if start <= last[1]:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return [tuple(pair) for pair in merged]


def total_covered(intervals):
    """Length of the union of the intervals."""
    return sum(end - start for start, end in merge_intervals(intervals))
'''

PROSE = ("Caching is a trade between memory and time. A cache keeps the result of a costly "
         "computation so that the next request for it is served at once.\n\n"
         "The hard part is not storing results but knowing when a stored result is still "
         "valid. A cache that serves a stale or foreign entry is worse than no cache at all, "
         "because it fails silently and its answers look right.\n\n"
         "For this reason every entry carries a fingerprint of everything that produced it, "
         "and an entry whose fingerprint does not match the current settings is never served.")

PLAN = ("1. Read the failing test and reproduce it locally.\n"
        "2. Bisect the commits since the last green build.\n"
        "3. Write a minimal test that isolates the regression.\n"
        "4. Fix the bug in the smallest possible change.\n"
        "5. Run the whole suite twice, once with the cache cold.\n"
        "6. Update the changelog and open a pull request.\n"
        "7. Ask a reviewer who knows the storage layer.\n"
        "8. Merge after CI passes on both platforms.")

TURNS: Dict[str, Tuple[str, List[Dict[str, str]]]] = {
    "rewrite": ("copy", [{"role": "user", "content": "Here is a Python module:\n\n" + CODE +
                          "\nRewrite the whole module with the function merge_intervals renamed "
                          "to merge_spans. Change nothing else. Output only the code."}]),
    "quote": ("copy", [{"role": "user", "content": PROSE + "\n\nQuote the second and third "
                        "paragraphs above word for word, then add one sentence of comment."}]),
    "repeat": ("copy", [{"role": "user", "content": "Here is our plan:\n" + PLAN +
                         "\nRemember it."},
                        {"role": "assistant", "content": "Understood. I have the plan."},
                        {"role": "user", "content": "Restate the plan exactly as written, all "
                         "eight steps, with their numbers."}]),
    "new": ("free", [{"role": "user", "content": "Explain to a new engineer, in a few "
                      "paragraphs, why a team should write tests before fixing a bug."}]),
    "story": ("free", [{"role": "user", "content": "Write a short story about a lighthouse "
                        "keeper who finds a strange map."}]),
    "compare": ("free", [{"role": "user", "content": "What are the pros and cons of "
                          "microservices compared to a monolith? Answer in detail."}]),
}

TOPICS = ["a lighthouse keeper", "compilers", "the water cycle", "a chess opening", "bread",
          "volcanoes", "a city at night", "sorting algorithms", "the moon landing", "gardening",
          "a train journey", "memory allocators", "honey bees", "an old map", "rain in spring",
          "distributed locks", "a violin", "glaciers", "a marketplace", "hash tables"]


def render(llm: Llama, messages: List[Dict[str, str]]) -> List[int]:
    """The prompt tokens of ``messages`` under the model's chat template (Gemma's GGUF has
    none: its format is written out, as llama-cpp-python's "gemma" chat format does)."""
    template = llm.metadata.get("tokenizer.chat_template")
    if template:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        tok = lambda t: llm.detokenize([t], special=True).decode("utf-8", "replace")  # noqa: E731
        fmt = Jinja2ChatFormatter(template, eos_token=tok(llm.token_eos()),
                                  bos_token=tok(llm.token_bos()))
        text = fmt(messages=messages).prompt
        return llm.tokenize(text.encode(), add_bos=False, special=True)
    text = "".join(f"<start_of_turn>{'model' if m['role'] == 'assistant' else 'user'}\n"
                   f"{m['content']}<end_of_turn>\n" for m in messages) + "<start_of_turn>model\n"
    return llm.tokenize(text.encode(), add_bos=True, special=True)


def run_turn(mem: AgentMemory, agent: str, prompt: Sequence[int], max_tokens: int,
             draft: Any) -> Dict[str, Any]:
    """One greedy turn; its tokens, decode seconds after the first token, drafting counts."""
    vocab = llama_cpp.llama_model_get_vocab(mem.llm.model)
    out: List[int] = []
    t_first = t_last = 0.0
    with mem.agent(agent, draft=draft) as live:
        for tok in live.generate(prompt, temp=0.0):
            now = time.perf_counter()
            if not out:
                t_first = now
            t_last = now
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            out.append(int(tok))
            if len(out) >= max_tokens:
                break
    turn = mem.last_turn
    return {"tokens": out, "decode_s": t_last - t_first,
            "drafted": turn.draft_tokens if turn else 0,
            "accepted": turn.draft_accepted if turn else 0}


def speed(llm: Llama, repeats: int, max_tokens: int, progress: Progress) -> Dict[str, Any]:
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache:
        mem = AgentMemory(llm, cache_dir=cache, share_prefixes=False)
        run_turn(mem, "warmup", render(llm, TURNS["new"][1]), 8, False)
        for name, (kind, messages) in TURNS.items():
            prompt = render(llm, messages)
            arms: Dict[str, List[Dict[str, Any]]] = {"plain": [], "draft": []}
            for r in range(repeats):
                for arm in (("plain", "draft") if r % 2 == 0 else ("draft", "plain")):
                    agent = f"{name}-{arm}-{r}"  # a new agent: the whole prompt is its own
                    arms[arm].append(run_turn(mem, agent, prompt, max_tokens,
                                              "ngram" if arm == "draft" else False))
                    mem.forget(agent)
                    progress.step(f"{name} {arm}")
            rate = {a: statistics.median((len(t["tokens"]) - 1) / t["decode_s"]
                                         for t in arms[a] if t["decode_s"] > 0) for a in arms}
            drafted = sum(t["drafted"] for t in arms["draft"])
            accepted = sum(t["accepted"] for t in arms["draft"])
            results[name] = {
                "kind": kind, "prompt_tokens": len(prompt),
                "tokens": len(arms["plain"][0]["tokens"]),
                "plain_tok_s": rate["plain"], "draft_tok_s": rate["draft"],
                "speedup": rate["draft"] / rate["plain"],
                "acceptance": accepted / drafted if drafted else None,
                "drafted": drafted, "accepted": accepted,
                "identical": all(t["tokens"] == arms["plain"][0]["tokens"]
                                 for t in arms["plain"] + arms["draft"]),
            }
            progress.log(f"{name:8s} {kind:5s} plain {rate['plain']:6.1f} tok/s  draft "
                         f"{rate['draft']:6.1f} tok/s  x{results[name]['speedup']:.2f}  "
                         f"accepted {accepted}/{drafted}  identical {results[name]['identical']}")
        mem.close()
    return results


def identity_turns(n: int) -> List[Tuple[str, List[Dict[str, str]]]]:
    """``n`` different turns, half copy-heavy and half free text."""
    turns = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        k = i // len(TOPICS)
        if i % 2 == 0:
            material = [CODE, PROSE, PLAN][(i // 2) % 3]
            asks = ["Repeat the text above exactly.",
                    f"Quote the part of the text above that is closest to {topic}.",
                    "Rewrite the text above with every line numbered.",
                    "Copy the text above, then summarize it in one line."]
            turns.append(("copy", [{"role": "user", "content":
                                    f"{material}\n\n{asks[(i // 6 + k) % len(asks)]}"}]))
        else:
            asks = [f"Write a short paragraph about {topic}.",
                    f"Give three facts about {topic}.",
                    f"Write a four-line poem about {topic}.",
                    f"Explain {topic} to a child."]
            turns.append(("free", [{"role": "user", "content": asks[(i // 2 + k) % len(asks)]}]))
    return turns


def identity(llm: Llama, n: int, max_tokens: int, progress: Progress) -> Dict[str, Any]:
    same = {"copy": 0, "free": 0}
    total = {"copy": 0, "free": 0}
    drafted = accepted = 0
    examples: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as cache:
        mem = AgentMemory(llm, cache_dir=cache, share_prefixes=False, disk_budget="1GiB")
        for i, (kind, messages) in enumerate(identity_turns(n)):
            prompt = render(llm, messages)
            plain = run_turn(mem, f"p{i}", prompt, max_tokens, False)
            drawn = run_turn(mem, f"d{i}", prompt, max_tokens, "ngram")
            mem.forget(f"p{i}")
            mem.forget(f"d{i}")
            drafted += drawn["drafted"]
            accepted += drawn["accepted"]
            total[kind] += 1
            if plain["tokens"] == drawn["tokens"]:
                same[kind] += 1
            elif len(examples) < 3:
                a, b = plain["tokens"], drawn["tokens"]
                at = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
                text = lambda t: llm.detokenize(t).decode("utf-8", "replace")  # noqa: E731
                examples.append({"turn": i, "kind": kind, "at_token": at,
                                 "common": text(a[max(0, at - 12):at]),
                                 "plain": text(a[at:at + 12]), "drafted": text(b[at:at + 12])})
                progress.log(f"turn {i} ({kind}) differs at token {at}: ...{examples[-1]['common']!r}"
                             f" then {examples[-1]['plain']!r} vs {examples[-1]['drafted']!r}")
            progress.step(kind)
        mem.close()
    turns = sum(total.values())
    return {"turns": turns, "identical": sum(same.values()),
            "identity_rate": sum(same.values()) / turns if turns else None,
            "by_kind": {k: {"turns": total[k], "identical": same[k]} for k in total},
            "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / drafted if drafted else None, "examples": examples}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap, repeats=3)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--identity", type=int, default=0, metavar="N",
                    help="measure the identity rate over N turns instead of speed")
    ap.add_argument("--n-ctx", type=int, default=4096)
    args = parse_common(ap, argv)
    llm = load_llm(args.model, args.n_ctx, args.threads)
    report: Dict[str, Any] = {"machine": machine(), "model": os.path.basename(args.model),
                              "threads": args.threads, "max_tokens": args.max_tokens}
    if args.identity:
        max_tokens = min(args.max_tokens, 64)
        progress = Progress(args.identity, "identity")
        report["identity"] = identity(llm, args.identity, max_tokens, progress)
        report["max_tokens"] = max_tokens
        r = report["identity"]
        print(f"{report['model']}: {r['identical']}/{r['turns']} turns identical "
              f"({r['identity_rate']:.1%}); by kind {r['by_kind']}; acceptance "
              f"{r['acceptance'] if r['acceptance'] is None else round(r['acceptance'], 3)}")
    else:
        progress = Progress(2 * args.repeats * len(TURNS), "speed")
        report["speed"] = speed(llm, args.repeats, args.max_tokens, progress)
        print(f"\n{report['model']} ({args.threads} threads, up to {args.max_tokens} tokens)")
        print(f"{'turn':8s} {'kind':5s} {'tokens':>6s} {'plain':>8s} {'draft':>8s} "
              f"{'ratio':>6s} {'accept':>7s} identical")
        for name, r in report["speed"].items():
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
            print(f"{name:8s} {r['kind']:5s} {r['tokens']:6d} {r['plain_tok_s']:8.1f} "
                  f"{r['draft_tok_s']:8.1f} {r['speedup']:6.2f} {acc:>7s} {r['identical']}")
    print(machine_line(report["machine"]))
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
