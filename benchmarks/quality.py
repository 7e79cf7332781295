"""Quality of KV at rest, for ``kv_density.py --quality`` (this module is not a script).

An f16 cache is round-tripped through each at-rest format (q8_0 / q4_0 / q4_1 / iq4_nl) and
compared with the exact one. Model: the default Gemma 3 270M Q4_K_M, ``chat_format="gemma"``,
``flash_attn=True``, f16 live KV. For each of 8 fixed chat prompts (a few hundred tokens each):
evaluate all but the last prompt token, take the sequence state, transcode every K and V row
of it through the at-rest format and back (``agentkv._quant.kernels.roundtrip`` over
``seqstate.parse`` spans), restore it with ``Engine.restore`` into a cleared context (the exact
layout a never-evicted context has), evaluate the last prompt token, and compare with the same
steps on the untouched state:

* top-1: the next token agrees with the exact restore's;
* KL: KL(exact || at-rest) of the next-token distribution (nats), mean over prompts;
* greedy: tokens of the greedy continuation (up to ``--continue``) identical to the exact one.

A reference row, ``1-ulp``, flips one bit of one K value instead: the noise floor of this
model on this CPU (see NOISE below).

Held-out perplexity: a separate text, its first half evaluated, the KV round-tripped, the
second half scored in one batch with logits at every position (teacher forcing); also gives
top-1 agreement and mean KL per position over that half.

Measured here (x86_64, 2 shared cores; benchmarks/results/kv_quality_x86_64.json)::

    format     top-1    mean KL  greedy same  (min)      ppl  ppl chg  ho top-1     ho KL
    exact     100.0%   0.00e+00         64.0     64   23.638   +0.00%    100.0%  0.00e+00
    1-ulp     100.0%   1.84e-03         64.0     64   23.550   -0.37%     95.8%  4.03e-03
    q8_0       87.5%   7.51e-03         56.0      0   23.631   -0.03%     96.3%  5.87e-03
    q4_0      100.0%   1.62e-01         26.2      3   23.992   +1.50%     88.9%  3.49e-02
    q4_1       87.5%   2.12e-01         31.2      0   23.735   +0.41%     88.9%  2.57e-02
    iq4_nl    100.0%   1.23e-01         40.1      1   24.173   +2.26%     90.5%  2.14e-02
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import llama_cpp
from llama_cpp import Llama

import benchutil as bu
from agentkv._quant import kernels as quant
from agentkv._format import seqstate
from agentkv._llama.engine import Engine
from agentkv._format.snapshot import Snapshot

GGML_TYPE_F16 = 1
# Reference row: the state with a single bit flipped (the lowest mantissa bit of one K value).
# On this model any change to the KV, however small, moves the logits this much: ggml's CPU
# matmuls quantize activations to 8 bits (q8_K) for Q4_K weights, so a perturbation flips
# roundings downstream. It is the floor no at-rest format can go below.
NOISE = "1-ulp"

PROMPTS = [
    "Summarize the following note for a busy manager in three bullet points.\n\n"
    "The migration of the billing service to the new database cluster is two weeks behind "
    "schedule. The main cause is that the legacy schema stores currency amounts as floating "
    "point numbers, and converting them to fixed-point decimals exposed about four thousand "
    "invoices whose totals no longer match the sum of their line items by one or two cents. "
    "Finance has asked us not to silently correct these records, so each one needs a manual "
    "review and an audit entry. We have automated the detection and prepared a review tool; "
    "two people from finance are working through the backlog at roughly three hundred "
    "invoices a day. Once the backlog is cleared we need three days for the final cutover, "
    "including a dry run on a copy of production data and a rollback rehearsal.",

    "Explain to a first-year student why the sky is blue, and why sunsets are red. Keep it "
    "concrete and avoid equations. Sunlight looks white but contains all visible colours. "
    "When it passes through the atmosphere it meets molecules of nitrogen and oxygen that are "
    "much smaller than the wavelength of the light. Such small particles scatter short "
    "wavelengths far more strongly than long ones, an effect named after Lord Rayleigh. Blue "
    "light is therefore scattered across the whole sky and reaches our eyes from every "
    "direction, while red and yellow light mostly travel straight on. Near sunset the light "
    "crosses a much longer path through the air, so most of the blue has been scattered away "
    "before it reaches us, and what remains is dominated by orange and red.",

    "Write a short Python function that reads a CSV file of temperature measurements with "
    "columns station, timestamp and celsius, and returns, for each station, the mean of the "
    "daily maxima. Then explain the edge cases it handles. Requirements: timestamps are ISO "
    "8601 strings in UTC; some rows have an empty celsius field and must be skipped; a station "
    "may have days without any measurement, which must not count as zero; the file can be "
    "larger than memory, so it has to be streamed row by row; the result should be a "
    "dictionary mapping station names to floats rounded to one decimal. Use only the standard "
    "library and add a docstring with a small example.",

    "You are a careful travel planner. A family of four, two adults and two children aged "
    "seven and eleven, wants to spend five days in Lisbon in late April on a moderate budget. "
    "They do not want to rent a car, they enjoy museums for at most two hours at a time, the "
    "younger child gets tired after long walks, and one adult is vegetarian. They arrive on a "
    "Monday at noon and leave on Saturday morning. Propose a day-by-day plan with one main "
    "activity in the morning and one in the afternoon, mention public transport between the "
    "places, suggest one day trip outside the city, and keep a rainy-day alternative for each "
    "day. Finish with a rough cost estimate per day for food and tickets.",

    "Read this customer message and draft a polite reply from the support team.\n\n"
    "Hello, I ordered a pair of running shoes from your shop three weeks ago, order number "
    "48213. The tracking page has said that the parcel is in transit since the fourth day, and "
    "nothing has changed since. I contacted the courier, who told me the parcel was returned "
    "to the sender because of an incomplete address, but the address in my account is "
    "correct and includes the apartment number. I need the shoes for a race in ten days. "
    "Could you either send a new pair by express delivery or refund the order? I have been a "
    "customer for years and this is the first time something like this has happened. Thanks, "
    "Maria.",

    "Compare two approaches to caching in a web application: caching whole rendered pages at "
    "a reverse proxy, and caching individual database query results inside the application. "
    "Discuss invalidation, memory use, personalization, consistency after writes, and what "
    "happens when the cache is cold after a deployment. Consider an online shop with a "
    "product catalogue that changes a few times per hour, user-specific shopping carts, and "
    "a homepage that shows the ten most popular products of the day. Recommend a combination "
    "for this shop and explain which parts of each page should be cached where, how long the "
    "entries should live, and how the team can measure whether the cache actually helps.",

    "Translate the meaning of the following paragraph into plain English for a general "
    "audience, keeping every fact.\n\nThe randomized controlled trial enrolled 1,240 adults "
    "with moderate hypertension across 31 outpatient clinics. Participants were assigned in a "
    "one-to-one ratio to a structured home blood pressure monitoring programme with monthly "
    "pharmacist review, or to usual care. At twelve months, mean systolic pressure fell by "
    "9.8 mmHg in the intervention group and by 4.1 mmHg in the control group, a difference "
    "of 5.7 mmHg. Adverse events were similar in both groups. Adherence to the monitoring "
    "schedule declined from 91 percent in the first quarter to 68 percent in the last.",

    "Act as a chess coach. A beginner lost a game after the following sequence: they opened "
    "with the king's pawn, developed their knights quickly, but then moved their queen out "
    "early to attack a pawn, lost two tempi when the queen was chased by minor pieces, "
    "castled late, and finally had their king attacked along the open f-file. Explain the "
    "general principles they broke, in order of importance, with one short illustrative "
    "example for each principle. Then give them a simple checklist of five questions to ask "
    "themselves before every move in the opening, and suggest how to practise these habits "
    "over the next month with about thirty minutes a day.",
]

HELD_OUT = (
    "The lighthouse stood on a narrow spit of rock at the mouth of the harbour, and for a "
    "hundred and twenty years it had been kept by members of the same family. The last keeper, "
    "an old man named Tomas, had learned the work from his mother, who had learned it from "
    "hers. Every evening he climbed the ninety-six steps of the spiral stair, trimmed the wick, "
    "polished the great lens until no fingerprint remained on it, and wound the clockwork that "
    "turned the light. In winter storms the spray reached the gallery windows, and the whole "
    "tower hummed with the wind like a struck bell. Ships that passed in the night never saw "
    "him; they saw only the beam sweeping across the water every twelve seconds, steady and "
    "patient. When the harbour authority announced that the light would be automated, the "
    "town held a meeting in the school hall. Some people argued that a machine would be more "
    "reliable than a man in his seventies, and cheaper too. Others said that a machine could "
    "not notice a small boat in trouble, or row out to it, as Tomas had done more than once. "
    "In the end the decision was not theirs to make. The engineers came in spring, installed "
    "an electric lamp and a small solar panel, and left a grey box that reported the state of "
    "the light to an office two hundred kilometres away. Tomas was allowed to stay in the "
    "keeper's cottage. For a while he still climbed the stair every evening, out of habit, and "
    "stood beside the silent lens while the new lamp did its work. Later he walked along the "
    "harbour wall instead, and told the children who fished there about the storms of his "
    "youth, the wrecks he remembered, and the names of the ships that had come home safely "
    "because someone had kept the light burning. The children listened politely, and some of "
    "them, years later, told the same stories to their own children."
)


def chat_tokens(llm: Llama, text: str) -> List[int]:
    rendered = f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"
    return llm.tokenize(rendered.encode(), add_bos=True, special=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


def transcode_state(blob: np.ndarray, fmt: Optional[str]) -> "tuple[np.ndarray, int]":
    """A copy of the state with every f16 K/V row round-tripped through ``fmt``, and the size
    the state would have with those rows stored in ``fmt``."""
    out = np.array(blob, dtype=np.uint8, copy=True)
    size = out.nbytes
    if fmt is None:
        return out, size
    if fmt == NOISE:  # the smallest change there is: one bit of one K value
        first = seqstate.parse(out).caches[0].only_stream().k[0]
        out[first.start + 200] ^= 1  # lowest mantissa bit of value 100 of cell 0, layer 0
        return out, size
    for cache in seqstate.parse(out).caches:
        for stream in cache.streams:
            if stream is None:
                continue
            for span in stream.k + stream.v:
                if span.type != GGML_TYPE_F16:
                    continue
                rows = out[span.start:span.end].view(np.float16)
                rows[:] = quant.roundtrip(rows, fmt)
                size += quant.encoded_size(rows.size, fmt) - rows.nbytes
    return out, size


def restore(engine: Engine, tokens: Sequence[int], blob: np.ndarray) -> None:
    engine.restore(Snapshot(np.asarray(tokens, dtype=np.int32), blob, None))


def greedy(llm: Llama, first_logits: np.ndarray, n: int) -> List[int]:
    out, logits = [], first_logits
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        if tok == llm.token_eos() or len(out) == n:
            break
        llm.eval([tok])
        logits = bu.last_logits(llm).astype(np.float64)
    return out


def score_batch(llm: Llama, tokens: Sequence[int]) -> np.ndarray:
    """Evaluate ``tokens`` after the context's n_tokens in one batch; logits of every one."""
    n_past = llm.n_tokens
    logits = []
    for s in range(0, len(tokens), llm.n_batch):
        chunk = list(tokens[s:s + llm.n_batch])
        llm._batch.set_batch(batch=chunk, n_past=n_past, logits_all=True)
        llm._ctx.decode(llm._batch)
        for i in range(len(chunk)):
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, i)
            logits.append(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32))
        n_past += len(chunk)
    llm.n_tokens = n_past
    return np.stack(logits)


