"""Never a wrong answer, never a dead cache (issue 12): one test per defect found by a hostile
user, on the real model, real files, a real full disk (tmpfs) and real SQLite damage."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import llama_cpp
import numpy as np
import pytest

from agentkv import AgentMemory, ConfigError, NotACache, parse_size
from agentkv._store.disk import agent_key
from conftest import MODEL_PATH, last_logits, make_llm

PROMPT = "Inventory: " + " ".join(f"box {i} holds {i * 3 + 1} grams of salt." for i in range(60))
OTHER = "Weather log: " + " ".join(f"day {i} was {'sunny' if i % 3 else 'rainy'}." for i in range(60))
MORE = " Item 3 weighs"


def answer(out):
    return out["choices"][0]["text"]


def cold(llm, prompt, max_tokens=8):
    llm.reset()
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)
    return answer(out), last_logits(llm)


def save(llm, cache_dir, *agents):
    with AgentMemory(llm, cache_dir=cache_dir, ram_budget=0) as mem:
        for agent, prompt in agents:
            mem.create_completion(agent, prompt, max_tokens=4, temperature=0)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "agentkv", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def flip(path, at, mask=1):
    """Flip bits of the byte at ``at`` (negative: from the end) of a real payload file."""
    data = bytearray(path.read_bytes())
    data[at] ^= mask
    path.write_bytes(bytes(data))


def row_file(cache_dir, key):
    with sqlite3.connect(str(cache_dir / "cache.db")) as con:
        (name,) = con.execute("SELECT filename FROM Cache WHERE key = ?", (key,)).fetchone()
    return cache_dir / name


# -- 1. settings that change the KV are in the fingerprint ------------------------------------

@pytest.mark.parametrize("settings", [
    {"rope_freq_base": 20000.0},
    {"rope_freq_scale": 0.5},
    {"kv_overrides": {"gemma3.rope.freq_base": 20000.0}},
    {"n_batch": 256},
    {"n_ubatch": 128},
], ids=["rope_freq_base", "rope_freq_scale", "kv_overrides", "n_batch", "n_ubatch"])
def test_kv_saved_under_other_settings_is_never_restored(llm, tmp_path, settings):
    save(llm, tmp_path, ("a", PROMPT))
    other = make_llm(**settings)
    try:
        text, logits = cold(other, PROMPT + MORE)  # never evicted, under these settings
        with AgentMemory(other, cache_dir=tmp_path, ram_budget=0) as mem:
            out = mem.create_completion("a", PROMPT + MORE, max_tokens=8, temperature=0)
            assert mem.last_turn.source == "cold"
            assert answer(out) == text
            assert np.array_equal(last_logits(other), logits)
            assert mem.stats().rejected == 1
    finally:
        other.close()


def _set_cvec(llm, vec):
    n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
    ptr = None if vec is None else vec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    size = 0 if vec is None else vec.size
    assert llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, size, n_embd, 1, n_layer) == 0


def test_a_control_vector_set_at_run_time_changes_the_fingerprint(tmp_path):
    """llama.cpp cannot be asked which adapters a context applies: agentkv follows the calls
    that set them, and agents kept under other settings are neither served nor lost."""
    llm, ref = make_llm(), make_llm()
    try:
        n = llm.n_embd() * llama_cpp.llama_model_n_layer(llm.model)
        vec = (np.random.default_rng(0).standard_normal(n) * 0.05).astype(np.float32)
        _set_cvec(ref, vec)
        text, logits = cold(ref, PROMPT + MORE)  # never evicted, with the vector
        with AgentMemory(llm, cache_dir=tmp_path, ram_budget="1GiB") as mem:
            plain_fp = mem.fingerprint
            mem.create_completion("a", PROMPT, max_tokens=4, temperature=0)
            mem.create_completion("b", OTHER, max_tokens=4, temperature=0)
            _set_cvec(llm, vec)
            out = mem.create_completion("b", PROMPT + MORE, max_tokens=8, temperature=0)
            assert mem.last_turn.source == "cold"  # not b's live KV, computed without it
            assert mem.fingerprint != plain_fp
            assert answer(out) == text and np.array_equal(last_logits(llm), logits)
            _set_cvec(llm, None)
            mem.create_completion("c", OTHER, max_tokens=2, temperature=0)
            assert mem.fingerprint == plain_fp
            mem.create_completion("a", PROMPT + MORE, max_tokens=8, temperature=0)
            assert mem.last_turn.source == "disk"  # its KV from before the vector, kept
            mem.create_completion("b", PROMPT + MORE, max_tokens=8, temperature=0)
            assert mem.last_turn.source in ("cold", "prefix")  # its own KV (vector) not served
    finally:
        llm.close()
        ref.close()


# -- 2. a model file replaced in place ---------------------------------------------------------

def test_a_model_file_rewritten_with_its_old_mtime_is_a_new_model(tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(MODEL_PATH, path)
    first = make_llm(str(path))
    try:
        with AgentMemory(first, cache_dir=tmp_path / "cache", ram_budget=0) as mem:
            mem.create_completion("a", PROMPT, max_tokens=2, temperature=0)
            old_fp = mem.fingerprint
    finally:
        first.close()
    st = os.stat(path)
    with open(path, "r+b") as f:  # same size, other weights, as rsync -t / cp -p leave it
        f.seek(-4096, os.SEEK_END)
        tail = bytearray(f.read(4096))
        for i in range(0, 4096, 7):
            tail[i] ^= 0x11
        f.seek(-4096, os.SEEK_END)
        f.write(bytes(tail))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size
    second = make_llm(str(path))
    try:
        with AgentMemory(second, cache_dir=tmp_path / "cache", ram_budget=0) as mem:
            assert mem.fingerprint != old_fp
            mem.create_completion("a", PROMPT, max_tokens=2, temperature=0)
            assert mem.last_turn.source == "cold"
    finally:
        second.close()


# -- 3. damage heals ---------------------------------------------------------------------------

SHARED = "Team rules. " + " ".join(
    f"Rule {i}: the answer about topic {i % 9} must cite source {i * 7 % 13}." for i in range(72))
LONG = " Background: " + " ".join(f"fact {i} is filed under shelf {i % 5}." for i in range(90))


def role(name, extra=""):
    return f"{SHARED}\nTask for the {name}: describe your role in one line.{extra}\nAnswer:"


def test_a_damaged_block_of_a_shared_cut_is_dropped_and_rewritten(llm, tmp_path):
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("planner", role("planner", LONG), max_tokens=2, temperature=0)
        mem.create_completion("coder", role("coder"), max_tokens=2, temperature=0)
        mem.flush()
        (cut,) = mem.inspect().cuts()
    victim = cut.blocks[1][0]  # an SWA block of the cut (the coder's own window holds it too)
    path = row_file(tmp_path, victim)
    flip(path, path.stat().st_size // 2, 0x20)
    bad = cli("verify", tmp_path)
    assert bad.returncode == 1 and "cut" in bad.stdout and "DAMAGED" in bad.stdout, bad.stdout

    text, logits = cold(llm, role("critic"), 6)
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        out = mem.create_completion("critic", role("critic"), max_tokens=6, temperature=0)
        assert mem.last_turn.source == "cold" and mem.stats().rejected == 1
        assert answer(out) == text and np.array_equal(last_logits(llm), logits)
        mem.flush()
        assert [c.n_tokens for c in mem.inspect().cuts()] == [cut.n_tokens]  # stored again
        assert mem.inspect().record("coder") is None  # it named the damaged block: dropped too
        mem.create_completion("writer", role("writer"), max_tokens=6, temperature=0)
        assert mem.last_turn.source == "prefix"  # healed: the next agent restores it
        mem.create_completion("coder", role("coder"), max_tokens=2, temperature=0)
        assert mem.last_turn.source == "prefix"
    assert victim.startswith("blk/")
    ok = cli("verify", tmp_path)
    assert ok.returncode == 0, ok.stdout


def test_a_damaged_block_an_agent_holds_is_rewritten_by_its_next_save(llm, tmp_path):
    save(llm, tmp_path, ("a", PROMPT), ("b", OTHER))
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        key = mem.inspect().record("a").blocks[0][0]
    flip(row_file(tmp_path, key), -100)
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("a", PROMPT + MORE, max_tokens=2, temperature=0)
        assert mem.last_turn.source == "cold"
        mem.create_completion("b", OTHER + MORE, max_tokens=2, temperature=0)
        assert mem.last_turn.source == "disk"
        mem.flush()
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("a", PROMPT + MORE + " more", max_tokens=2, temperature=0)
        assert mem.last_turn.source == "disk"
        assert mem.stats().rejected == 0
    assert cli("verify", tmp_path).returncode == 0


def test_verify_repair_drops_damage_no_turn_has_read_yet(llm, tmp_path):
    save(llm, tmp_path, ("a", PROMPT), ("b", OTHER))
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        key = mem.inspect().record("a").blocks[0][0]
    path = row_file(tmp_path, key)
    flip(path, path.stat().st_size // 3, 4)
    repair = cli("verify", "--repair", tmp_path)
    assert repair.returncode == 1 and "dropped " + key in repair.stdout, repair.stdout
    assert cli("verify", tmp_path).returncode == 0
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("a", PROMPT + MORE, max_tokens=2, temperature=0)
        assert mem.last_turn.source == "cold" and mem.stats().rejected == 0
        mem.create_completion("b", OTHER + MORE, max_tokens=2, temperature=0)
        assert mem.last_turn.source == "disk"


# -- 4-5. the store's own failures never leave a turn; a damaged cache.db --------------------

def test_a_schema_damaged_while_open_is_set_aside_and_the_turns_go_on(llm, tmp_path):
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("a", PROMPT, max_tokens=2, temperature=0)
        mem.flush()
        with sqlite3.connect(str(tmp_path / "cache.db")) as con:
            con.execute("ALTER TABLE Cache DROP COLUMN access_count")
        for agent, prompt in (("b", OTHER), ("a", PROMPT + MORE), ("c", "Hello there")):
            out = mem.create_completion(agent, prompt, max_tokens=2, temperature=0)
            assert answer(out)
        mem.flush()
        assert mem.stats().store_errors >= 1
    assert glob.glob(str(tmp_path / "cache.db.damaged-*"))
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("c", "Hello there again", max_tokens=2, temperature=0)
        assert mem.last_turn.source == "disk"  # saves went on into the new database


@pytest.mark.parametrize("damage", ["header", "page", "schema"])
def test_a_damaged_cache_db_opens_degraded_and_verify_says_so(llm, tmp_path, damage):
    save(llm, tmp_path, ("a", PROMPT), ("b", OTHER))
    db = tmp_path / "cache.db"
    if damage == "schema":
        with sqlite3.connect(str(db)) as con:
            con.execute("ALTER TABLE Cache RENAME COLUMN access_count TO x")
    else:
        with sqlite3.connect(str(db)) as con:  # the pages on disk are the current ones
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            (root,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name='Cache'").fetchone()
            (page,) = con.execute("PRAGMA page_size").fetchone()
        raw = bytearray(db.read_bytes())
        at = 0 if damage == "header" else (root - 1) * page
        raw[at:at + page] = os.urandom(page)
        db.write_bytes(bytes(raw))
    check = cli("verify", tmp_path)
    assert check.returncode == 1 and "DAMAGED" in check.stdout and "Traceback" not in check.stderr
    text, _ = cold(llm, PROMPT + MORE)
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        out = mem.create_completion("a", PROMPT + MORE, max_tokens=8, temperature=0)
        assert answer(out) == text and mem.last_turn.source == "cold"
        mem.flush()
    assert glob.glob(str(tmp_path / "cache.db.damaged-*"))  # kept for its owner
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("a", PROMPT + MORE + " next", max_tokens=2, temperature=0)
        assert mem.last_turn.source == "disk"
    assert cli("verify", tmp_path).returncode == 0


# -- 6. a full disk ----------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(mnt, options):
    """A real filesystem of our own at ``mnt`` (root only: skipped, with the reason, else)."""
    mnt.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs (a real full or read-only disk) needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 24 MiB, so that writes really fail with ENOSPC."""
    with tmpfs(tmp_path / "disk", "size=24m") as mnt:
        yield mnt


