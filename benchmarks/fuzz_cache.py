"""Fuzz campaign: damage a real cache every way a disk, a crash or a hostile user can, then check
that agentkv never answers wrong, never raises, heals after one more save, and that
``python -m agentkv verify`` flags the damage.

    python benchmarks/fuzz_cache.py --trials 200 --seed 0 --json fuzz.json

Setup (once): four agents on the default model, sharing a ~540-token prompt (so a shared cut
and shared blocks exist), each with a first turn saved to disk (block_tokens=128). References,
on the bare Llama: each agent's second turn never evicted (what a disk restore must give) and
the same prompt evaluated cold (what a prefill or a shared-prefix restore must give).

Each trial copies that cache, applies one random damage (seeded), and then:

1. ``verify`` runs (in-process): it must exit 1 whenever the damage is real (SQLite's own check
   decides for page damage of cache.db: a page SQLite does not use is not damage);
2. an AgentMemory opens the copy and runs every agent's second turn: no exception may reach the
   caller, and the tokens and logits must equal the reference for the source the turn reports
   (disk: never evicted; cold or prefix: the cold run);
3. a second AgentMemory reopens it: every agent must come back from disk (healed by its one
   save), and ``verify`` must now pass.

Damage kinds: payload files (blocks of one agent, shared blocks, cut blocks, tails) flipped,
truncated, emptied, zeroed by the page, deleted, swapped with another payload, replaced by a
FIFO or a symlink; record rows swapped, made hostile (Infinity, deep nesting, huge numbers,
wrong types) or overwritten with garbage; cache.db with a page zeroed, its header overwritten,
truncated, or a column dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import shutil
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchutil as bu  # noqa: E402

from agentkv import AgentMemory  # noqa: E402
from agentkv import cli  # noqa: E402

SHARED = "Team handbook. " + " ".join(
    f"Rule {i}: a reply about topic {i % 7} cites source {i * 5 % 11}." for i in range(38))
NAMES = ["planner", "coder", "critic", "writer"]
B = 128


def first_prompt(name: str) -> str:
    return f"{SHARED}\nYou are the {name}. In one line, what is your first step?\nAnswer:"


def second_prompt(name: str, first_answer: str) -> str:
    return f"{first_prompt(name)}{first_answer}\nAnd the second step?\nAnswer:"


_logits = bu.last_logits


def _turn(run: Callable[..., Any], prompt: str, n: int) -> str:
    out = run(prompt, max_tokens=n, temperature=0)
    return out["choices"][0]["text"]


@dataclass
class Base:
    cache: Path
    answers: Dict[str, str]  # first-turn answers
    never: Dict[str, Tuple[str, np.ndarray]]  # second turn, never evicted
    cold: Dict[str, Tuple[str, np.ndarray]]  # second turn, evaluated cold


def build_base(llm: Any, workdir: Path) -> Base:
    cache = workdir / "base"
    shutil.rmtree(cache, ignore_errors=True)
    answers: Dict[str, str] = {}
    with AgentMemory(llm, cache_dir=cache, ram_budget=0, block_tokens=B) as mem:
        for name in NAMES:
            answers[name] = _turn(lambda p, **k: mem.create_completion(name, p, **k),
                                  first_prompt(name), 6)
        mem.flush()
    never, cold = {}, {}
    for name in NAMES:
        llm.reset()
        llm.create_completion(first_prompt(name), max_tokens=6, temperature=0)
        text = _turn(llm.create_completion, second_prompt(name, answers[name]), 4)
        never[name] = (text, _logits(llm))
        llm.reset()
        text = _turn(llm.create_completion, second_prompt(name, answers[name]), 4)
        cold[name] = (text, _logits(llm))
    return Base(cache, answers, never, cold)


# -- damage -----------------------------------------------------------------------------------

def _rows(db: Path) -> List[Tuple[str, Optional[str], Optional[bytes]]]:
    with contextlib.closing(sqlite3.connect(str(db))) as con:
        return con.execute("SELECT key, filename, value FROM Cache").fetchall()


def _sql(db: Path, *statements: Tuple[str, tuple]) -> None:
    with contextlib.closing(sqlite3.connect(str(db))) as con:
        for sql, args in statements:
            con.execute(sql, args)
        con.commit()


def _damage_file(rng: random.Random, path: Path, other: Path) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.choice(["flip", "flips", "truncate", "empty", "zero-page", "delete", "swap",
                       "fifo", "symlink", "append"])
    if kind == "flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "flips":
        for _ in range(rng.randint(2, 64)):
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    elif kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind == "empty":
        data = bytearray()
    elif kind == "zero-page":
        at = rng.randrange(0, max(1, len(data) // 4096)) * 4096
        data[at:at + 4096] = bytes(len(data[at:at + 4096]))
    elif kind == "append":
        data += os.urandom(rng.randint(1, 5000))
    if kind == "delete":
        path.unlink()
    elif kind == "swap":
        shutil.copyfile(other, path)
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif kind == "symlink":
        path.unlink()
        path.symlink_to(other)
    else:
        path.write_bytes(bytes(data))
    return kind


HOSTILE = [b'{"v":3,"kind":"agent","name":"x","n_tokens":Infinity}', b"[" * 100000,
           b'{"v":3,"kind":"agent","name":"x","n_tokens":' + b"9" * 6000 + b"}",
           b'{"v":3,"kind":"agent","name":["x"],"n_tokens":"12"}', b"\xff\xfe garbage", b"null",
           b'{"v":3,"kind":"cut","name":"x","n_tokens":-5,"block_tokens":0}']


def damage(rng: random.Random, cache: Path) -> Tuple[str, str]:
    """Damage the cache at random; (what was hit, how)."""
    db = cache / "cache.db"
    with contextlib.closing(sqlite3.connect(str(db))) as con:  # the pages on disk are current
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    rows = _rows(db)
    files = {k: cache / f for k, f, _ in rows if f}
    records = {k: v for k, f, v in rows if k.startswith(("agent/", "cut/"))}
    target = rng.choice(["block", "block", "block", "tail", "tail", "record", "record", "db"])
    if target in ("block", "tail"):
        keys = [k for k in files if k.startswith("blk/" if target == "block" else "kv/")]
        key = rng.choice(sorted(keys))
        other = files[rng.choice(sorted(k for k in files if k != key))]
        return f"{target} {key[:12]}", _damage_file(rng, files[key], other)
    if target == "record":
        key = rng.choice(sorted(records))
        kind = rng.choice(["swap", "hostile", "garbage", "retype"])
        if kind == "swap":
            other = rng.choice(sorted(k for k in records if k != key))
            _sql(db, ("UPDATE Cache SET value=? WHERE key=?", (records[other], key)),
                 ("UPDATE Cache SET value=? WHERE key=?", (records[key], other)))
        elif kind == "hostile":
            _sql(db, ("UPDATE Cache SET value=? WHERE key=?", (rng.choice(HOSTILE), key)))
        elif kind == "garbage":
            _sql(db, ("UPDATE Cache SET value=? WHERE key=?", (os.urandom(rng.randint(1, 900)), key)))
        else:
            d = json.loads(records[key])
            field_ = rng.choice(["n_tokens", "first", "blocks", "chain", "tail", "fp", "shape"])
            d[field_] = rng.choice([None, 1e308, "x", [], {"a": 1}, -1, 2 ** 62])
            _sql(db, ("UPDATE Cache SET value=? WHERE key=?", (json.dumps(d).encode(), key)))
        return f"record {key[:12]}", kind
    kind = rng.choice(["zero-page", "header", "truncate", "drop-column", "drop-table"])
    if kind == "drop-column":
        _sql(db, ("ALTER TABLE Cache DROP COLUMN access_count", ()))
    elif kind == "drop-table":
        _sql(db, ("DROP TABLE Cache", ()))
    else:
        raw = bytearray(db.read_bytes())
        if kind == "zero-page":
            page = 4096 * rng.randrange(len(raw) // 4096)
            raw[page:page + 4096] = bytes(4096)
        elif kind == "header":
            raw[:100] = os.urandom(100)
        else:
            raw = raw[:rng.randrange(4096, len(raw))]
        db.write_bytes(bytes(raw))
    return "cache.db", kind


def _sqlite_sees_damage(db: Path) -> bool:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return con.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
    except sqlite3.Error:
        return True


# -- one trial --------------------------------------------------------------------------------

@dataclass
class Trial:
    n: int
    target: str
    kind: str
    verify_flagged: bool
    effective: bool
    sources: Dict[str, str] = field(default_factory=dict)
    wrong: List[str] = field(default_factory=list)
    exceptions: List[str] = field(default_factory=list)
    unhealed: List[str] = field(default_factory=list)
    verify_after: int = 0
    # what verify still flags after the heal (the documented case: a block only a shared cut
    # held, which no agent's own restore reads), and its exit status after `verify --repair`
    flagged_after: List[str] = field(default_factory=list)
    verify_after_repair: int = 0
    seconds: float = 0.0


def _verify(cache: Path, *options: str) -> int:
    return _verify_report(cache, *options)[0]


def _verify_report(cache: Path, *options: str) -> Tuple[int, List[str]]:
    """verify's exit status and the entries it flags (what precedes ": DAMAGED")."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = cli.main(["verify", str(cache), *options])
    return rc, [ln.split(": DAMAGED")[0] for ln in out.getvalue().splitlines() if ": DAMAGED" in ln]