def prompt_quality(llm: Llama, engine: Engine, formats: List[str], n_cont: int) -> Dict[str, dict]:
    rows: Dict[str, dict] = {f: {"top1": [], "kl": [], "greedy_same": []} for f in ["exact"] + formats}
    for text in PROMPTS:
        toks = chat_tokens(llm, text)
        engine.clear()
        llm.eval(toks[:-1])
        blob = engine.snapshot().state  # the sequence state of all but the last token
        ref_logits, ref_cont = None, None
        for fmt in ["exact"] + formats:
            rt, _ = transcode_state(blob, None if fmt == "exact" else fmt)
            restore(engine, toks[:-1], rt)
            llm.eval(toks[-1:])
            logits = bu.last_logits(llm).astype(np.float64)
            cont = greedy(llm, logits, n_cont)
            if ref_logits is None:
                ref_logits, ref_cont = logits, cont
            same = next((i for i, (a, b) in enumerate(zip(cont, ref_cont)) if a != b),
                        min(len(cont), len(ref_cont)))
            r = rows[fmt]
            r["top1"].append(int(np.argmax(logits) == np.argmax(ref_logits)))
            r["kl"].append(kl(ref_logits, logits))
            r["greedy_same"].append(same)
        rows.setdefault("_n_tokens", []).append(len(toks))  # type: ignore[arg-type]
    return rows