def fill(mnt, name="filler"):
    with open(mnt / name, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError:
            pass


def never_evicted(llm, turns):
    """The bare Llama running ``turns`` (prompt, max_tokens) in order: last answer, logits."""
    llm.reset()
    for prompt, n in turns:
        out = llm.create_completion(prompt, max_tokens=n, temperature=0)
    return answer(out), last_logits(llm)


def test_a_full_disk_never_fails_a_turn_and_saves_resume_when_space_returns(llm, small_disk):
    cache = small_disk / "cache"
    text, logits = never_evicted(llm, [(OTHER, 8), (OTHER + MORE, 8)])
    with AgentMemory(llm, cache_dir=cache, ram_budget="1GiB") as mem:
        mem.create_completion("a", PROMPT, max_tokens=2, temperature=0)
        mem.flush()
        fill(small_disk)
        t0 = time.monotonic()
        for agent, prompt in (("b", OTHER), ("a", PROMPT + MORE), ("b", OTHER + MORE)):
            out = mem.create_completion(agent, prompt, max_tokens=8, temperature=0)
        assert mem.last_turn.source == "ram"
        assert answer(out) == text and np.array_equal(last_logits(llm), logits)
        mem.flush()
        assert time.monotonic() - t0 < 20  # no stall on a lock row a failed save left
        assert mem.stats().store_errors >= 1
        assert mem.evict("b") is False  # not durable: kept in RAM, not dropped
        assert [a.tier for a in mem.agents() if a.agent_id == "b"] == ["ram"]
        os.remove(small_disk / "filler")
        mem.flush()  # what could not be written is written now
        assert mem.evict("b") is True
    with AgentMemory(llm, cache_dir=cache, ram_budget=0) as mem:
        for agent, prompt in (("a", PROMPT + MORE), ("b", OTHER + MORE)):
            mem.create_completion(agent, prompt + " x", max_tokens=2, temperature=0)
            assert mem.last_turn.source == "disk"
    files = {os.path.relpath(p, cache) for p in glob.glob(str(cache / "*" / "*" / "*.val"))}
    with sqlite3.connect(str(cache / "cache.db")) as con:
        named = {r[0] for r in con.execute("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
    assert files <= named, "failed saves left files no row names"


def test_memory_opens_and_answers_on_a_disk_that_is_already_full(llm, small_disk):
    fill(small_disk)
    text, _ = cold(llm, PROMPT)
    with AgentMemory(llm, cache_dir=small_disk / "cache", ram_budget="1GiB") as mem:
        out = mem.create_completion("a", PROMPT, max_tokens=8, temperature=0)
        assert answer(out) == text
        mem.create_completion("b", OTHER, max_tokens=2, temperature=0)
        mem.create_completion("a", PROMPT, max_tokens=2, temperature=0)
        assert mem.last_turn.source == "ram"


def test_the_budget_counts_the_database_files(llm, tmp_path):
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0, disk_budget="40MB") as mem:
        for i in range(6):
            mem.create_completion(f"agent{i}", f"{PROMPT} Agent {i}.", max_tokens=2, temperature=0)
        mem.flush()
        stats = mem.stats()
    assert stats.disk_db_bytes > 0
    assert stats.disk_bytes + stats.disk_db_bytes <= 40_000_000
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path) for f in fs)
    assert on_disk <= 40_000_000 + 8192


