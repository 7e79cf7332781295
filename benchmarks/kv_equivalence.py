"""The exactness proof: an evicted agent's tokens and logits equal a never-evicted agent's.

Command (exit status 0 means every hash matched and every restore was confirmed)::

    .venv/bin/python benchmarks/kv_equivalence.py --json equivalence.json
    .venv/bin/python benchmarks/kv_equivalence.py --require-prefix     # once issue 3 has landed
    # under aarch64 emulation (scripts/arm64.sh equivalence), toy sizes:
    python benchmarks/kv_equivalence.py --require-prefix --system-rules 40 --max-tokens 4

For each live KV cache type (f16, q8_0, q4_0: ``Llama(type_k=..., type_v=..., flash_attn=True)``)
and each path a returning agent's KV can take:

- ``ram``: evicted between turns into the RAM tier (a second agent takes the context);
- ``disk``: the same with no RAM budget, so every return reads disk;
- ``restart``: every turn on a new ``Llama`` and a new ``AgentMemory`` over the same cache_dir;
- ``prefix``: a new agent whose prompt starts with a system prompt another agent stored; it
  should start from that stored prefix (source "prefix"). Until the block store lands this path
  reports "not available" instead of failing (``--require-prefix`` makes it a failure).

a chat of a few turns (system prompt longer than Gemma 3's 512-token sliding window, greedy
decoding) runs twice: never evicted on the bare ``Llama``, and evicted through agentkv. After the
last turn the token ids in the context and the last logits are hashed (xxh3-128) for both runs.
A path passes when both hashes are equal, every answer is equal, and ``mem.last_turn`` shows that
each returning turn really came from the expected tier with only its new tokens evaluated (no
silent prefill).

``--matrix`` is the proof of the restore layout (agentkv/_format/layout.py: the minimal exact
padding, read from the decode thread count at restore time)::

    .venv/bin/python benchmarks/kv_equivalence.py --matrix --contexts 1300,2000,4000,8000,16000 \
        --matrix-threads 1,2,4 --continue-tokens 600 --json layout_proof.json

For each live KV type and flash-attention setting (``--combos``, default f16:fa, f16:nofa,
q8_0:fa, q4_0:fa) and each context length, an agent prefills that many tokens through agentkv
and is evicted to disk. Then, for each decode thread count, a never-evicted copy of that
context (the same prefill on a bare ``Llama``, rolled back to it before each case) and the agent restored by a new AgentMemory (a disk restore laid out for that thread
count) each decode ``--continue-tokens`` greedy tokens; the tokens and every step's logits
(xxh3-128 over all of them) must be equal and the restore confirmed (source "disk", one token
evaluated). One more case per length restores from RAM after the thread count changed between
the save (the first count) and the restore (the last): the RAM image is laid out again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import xxhash
import llama_cpp
from llama_cpp import Llama, LogitsProcessorList

from agentkv import AgentMemory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil as bu  # noqa: E402

PATHS = ("ram", "disk", "restart", "prefix")
# ~700 tokens: longer than the 512-token SWA window, so every restore exercises SWA layers.
def system_prompt(rules: int) -> str:
    return "You are a careful member of a software team. " + " ".join(
        f"Rule {i}: before step {i}, reread the plan and note one risk." for i in range(rules))


SYSTEM = system_prompt(48)
QUESTIONS = ["Plan a small command-line todo app.", "Now add due dates.",
             "Summarize the plan in one sentence."]
OTHER_QUESTIONS = ["List three risks of the todo app.", "Which risk matters most?"]
MAX_TOKENS = 12
# A returning turn evaluates only its new message: the chat template's few tokens plus the
# question. More than this means a silent prefill.
MAX_NEW_EVAL = 64


def make_llm(model: str, cache_type: str, n_ctx: int, threads: int) -> Llama:
    t = bu.CACHE_TYPES[cache_type]
    return Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, flash_attn=True, type_k=t,
                 type_v=t, chat_format="gemma", verbose=False)


def hashes(llm: Llama) -> Dict[str, str]:
    tokens = np.asarray(llm.input_ids[: llm.n_tokens], dtype=np.int32)
    logits = np.asarray(bu.last_logits(llm), dtype=np.float32)
    return {"tokens": xxhash.xxh3_128_hexdigest(tokens.tobytes()),
            "logits": xxhash.xxh3_128_hexdigest(logits.tobytes()), "n_tokens": int(tokens.size)}


def chat(step: Callable[[list], str], questions: List[str]) -> List[str]:
    """Each turn sends the whole history plus one new question; returns the answers."""
    messages: list = []
    answers = []
    for i, q in enumerate(questions):
        content = f"{SYSTEM}\n{q}" if i == 0 else q
        messages = messages + [{"role": "user", "content": content}]
        answer = step(messages)
        answers.append(answer)
        messages = messages + [{"role": "assistant", "content": answer}]
    return answers


def text(out: Dict[str, Any]) -> str:
    return out["choices"][0]["message"]["content"]


def reference(llm: Llama, questions: List[str]) -> Tuple[List[str], Dict[str, str]]:
    """The never-evicted run: the bare Llama, its own prefix reuse only."""
    bu.clear_kv(llm)
    answers = chat(lambda m: text(llm.create_chat_completion(
        messages=m, temperature=0, max_tokens=MAX_TOKENS)), questions)
    return answers, hashes(llm)


def turn_row(mem: AgentMemory) -> Dict[str, Any]:
    t = mem.last_turn
    return {"source": t.source, "evaluated": t.prompt_tokens_evaluated,
            "restored": t.prompt_tokens_restored}


def displaced_step(mem: AgentMemory, llm: Llama, agent_id: str, turns: List[dict],
                   final: Dict[str, str]):
    """A chat step for ``agent_id`` that records its turn and hashes, then lets another agent
    take the context."""
    def step(messages):
        out = mem.create_chat_completion(agent_id, messages=messages, temperature=0,
                                         max_tokens=MAX_TOKENS)
        turns.append(turn_row(mem))
        final.update(hashes(llm))
        mem.create_completion("other", f"Note {len(turns)}: nothing to add.", max_tokens=2,
                              temperature=0)
        return text(out)
    return step


def evicted_in_process(llm: Llama, cache_dir: str, ram_budget: int,
                       questions: List[str]) -> Tuple[List[str], Dict[str, str], List[dict]]:
    """The subject agent, displaced by another agent after every turn."""
    turns: List[dict] = []
    final: Dict[str, str] = {}
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=ram_budget) as mem:
        answers = chat(displaced_step(mem, llm, "subject", turns, final), questions)
    return answers, final, turns


def evicted_by_restart(model: str, cache_type: str, n_ctx: int, threads: int, cache_dir: str,
                       questions: List[str]) -> Tuple[List[str], Dict[str, str], List[dict]]:
    """Every turn on a new Llama and a new AgentMemory over the same cache_dir."""
    turns: List[dict] = []
    final: Dict[str, str] = {}

    def step(messages):
        llm = make_llm(model, cache_type, n_ctx, threads)
        try:
            with AgentMemory(llm, cache_dir=cache_dir, ram_budget="1GiB") as mem:
                out = mem.create_chat_completion("subject", messages=messages, temperature=0,
                                                 max_tokens=MAX_TOKENS)
                turns.append(turn_row(mem))
                final.update(hashes(llm))
        finally:
            llm.close()
        return text(out)

    answers = chat(step, questions)
    return answers, final, turns


def evicted_from_prefix(llm: Llama, cache_dir: str,
                        questions: List[str]) -> Tuple[List[str], Dict[str, str], List[dict]]:
    """A writer stores SYSTEM + its question; a second one, whose stored window the writer's does
    not reach, stores the shared cut (512 tokens: a multiple of n_batch, what a cold prefill
    reproduces); a new reader starting with SYSTEM follows and must restore it."""
    turns: List[dict] = []
    final: Dict[str, str] = {}
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=0) as mem:
        for name, question in (("writer", QUESTIONS[0]), ("scout", QUESTIONS[1])):
            mem.create_chat_completion(name, messages=[
                {"role": "user", "content": f"{SYSTEM}\n{question}"}], temperature=0,
                max_tokens=MAX_TOKENS)
            mem.evict(name)
        answers = chat(displaced_step(mem, llm, "reader", turns, final), questions)
    return answers, final, turns


def confirm(path: str, turns: List[dict]) -> Tuple[Optional[str], List[str]]:
    """(status override, problems): checks every return came from the expected tier."""
    problems = []
    if path == "prefix":
        first = turns[0]
        if first["source"] != "prefix":
            return "not available", [f"first turn of the new agent came from "
                                     f"{first['source']!r}, not 'prefix'"]
        if first["restored"] <= 0:
            problems.append("prefix turn restored no tokens")
        expected, returning = "disk", turns[1:]
    else:
        if turns[0]["source"] != "cold":
            problems.append(f"first turn came from {turns[0]['source']!r}, expected 'cold'")
        expected, returning = ("ram" if path == "ram" else "disk"), turns[1:]
    for k, t in enumerate(returning, start=1):
        if t["source"] != expected:
            problems.append(f"turn {k}: came from {t['source']!r}, expected {expected!r}")
        if t["evaluated"] > MAX_NEW_EVAL:
            problems.append(f"turn {k}: evaluated {t['evaluated']} prompt tokens (silent prefill?)")
        if t["restored"] <= 0:
            problems.append(f"turn {k}: restored no tokens")
    return None, problems


def check(model: str, cache_type: str, paths: List[str], n_ctx: int, threads: int,
          require_prefix: bool, workdir: str) -> List[dict]:
    llm = make_llm(model, cache_type, n_ctx, threads)
    results = []
    refs: Dict[str, Tuple[List[str], Dict[str, str]]] = {}
    try:
        for path in paths:
            questions = OTHER_QUESTIONS if path == "prefix" else QUESTIONS
            key = "prefix" if path == "prefix" else "main"
            if key not in refs:
                refs[key] = reference(llm, questions)
            ref_answers, ref_hash = refs[key]
            cache_dir = tempfile.mkdtemp(prefix=f"kv-eq-{cache_type}-{path}-", dir=workdir)
            if path == "ram":
                answers, got, turns = evicted_in_process(llm, cache_dir, 1 << 30, questions)
            elif path == "disk":
                answers, got, turns = evicted_in_process(llm, cache_dir, 0, questions)
            elif path == "restart":
                answers, got, turns = evicted_by_restart(model, cache_type, n_ctx, threads,
                                                         cache_dir, questions)
            else:
                answers, got, turns = evicted_from_prefix(llm, cache_dir, questions)
            shutil.rmtree(cache_dir, ignore_errors=True)
            status, problems = confirm(path, turns)
            same = (got.get("tokens") == ref_hash["tokens"] and got.get("logits") == ref_hash["logits"]
                    and answers == ref_answers)
            if not same:
                problems.append("hashes or answers differ from the never-evicted run")
            if status == "not available" and not require_prefix:
                verdict = "N/A"
            elif status == "not available" or problems:
                verdict = "FAIL"
            else:
                verdict = "PASS"
            row = {"cache_type": cache_type, "path": path, "verdict": verdict,
                   "never_evicted": ref_hash, "evicted": got, "answers_equal": answers == ref_answers,
                   "turns": turns, "problems": problems}
            results.append(row)
            print_row(row)
    finally:
        llm.close()
    return results


def print_row(row: Dict[str, Any]) -> None:
    ref, got = row["never_evicted"], row["evicted"]
    tiers = ",".join(f"{t['source']}/{t['evaluated']}" for t in row["turns"])
    print(f"{row['cache_type']:5s} {row['path']:8s} {row['verdict']:4s} "
          f"tokens {ref['tokens'][:16]} vs {got.get('tokens', '-')[:16]}  "
          f"logits {ref['logits'][:16]} vs {got.get('logits', '-')[:16]}  "
          f"turns (source/evaluated) {tiers}", flush=True)
    for p in row["problems"]:
        print(f"      {'note' if row['verdict'] == 'N/A' else 'problem'}: {p}", flush=True)


COMBOS = ("f16:fa", "f16:nofa", "q8_0:fa", "q4_0:fa")


def matrix_llm(model: str, combo: str, n_ctx: int, threads: int) -> Llama:
    kind, fa = combo.split(":")
    t = bu.CACHE_TYPES[kind]
    return Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=2,
                 flash_attn=fa == "fa", type_k=t, type_v=t, verbose=False)


def continue_hashed(call: Callable[..., Any], prompt: List[int], n: int) -> Dict[str, Any]:
    """``n`` greedy tokens after ``prompt``; the tokens and every step's logits, hashed."""
    h = xxhash.xxh3_128()

    def seen(_ids, scores):
        h.update(np.ascontiguousarray(scores, dtype=np.float32).tobytes())
        return scores
    out = call(prompt, max_tokens=n, temperature=0, logits_processor=LogitsProcessorList([seen]))
    toks = out["choices"][0]["text"]
    return {"text": xxhash.xxh3_128_hexdigest(toks.encode()), "logits": h.hexdigest(),
            "tokens": int(out["usage"]["completion_tokens"])}