def heldout_quality(llm: Llama, engine: Engine, formats: List[str]) -> Dict[str, dict]:
    toks = llm.tokenize(HELD_OUT.encode(), add_bos=True)
    h = len(toks) // 2
    engine.clear()
    llm.eval(toks[:h])
    blob = engine.snapshot().state
    target = np.asarray(toks[h:], dtype=np.int64)
    out: Dict[str, dict] = {}
    ref = None
    for fmt in ["exact"] + formats:
        rt, _ = transcode_state(blob, None if fmt == "exact" else fmt)
        restore(engine, toks[:h], rt)
        # the logits predicting toks[h] come from toks[h-1]: replay it, then score the rest
        engine.llm._ctx.kv_cache_seq_rm(0, h - 1, -1)
        llm.n_tokens = h - 1
        logits = score_batch(llm, toks[h - 1:-1])
        lp = log_softmax(logits.astype(np.float64))
        nll = -lp[np.arange(len(target)), target]
        if ref is None:
            ref = lp
        p = np.exp(ref)
        out[fmt] = {
            "ppl": float(np.exp(nll.mean())),
            "kl": float((p * (ref - lp)).sum(axis=-1).mean()),
            "top1": float((lp.argmax(-1) == ref.argmax(-1)).mean()),
            "n_scored": int(len(target)),
        }
    return out