# -- 7-8. verify misses nothing; hostile records ----------------------------------------------

def test_verify_flags_two_agent_rows_swapped(llm, tmp_path):
    save(llm, tmp_path, ("a", PROMPT), ("b", OTHER))
    with sqlite3.connect(str(tmp_path / "cache.db")) as con:
        ka, kb = agent_key("a"), agent_key("b")
        va = con.execute("SELECT value FROM Cache WHERE key=?", (ka,)).fetchone()[0]
        vb = con.execute("SELECT value FROM Cache WHERE key=?", (kb,)).fetchone()[0]
        con.execute("UPDATE Cache SET value=? WHERE key=?", (vb, ka))
        con.execute("UPDATE Cache SET value=? WHERE key=?", (va, kb))
    check = cli("verify", tmp_path)
    assert check.returncode == 1 and check.stdout.count("DAMAGED") == 2, check.stdout


@pytest.mark.parametrize("hostile", ["infinity", "nested", "huge_int", "fifo"])
def test_hostile_records_and_files_are_refused_without_hanging(llm, tmp_path, hostile):
    save(llm, tmp_path, ("a", PROMPT), ("b", OTHER))
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        record = mem.inspect().record("a")
    if hostile == "fifo":
        path = row_file(tmp_path, record.tail)
        os.remove(path)
        os.mkfifo(path)
    else:
        raw = {"infinity": b'{"v":3,"kind":"agent","name":"a","n_tokens":Infinity}',
               "nested": b"[" * 200_000 + b"]" * 200_000,
               "huge_int": record.to_bytes().replace(b'"n_tokens":', b'"n_tokens":' + b"9" * 5000)
               }[hostile]
        with sqlite3.connect(str(tmp_path / "cache.db")) as con:
            con.execute("UPDATE Cache SET value=? WHERE key=?", (raw, agent_key("a")))
    flagged = cli("verify", tmp_path)
    result = {}

    def run():
        try:
            with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
                mem.create_completion("a", PROMPT + MORE, max_tokens=2, temperature=0)
                result["a"] = mem.last_turn.source
                mem.create_completion("b", OTHER + MORE, max_tokens=2, temperature=0)
                result["b"] = mem.last_turn.source
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    if t.is_alive():  # unblock a reader stuck on the FIFO before failing
        if hostile == "fifo":
            with open(path, "wb"):
                pass
        pytest.fail("AgentMemory hung on a hostile record")
    assert "error" not in result, result.get("error")
    assert result == {"a": "cold", "b": "disk"}
    assert flagged.returncode == 1 and "DAMAGED" in flagged.stdout
    assert cli("verify", tmp_path).returncode == 0  # healed by the turn's save