def matrix_case(model: str, combo: str, length: int, threads: List[int], n_cont: int,
                workdir: Optional[str]) -> List[dict]:
    n_ctx = -(-(length + n_cont + 64) // 256) * 256
    llm = matrix_llm(model, combo, n_ctx, threads[0])
    ref = matrix_llm(model, combo, n_ctx, threads[0])
    base_dir = tempfile.mkdtemp(prefix=f"kv-matrix-{combo.replace(':', '-')}-", dir=workdir)
    words = " ".join(f"item {i} of the inventory is a {('red', 'blue', 'green')[i % 3]} box."
                     for i in range(length // 8 + 8))
    prompt = llm.tokenize(words.encode())[:length]
    rows = []
    try:
        mem = AgentMemory(llm, cache_dir=os.path.join(base_dir, "d"), ram_budget=1 << 31)
        mem.create_completion("a", prompt, max_tokens=1, temperature=0)
        # the greedy token is evaluated by both runs: a one-token decode on the restored cells
        prompt = prompt + [int(np.argmax(bu.last_logits(llm)))]
        # the never-evicted context: the same prefill on a bare Llama (llama.cpp's own whole-
        # context state does not reload an SWA cache exactly); each case's continuation rolls
        # it back to this point, as a never-evicted agent's next turn would
        ref.create_completion(prompt[:-1], max_tokens=1, temperature=0)
        mem.wait_durable("a")
        saved = os.path.join(base_dir, "saved")
        shutil.copytree(os.path.join(base_dir, "d"), saved)
        # the RAM case first: a second AgentMemory over the same Llama closes the first
        cases = [(threads[0], threads[-1], "ram")] + [(t, t, "disk") for t in threads]
        for t_save, t_restore, path in cases:
            llama_cpp.llama_set_n_threads(ref.ctx, t_restore, 2)
            want = continue_hashed(ref.create_completion, prompt, n_cont)
            if path == "ram":  # the agent's RAM image was laid out for t_save threads
                mem.create_completion("b", "Another agent.", max_tokens=1, temperature=0)
                llama_cpp.llama_set_n_threads(llm.ctx, t_restore, 2)
                got = continue_hashed(lambda p, **kw: mem.create_completion("a", p, **kw),
                                      prompt, n_cont)
                turn = mem.last_turn
            else:
                mem.close()
                d = tempfile.mkdtemp(dir=base_dir)
                shutil.rmtree(d)
                shutil.copytree(saved, d)
                llama_cpp.llama_set_n_threads(llm.ctx, t_restore, 2)
                with AgentMemory(llm, cache_dir=d, ram_budget=0) as m2:
                    got = continue_hashed(lambda p, **kw: m2.create_completion("a", p, **kw),
                                          prompt, n_cont)
                    turn = m2.last_turn
                shutil.rmtree(d, ignore_errors=True)
            problems = []
            if turn.source != path or turn.prompt_tokens_evaluated > 1:
                problems.append(f"restore not confirmed: source {turn.source}, "
                                f"{turn.prompt_tokens_evaluated} tokens evaluated")
            if got != want:
                problems.append("tokens or logits differ from the never-evicted context")
            row = {"combo": combo, "context": length, "path": path, "threads_saved": t_save,
                   "threads_restored": t_restore, "verdict": "FAIL" if problems else "PASS",
                   "never_evicted": want, "evicted": got, "problems": problems}
            rows.append(row)
            print(f"{combo:9s} {length:6d} {path:4s} threads {t_save}->{t_restore} "
                  f"{row['verdict']:4s} {got['tokens']} tokens, logits {want['logits'][:16]} vs "
                  f"{got['logits'][:16]} {'; '.join(problems)}", flush=True)
        mem.close()
    finally:
        llm.close()
        ref.close()
        shutil.rmtree(base_dir, ignore_errors=True)
    return rows


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="f16,q8_0,q4_0", help="live KV cache types to check")
    ap.add_argument("--paths", default=",".join(PATHS), help="restore paths to check")
    ap.add_argument("--require-prefix", action="store_true",
                    help="fail when the prefix path shows no 'prefix' restore")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="a GGUF path (default: the gemma3 270M package)")
    ap.add_argument("--workdir", default=None, help="where the temporary cache dirs go")
    ap.add_argument("--json", default=None)
    ap.add_argument("--system-rules", type=int, default=48,
                    help="length of the system prompt in rules of ~14 tokens (48: ~700 tokens, "
                    "longer than Gemma 3's 512-token window; smaller for emulated runs)")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="tokens per answer")
    ap.add_argument("--matrix", action="store_true", help="the restore-layout proof (see above)")
    ap.add_argument("--combos", default=",".join(COMBOS), help="KV type:fa|nofa pairs")
    ap.add_argument("--contexts", default="1300,2000,4000,8000,16000")
    ap.add_argument("--matrix-threads", default="1,2,4")
    ap.add_argument("--continue-tokens", type=int, default=600)
    args = ap.parse_args(argv)
    bad = [t for t in args.types.split(",") if t not in bu.CACHE_TYPES] + \
          [p for p in args.paths.split(",") if p not in PATHS]
    if bad:
        ap.error(f"unknown cache type or path: {', '.join(bad)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    global SYSTEM, MAX_TOKENS
    args = parse_args(argv)
    SYSTEM, MAX_TOKENS = system_prompt(args.system_rules), args.max_tokens
    model = args.model or bu.default_model()
    if args.matrix:
        threads = [int(t) for t in args.matrix_threads.split(",")]
        results = [r for combo in args.combos.split(",")
                   for n in (int(x) for x in args.contexts.split(","))
                   for r in matrix_case(model, combo, n, threads, args.continue_tokens,
                                        args.workdir)]
        verdicts = [r["verdict"] for r in results]
        print(f"\n{verdicts.count('PASS')} passed, {verdicts.count('FAIL')} failed")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": bu.machine(), "args": vars(args), "results": results}, f,
                          indent=1)
        return 1 if "FAIL" in verdicts else 0
    types = [t for t in args.types.split(",") if t]
    paths = [p for p in args.paths.split(",") if p]
    print(f"model {os.path.basename(model)}; {len(SYSTEM)}-char system prompt; greedy, "
          f"{MAX_TOKENS} tokens per answer; hashes are xxh3-128 (first 16 hex digits shown)")
    results = []
    for cache_type in types:
        results += check(model, cache_type, paths, args.n_ctx, args.threads, args.require_prefix,
                         args.workdir)
    verdicts = [r["verdict"] for r in results]
    print(f"\n{verdicts.count('PASS')} passed, {verdicts.count('FAIL')} failed, "
          f"{verdicts.count('N/A')} not available")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": bu.machine(), "args": vars(args), "results": results}, f, indent=1)
    return 1 if "FAIL" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