def measure(model: Optional[str], threads: int, formats: List[str],
            n_cont: int) -> Dict[str, Any]:
    """Every at-rest format in ``formats`` (and the 1-ulp reference) against the exact restore:
    ``{"formats": {name: row}, "prompt_tokens": [...], ...}`` (kv_density.py's ``quality``)."""
    t0 = time.perf_counter()
    llm = bu.load_llm(model, 1024, threads, chat_format="gemma")
    try:
        engine = Engine(llm)
        prompts = prompt_quality(llm, engine, [NOISE] + formats, n_cont)
        n_tokens = prompts.pop("_n_tokens")
        held = heldout_quality(llm, engine, [NOISE] + formats)
    finally:
        llm.close()
    table = {}
    for fmt in ["exact", NOISE] + formats:
        r, h = prompts[fmt], held[fmt]
        table[fmt] = {
            "top1": float(np.mean(r["top1"])), "kl": float(np.mean(r["kl"])),
            "greedy_same_mean": float(np.mean(r["greedy_same"])),
            "greedy_same_min": int(np.min(r["greedy_same"])), "greedy_same": r["greedy_same"],
            "heldout_ppl": h["ppl"], "heldout_ppl_change": h["ppl"] / held["exact"]["ppl"] - 1,
            "heldout_top1": h["top1"], "heldout_kl": h["kl"],
        }
    return {"backend": quant.BACKEND, "isa": quant.ISA, "prompt_tokens": n_tokens,
            "heldout_scored": held["exact"]["n_scored"], "continue": n_cont, "formats": table,
            "seconds": time.perf_counter() - t0}


def print_table(q: Dict[str, Any]) -> None:
    n = q["prompt_tokens"]
    print(f"\nquality at rest: backend {q['backend']} ({q['isa']}); {len(PROMPTS)} prompts of "
          f"{min(n)}-{max(n)} tokens; held-out {q['heldout_scored']} scored tokens")
    print(f"{'format':<8}{'top-1':>8}{'mean KL':>11}{'greedy same':>13}{'(min)':>7}"
          f"{'ppl':>9}{'ppl chg':>9}{'ho top-1':>10}{'ho KL':>10}")
    for fmt, row in q["formats"].items():
        print(f"{fmt:<8}{row['top1']:>8.1%}{row['kl']:>11.2e}{row['greedy_same_mean']:>13.1f}"
              f"{row['greedy_same_min']:>7d}{row['heldout_ppl']:>9.3f}"
              f"{row['heldout_ppl_change']:>+9.2%}{row['heldout_top1']:>10.1%}"
              f"{row['heldout_kl']:>10.2e}")
    print(f"(greedy same: identical tokens of a {q['continue']}-token greedy continuation; "
          f"mean over prompts; {q['seconds']:.0f} s)")