# -- 9. foreign folders ------------------------------------------------------------------------

def test_a_folder_that_is_not_a_cache_is_never_touched(llm, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "thesis.tex").write_text("also mine")
    before = sorted(os.walk(tmp_path))
    for command in ("gc", "ls", "verify"):
        out = cli(command, tmp_path)
        assert out.returncode == 2 and "no agentkv cache" in out.stderr, (command, out.stderr)
    assert sorted(os.walk(tmp_path)) == before
    with pytest.raises(NotACache):
        AgentMemory(llm, cache_dir=tmp_path)
    assert sorted(os.walk(tmp_path)) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("ls", empty).returncode == 2 and os.listdir(empty) == []


def test_a_cache_written_before_the_marker_is_still_a_cache(llm, tmp_path):
    save(llm, tmp_path, ("a", PROMPT))
    os.remove(tmp_path / "cache.db.agentkv")
    assert cli("ls", tmp_path).returncode == 0
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("a", PROMPT + MORE, max_tokens=2, temperature=0)
        assert mem.last_turn.source == "disk"


# -- 10. the smaller ones ----------------------------------------------------------------------

def test_bad_sizes_and_paths_are_config_errors(llm, tmp_path):
    for bad in ("1" * 400, 1 << 70, "9" * 30 + "TiB"):
        with pytest.raises(ConfigError):
            parse_size(bad)
    with pytest.raises(ConfigError, match="NUL"):
        AgentMemory(llm, cache_dir=str(tmp_path) + "/a\0b")
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(ConfigError, match=str(ro)):
            AgentMemory(llm, cache_dir=ro)