def trial(llm: Any, base: Base, workdir: Path, n: int, rng: random.Random) -> Trial:
    t0 = time.perf_counter()
    cache = workdir / f"trial{n}"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.copytree(base.cache, cache, symlinks=True)
    target, kind = damage(rng, cache)
    effective = True
    if target == "cache.db" and kind == "zero-page":
        effective = _sqlite_sees_damage(cache / "cache.db")
    t = Trial(n, target, kind, _verify(cache) == 1, effective)
    try:
        with AgentMemory(llm, cache_dir=cache, ram_budget=0, block_tokens=B) as mem:
            for name in NAMES:
                prompt = second_prompt(name, base.answers[name])
                try:
                    text = _turn(lambda p, **k: mem.create_completion(name, p, **k), prompt, 4)
                except Exception as exc:  # noqa: BLE001 - counted: none may reach the caller
                    t.exceptions.append(f"{name}: {type(exc).__name__}: {exc}")
                    continue
                source = mem.last_turn.source
                t.sources[name] = source
                want = base.never[name] if source in ("disk", "ram", "live") else base.cold[name]
                if text != want[0] or not np.array_equal(_logits(llm), want[1]):
                    t.wrong.append(f"{name} ({source})")
        with AgentMemory(llm, cache_dir=cache, ram_budget=0, block_tokens=B) as mem:
            for name in NAMES:
                mem.create_completion(name, second_prompt(name, base.answers[name]) + " Then",
                                      max_tokens=1, temperature=0)
                if mem.last_turn.source != "disk":
                    t.unhealed.append(f"{name} ({mem.last_turn.source})")
    except Exception as exc:  # noqa: BLE001 - an AgentMemory that failed to open
        t.exceptions.append(f"open: {type(exc).__name__}: {exc}")
    t.verify_after, t.flagged_after = _verify_report(cache)
    if t.verify_after:
        _verify(cache, "--repair")
        t.verify_after_repair = _verify(cache)
    shutil.rmtree(cache, ignore_errors=True)
    t.seconds = time.perf_counter() - t0
    return t


