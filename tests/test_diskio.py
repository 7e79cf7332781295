"""The store's footing: the cross-process write lock and the raw-bytes-only disk."""

import os
import socket
import subprocess
import sys

import diskcache
import pytest

from agentkv._store.files import Chunks, SafeDisk, StoreLock
from agentkv.errors import CorruptEntry


def _cache(path):
    return diskcache.Cache(str(path), disk=SafeDisk, eviction_policy="none")


def _gone_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid now (barring reuse within the test)


def test_a_lock_left_by_a_dead_process_on_this_host_is_freed_at_once(tmp_path):
    with _cache(tmp_path) as cache:
        stale = f"{_gone_pid()}:{socket.gethostname()}:dead".encode()
        cache.add(StoreLock.KEY, stale, expire=30)
        lock = StoreLock(cache, str(tmp_path), timeout=5.0)
        with lock.held():
            held = cache.get(StoreLock.KEY)
            assert held != stale and held.startswith(f"{os.getpid()}:".encode())
        assert cache.get(StoreLock.KEY) is None


def test_a_live_holder_keeps_the_lock_until_the_timeout(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with _cache(tmp_path) as cache:
            theirs = f"{holder.pid}:{socket.gethostname()}:alive".encode()
            cache.add(StoreLock.KEY, theirs, expire=30)
            lock = StoreLock(cache, str(tmp_path), timeout=0.2)
            with pytest.raises(TimeoutError, match="store lock"):
                with lock.held():
                    pass
            assert cache.get(StoreLock.KEY) == theirs  # not taken, not deleted
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_when_the_holder_raises(tmp_path):
    with _cache(tmp_path) as cache:
        lock = StoreLock(cache, str(tmp_path), timeout=1.0)
        with pytest.raises(RuntimeError):
            with lock.held():
                raise RuntimeError("write failed")
        assert cache.get(StoreLock.KEY) is None
        with lock.held():  # and can be taken again
            assert cache.get(StoreLock.KEY) is not None


def test_safe_disk_stores_bytes_and_refuses_pickles(tmp_path):
    with _cache(tmp_path) as cache:
        cache.set("ok", b"\x00raw")
        assert cache.get("ok") == b"\x00raw"
        with pytest.raises(TypeError, match="bytes only"):
            cache.set("bad", {"a": 1})
    with diskcache.Cache(str(tmp_path / "plain")) as plain:  # another library's pickled row
        plain.set("obj", {"a": 1})
    with _cache(tmp_path / "plain") as cache:
        with pytest.raises(CorruptEntry, match="only raw bytes"):
            cache.get("obj")


def test_file_sized_values_are_written_whole_not_a_line_at_a_time(tmp_path):
    """Values of a file's size go through Chunks (one write per buffer, no join); what is
    read back is the same bytes, empty buffers included, and a small value stays a row."""
    import numpy as np
    rng = np.random.default_rng(0)
    parts = [b"head", b"", rng.bytes(100_000), memoryview(rng.bytes(70_000)), b"\n\n", b"tail"]
    with _cache(tmp_path) as cache:
        big = b"".join(parts)
        assert big.count(b"\n") > 500  # diskcache's own path would write it a line at a time
        cache.set("joined", big)
        cache.set("chunks", Chunks(parts), read=True)
        cache.set("small", b"\nrow\n")
        assert cache.get("joined") == cache.get("chunks") == big
        assert cache.get("small") == b"\nrow\n"
        files = {os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path)
                 for f in fs if f.endswith(".val")}
        assert files == {len(big)}  # two payload files, no file for the small row
        with pytest.raises(TypeError, match="bytes only"):
            cache.set("not-chunks", iter(parts), read=True)


def test_record_index_counts_a_shared_payload_once_and_frees_it_with_its_last_holder():
    from agentkv._store.records import Record
    from agentkv._store.index import RecordIndex
    sizes = {"blk/shared": 100, "blk/a": 10, "kv/a": 1, "blk/b": 20, "kv/b": 2}
    asked = []

    def size_of(k):
        asked.append(k)
        return sizes[k]

    def rec(name, own):
        return Record("agent", name, 512, 256, ["c0", "c1"], [0], [["blk/shared", own]], "fp", 0.0,
                      tail="kv/" + name)

    index = RecordIndex()
    index.add("agent/a", rec("a", "blk/a"), size_of)
    index.add("agent/b", rec("b", "blk/b"), size_of)
    assert index.nbytes == 100 + 10 + 1 + 20 + 2
    assert asked.count("blk/shared") == 1  # sized once, when its first holder came
    assert index.bytes_of(index.records["agent/a"]) == 111
    assert list(index.records) == ["agent/a", "agent/b"]
    index.touch("agent/a")
    assert list(index.records) == ["agent/b", "agent/a"]  # least recently used first
    assert sorted(index.remove("agent/a")) == ["blk/a", "kv/a"]  # the shared block stays held
    assert index.holds("blk/shared") and not index.holds("blk/a")
    assert sorted(index.remove("agent/b")) == ["blk/b", "blk/shared", "kv/b"]
    assert index.nbytes == 0 and index.remove("agent/b") == []