def test_a_cache_dir_deleted_while_open_is_recreated_by_the_next_save(llm, tmp_path):
    cache = tmp_path / "cache"
    with AgentMemory(llm, cache_dir=cache, ram_budget=0) as mem:
        mem.create_completion("a", PROMPT, max_tokens=2, temperature=0)
        mem.flush()
        shutil.rmtree(cache)
        mem.create_completion("b", OTHER, max_tokens=2, temperature=0)
        mem.create_completion("a", PROMPT + MORE, max_tokens=2, temperature=0)
        assert mem.last_turn.source == "cold"  # its KV went with the folder
        mem.flush()
    with AgentMemory(llm, cache_dir=cache, ram_budget=0) as mem:
        mem.create_completion("a", PROMPT + MORE + " x", max_tokens=2, temperature=0)
        assert mem.last_turn.source == "disk"


EXIT_WITHOUT_CLOSE = r"""
import sys
sys.path.insert(0, {tests!r})
from conftest import make_llm
from agentkv import AgentMemory
llm = make_llm()
mem = AgentMemory(llm, cache_dir={cache!r}, ram_budget="1GiB")
mem.create_completion("a", {prompt!r}, max_tokens=1, temperature=0)
# no close(): the save is still queued on the writer thread when the interpreter exits
"""