def campaign(llm: Any, workdir: Path, trials: int, seed: int,
             progress: Optional[Callable[[Trial], None]] = None) -> List[Trial]:
    base = build_base(llm, workdir)
    rng = random.Random(seed)
    out = []
    for n in range(trials):
        t = trial(llm, base, workdir, n, rng)
        out.append(t)
        if progress is not None:
            progress(t)
    return out


def summarize(results: List[Trial]) -> Dict[str, Any]:
    real = [t for t in results if t.effective]
    kinds: Dict[str, int] = {}
    for t in results:
        k = f"{t.target.split()[0]}:{t.kind}"
        kinds[k] = kinds.get(k, 0) + 1
    sources: Dict[str, int] = {}
    for t in results:
        for s in t.sources.values():
            sources[s] = sources.get(s, 0) + 1
    return {
        "trials": len(results),
        "effective_damage": len(real),
        "wrong_answers": sum(len(t.wrong) for t in results),
        "exceptions_to_caller": sum(len(t.exceptions) for t in results),
        "agents_unhealed_after_one_save": sum(len(t.unhealed) for t in results),
        "verify_flagged": sum(t.verify_flagged for t in real),
        "verify_missed": [asdict(t) for t in real if not t.verify_flagged],
        "verify_fails_after_heal": sum(t.verify_after != 0 for t in results),
        # of those, trials where verify flagged anything but a shared cut
        "verify_flags_after_heal_beyond_cuts": [
            asdict(t) for t in results if any(not f.startswith("cut ") for f in t.flagged_after)],
        "verify_fails_after_repair": sum(t.verify_after_repair != 0 for t in results),
        "turn_sources": sources,
        "damage_kinds": dict(sorted(kinds.items())),
        "median_trial_seconds": float(np.median([t.seconds for t in results])) if results else 0,
    }


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bu.add_common_args(ap, repeats=1)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    args = bu.parse_common(ap, argv)
    logging.basicConfig(level=logging.ERROR)
    llm = bu.load_llm(args.model, 2048, args.threads)
    import tempfile
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="agentkv-fuzz-"))
    t0 = time.time()

    def progress(t: Trial) -> None:
        bad = t.wrong or t.exceptions or t.unhealed or (t.effective and not t.verify_flagged)
        print(f"[{t.n + 1}/{args.trials}] {t.target:20s} {t.kind:12s} verify={'flagged' if t.verify_flagged else 'ok':7s}"
              f" sources={','.join(t.sources.get(n, '-') for n in NAMES)} "
              f"{'PROBLEM ' + str(t.wrong + t.exceptions + t.unhealed) if bad else 'fine'} "
              f"({t.seconds:.1f} s)", file=sys.stderr, flush=True)
    results = campaign(llm, workdir, args.trials, args.seed, progress)
    summary = summarize(results)
    summary.update(machine=bu.machine(),
                   seed=args.seed, wall_seconds=round(time.time() - t0, 1))
    print(json.dumps(summary, indent=2))
    print(bu.machine_line(summary["machine"]))
    bu.write_json(args.json, {"summary": summary, "trials": [asdict(t) for t in results]})
    return 0 if not (summary["wrong_answers"] or summary["exceptions_to_caller"]
                     or summary["agents_unhealed_after_one_save"] or summary["verify_missed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