def test_queued_saves_finish_when_the_interpreter_exits_without_close(llm, tmp_path):
    code = EXIT_WITHOUT_CLOSE.format(tests=os.path.dirname(__file__), cache=str(tmp_path),
                                     prompt=PROMPT)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, capture_output=True)
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        mem.create_completion("a", PROMPT + MORE, max_tokens=2, temperature=0)
        assert mem.last_turn.source == "disk"


def test_a_cache_set_on_the_llama_does_not_load_over_a_restore(llm, tmp_path):
    from llama_cpp import LlamaRAMCache
    text, logits = never_evicted(llm, [(PROMPT, 2), (PROMPT + MORE, 8)])
    cache = LlamaRAMCache()
    llm.set_cache(cache)
    try:
        with AgentMemory(llm, cache_dir=tmp_path, ram_budget="1GiB") as mem:
            mem.create_completion("a", PROMPT, max_tokens=2, temperature=0)
            mem.create_completion("b", OTHER, max_tokens=2, temperature=0)
            out = mem.create_completion("a", PROMPT + MORE, max_tokens=8, temperature=0)
            assert mem.last_turn.source == "ram"
            assert answer(out) == text and np.array_equal(last_logits(llm), logits)
            assert llm.cache is cache  # given back after each turn
        assert len(cache.cache_state) == 0  # Llama never saved or loaded its own states
    finally:
        llm.set_cache(None)


def test_the_store_lock_is_renewed_by_a_live_holder(tmp_path):
    import diskcache
    from agentkv._store.files import SafeDisk, StoreLock
    from agentkv.errors import AgentKVError, StoreBusy
    with diskcache.Cache(str(tmp_path), disk=SafeDisk) as cache:
        mine = StoreLock(cache, "here", expire=0.4)
        theirs = StoreLock(cache, "here", expire=0.4, timeout=0.1)
        with mine.held():
            for _ in range(8):  # 0.8 s of work: twice the expiry
                time.sleep(0.1)
                mine.renew()
            with pytest.raises(StoreBusy) as err:
                with theirs.held():
                    pass
        assert isinstance(err.value, AgentKVError) and isinstance(err.value, TimeoutError)
        with theirs.held():  # released: free at once
            pass


# -- 11. a forked conversation answers like a cold run -----------------------------------------

FORK_RULES = "Team rules. " + " ".join(
    f"Rule {i}: the answer about topic {i % 9} must cite source {i * 7 % 13}." for i in range(40))
NOTES = " ".join(f"note {i} is filed under shelf {i % 5}." for i in range(30))


def test_a_forked_conversation_answers_exactly_like_a_cold_run(llm, tmp_path):
    """Agent A's second turn holds KV computed turn by turn (blocks 512..767 here); a new agent
    whose prompt is A's two exchanges plus a new question restores only what a cold prefill of
    its prompt reproduces (A's first 512 positions), so it answers exactly as a cold run."""
    first = f"{FORK_RULES}\nQuestion: which rule mentions topic 4?\nAnswer:"
    with AgentMemory(llm, cache_dir=tmp_path, ram_budget=0) as mem:
        a1 = answer(mem.create_completion("A", first, max_tokens=16, temperature=0))
        second = f"{first}{a1}\nNotes: {NOTES}\nQuestion: and topic 5?\nAnswer:"
        a2 = answer(mem.create_completion("A", second, max_tokens=16, temperature=0))
        mem.flush()
        assert mem.inspect().record("A").n_tokens >= 800
        fork = f"{second}{a2}\nQuestion: summarise both answers.\nAnswer:"
        got = {}
        for name in ("B1", "B2"):
            out = mem.create_completion(name, fork, max_tokens=12, temperature=0)
            got[name] = (mem.last_turn, answer(out), last_logits(llm))
    text, logits = cold(llm, fork, 12)
    for name, (turn, out, lg) in got.items():
        assert out == text and np.array_equal(lg, logits), (name, turn)
    # the shared part is still shared: B1 stores it as a cut (A's window does not reach it)
    assert got["B2"][0].source == "prefix" and got["B2"][0].prompt_tokens_restored >= 512


# -- 1b. LoRA adapters by file content and scale -----------------------------------------------

def write_lora(path, seed, rank=8):
    """A real LoRA adapter GGUF for the default model: low-rank A/B on block 0's K projection."""
    gguf = pytest.importorskip("gguf")  # the gguf package (dev extra) writes adapter files
    reader = gguf.GGUFReader(MODEL_PATH)
    target = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    n_in, n_out = int(target.shape[0]), int(target.shape[1])  # ggml order: ne0, ne1
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    w.add_tensor("blk.0.attn_k.weight.lora_a", (rng.standard_normal((rank, n_in)) * 0.05
                                                ).astype(np.float32))
    w.add_tensor("blk.0.attn_k.weight.lora_b", (rng.standard_normal((n_out, rank)) * 0.05
                                                ).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_kv_saved_under_other_lora_adapters_is_never_restored(llm, tmp_path):
    adapter = write_lora(tmp_path / "adapter.gguf", seed=1)
    cache = tmp_path / "cache"
    save(llm, cache, ("a", PROMPT))
    fps = {}
    for label, kw in [("lora", dict(lora_path=adapter)),
                      ("scaled", dict(lora_path=adapter, lora_scale=0.5))]:
        other = make_llm(**kw)
        try:
            text, logits = cold(other, PROMPT + MORE)
            with AgentMemory(other, cache_dir=cache, ram_budget=0) as mem:
                fps[label] = mem.fingerprint
                out = mem.create_completion("a", PROMPT + MORE, max_tokens=8, temperature=0)
                assert mem.last_turn.source == "cold"  # saved without it / at another scale
                assert answer(out) == text and np.array_equal(last_logits(other), logits)
        finally:
            other.close()
    assert fps["lora"] != fps["scaled"]
    write_lora(tmp_path / "adapter.gguf", seed=2)  # same path, other weights
    other = make_llm(lora_path=adapter)
    try:
        with AgentMemory(other, cache_dir=cache, ram_budget=0) as mem:
            assert mem.fingerprint not in fps.values()
    finally:
        other.close()
