"""The disk tier's foundation: the diskcache it lives in, the in-memory index of its records,
raw reads of payloads, and recovery from a damaged or vanished database. Writes and reads
of agents' states build on it (writes.py, reads.py); disk.py draws the whole."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

import diskcache
import xxhash

from ..errors import CorruptEntry, StoreBusy
from .._format.buffers import ReadArena
from .files import (DB_NAME, SafeDisk, StoreLock, check_database, claim,
                    database_damage, move_aside)
from .index import RecordIndex
from .keys import Overlay, agent_key, file_identity, overlaid, record_key
from .records import Record

# A row every change to the records rewrites (under the write lock): another process's index
# is stale when it differs from the stamp that index last saw. The count of rows alone cannot
# tell, since a save that replaces a tail and writes no new block leaves it unchanged.
RECORDS_STAMP = "meta/records"
_UNREADABLE = object()  # equal to no stamp: an unreadable stamp row means "rescan"

__all__ = ["StoreBase"]

log = logging.getLogger("agentkv._store.disk")


class StoreBase:
    """Blocks, tails and records on disk under a byte budget (LRU over records).

    Args:
        directory: the cache folder.
        budget: bytes of payloads (blocks and tails) to keep.
        block_tokens: positions per block.
        at_rest: code of the at-rest row format (atrest.CODES; 0: exact).
        create: make the folder a cache if it is not one yet (else NotACache).
        repair: move a damaged database aside and start a new one (else CorruptEntry).
        machine: what computes the KV here (``settings.compute()``): stamped on every record
            and named when a record of another machine is refused.
        reads: the buffer scratch reads go into (a memory's :class:`Buffers`); else its own.
    """

    def __init__(self, directory: Path, budget: int, block_tokens: int = 256,
                 at_rest: int = 0, create: bool = True, repair: bool = True,
                 machine: str = "", reads: Optional[ReadArena] = None) -> None:
        claim(directory, create)  # NotACache before anything is written
        self.directory = directory
        self.budget = budget
        self.block_tokens = block_tokens
        self.at_rest = at_rest
        self.machine = machine
        self._lock = threading.RLock()
        self._arena = reads or ReadArena()  # scratch reads (one restore at a time: a turn)
        self._damaged_rows: Set[str] = set()  # record rows that do not parse (dropped at open)
        self.damaged_db: Optional[Path] = None  # where a damaged database was moved aside
        self._open_db(repair)
        if create:
            self._collect_leftovers()

    def _open_db(self, repair: bool) -> None:
        """Open the database (a damaged one is moved aside and a new one started, if
        ``repair``; else CorruptEntry) and index its records."""
        db = self.directory / DB_NAME
        problem = check_database(db)
        if problem is not None:
            if not repair:
                raise CorruptEntry(f"the cache database is damaged: {problem}")
            self._set_aside(problem)
        try:
            self._cache = self._new_cache()
        except sqlite3.DatabaseError as exc:
            if not repair or database_damage(exc) is None:
                raise
            self._set_aside(str(exc))
            self._cache = self._new_cache()
        self._db_ino = self._db_inode()
        self._write_lock = StoreLock(self._cache, str(self.directory))  # across processes
        with self._lock:
            self._index = RecordIndex()  # records on disk and the payloads they hold
            self._seen_len, self._seen_stamp = -1, _UNREADABLE
            self._refresh(force=True)

    def _new_cache(self) -> diskcache.Cache:
        return diskcache.Cache(
            str(self.directory), disk=SafeDisk, eviction_policy="none", size_limit=1 << 62,
            cull_limit=0, statistics=False, tag_index=False)

    def _db_inode(self) -> Optional[int]:
        try:
            return os.stat(self.directory / DB_NAME).st_ino
        except OSError:
            return None

    def _set_aside(self, problem: str) -> None:
        dest = move_aside(self.directory / DB_NAME)
        self.damaged_db = dest
        log.warning("the cache database of %s is damaged (%s): moved to %s and a new one "
                    "started; its agents will be prefilled", self.directory, problem, dest.name)

    def recover(self, exc: BaseException) -> bool:
        """If ``exc`` says the database is damaged (found while in use), move it aside and
        start a new one; True if it did."""
        if database_damage(exc) is None:
            return False
        with self._lock:
            with contextlib.suppress(Exception):
                self._cache.close()
            self._set_aside(str(exc))
            self._open_db(repair=True)
        return True

    def _check_home(self) -> None:
        """Before a write: the folder or its database removed (or replaced) while open would
        swallow every save silently; start a new cache there instead."""
        if self._db_inode() == self._db_ino:
            return
        log.warning("the cache folder %s (or its database) was removed or replaced while in "
                    "use; starting a new cache there", self.directory)
        with self._lock:
            with contextlib.suppress(Exception):
                self._cache.close()
            claim(self.directory, create=True)
            self._open_db(repair=True)

    def _collect_leftovers(self) -> None:
        """At open: payloads no record holds (a save that failed or was killed) are deleted
        unless another process is writing right now."""
        try:
            with self._write_lock.held(timeout=0.5):
                self._drop_damaged_rows()
                self._collect_unheld()
        except StoreBusy:
            pass
        except Exception as exc:  # noqa: BLE001 - a full disk may refuse even deletes
            log.debug("leftover payloads not collected at open: %s", exc)

    def _drop_damaged_rows(self) -> None:
        """Delete record rows that do not parse (found by the scan; still damaged now): they
        can never be restored, and a newer agentkv's records are left alone."""
        damaged, self._damaged_rows = self._damaged_rows, set()
        for key in damaged:
            raw = self._cache.get(key)
            if raw is None:
                continue
            try:
                r = Record.from_bytes(raw)
                if record_key(r) == key:
                    continue  # rewritten meanwhile
            except CorruptEntry as exc:
                if exc.future:
                    continue
            log.warning("dropping the damaged record %s", key)
            self._cache.delete(key)
            self._records_changed()

    def _collect_unheld(self) -> int:
        """Delete every payload no record holds, the write lock held (writes.py)."""
        raise NotImplementedError

    def db_bytes(self) -> int:
        """Bytes of the SQLite files, which the disk budget counts too."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.stat(str(self.directory / DB_NAME) + suffix).st_size
        return total

    def _scan(self) -> Dict[str, Record]:
        """Every readable record on disk, by key (unreadable ones are noted, to be dropped)."""
        found: Dict[str, Record] = {}
        for key, r in self.record_rows():
            if isinstance(r, CorruptEntry):
                log.warning("ignoring unreadable record %s: %s", key, r)
                if not r.future:
                    self._damaged_rows.add(key)
                continue
            found[key] = r
        return found

    def _refresh(self, force: bool = False, stamp_only: bool = False) -> None:
        """Bring the index in step with the disk (records of other processes included).
        ``stamp_only``: trust the records' stamp alone, not the count of rows too (for a
        writer, whose own payloads changed the count; agentkv 0.4.0 and older do not stamp)."""
        n, stamp = len(self._cache), self._records_stamp()
        if not force and stamp == self._seen_stamp and (stamp_only or n == self._seen_len):
            return
        on_disk = self._scan()
        for key in [k for k in self._index.records if k not in on_disk]:
            self._index.remove(key)
        for key, r in sorted(on_disk.items(), key=lambda kv: kv[1].saved_at):
            old = self._index.records.get(key)
            if old is None or old.to_bytes() != r.to_bytes():
                if old is not None:
                    r.last_used = max(r.last_used, old.last_used)
                    self._index.remove(key)
                self._index.add(key, r, self._payload_size)
        self._seen_len, self._seen_stamp = len(self._cache), stamp

    def _records_stamp(self) -> object:
        try:
            return self._cache.get(RECORDS_STAMP)
        except Exception:  # noqa: BLE001 - a damaged stamp row: every refresh rescans
            return _UNREADABLE

    def _records_changed(self) -> None:
        """After this process changed the records on disk (write lock held, index in step):
        stamp the change for other processes' indexes, and note the stamp as seen."""
        stamp = os.urandom(8)
        self._cache.set(RECORDS_STAMP, stamp)
        self._seen_len, self._seen_stamp = len(self._cache), stamp

    def _payload_size(self, key: str) -> int:
        """Bytes of a stored payload (0 if it is missing or unreadable)."""
        try:
            f = self._open(key)
        except CorruptEntry:
            return 0
        if isinstance(f, bytes):
            return len(f)
        with f:
            return os.fstat(f.fileno()).st_size

    def _collect(self, candidates: Iterable[str]) -> None:
        """Delete the candidate payloads unless a record on disk still holds them.
        Call with the cross-process write lock held."""
        with self._lock:
            candidates = [k for k in candidates if not self._index.holds(k)]
        if not candidates:
            return
        held: Set[str] = set()
        for r in self._scan().values():
            held.update(r.keys())
        for k in candidates:
            if k not in held:
                self._cache.delete(k)

    def record_rows(self) -> List[Tuple[str, Union[Record, CorruptEntry]]]:
        """Every row that should hold a record, parsed, or the reason it does not parse (a
        record stored under another record's key, as a swap of two rows leaves it, included)."""
        out: List[Tuple[str, Union[Record, CorruptEntry]]] = []
        for key in list(self._cache.iterkeys()):
            if not isinstance(key, str) or not key.startswith(("agent/", "cut/")):
                continue
            try:
                raw = self._cache.get(key)
                if raw is None:
                    continue
                r = Record.from_bytes(raw)
                if record_key(r) != key:
                    raise CorruptEntry("record is stored under another record's key")
                out.append((key, r))
            except CorruptEntry as exc:
                out.append((key, exc))
        return out

    def payload_rest(self, key: str) -> int:
        """The at-rest format a payload's header names (0 if unreadable)."""
        try:
            f = self._open(key)
        except CorruptEntry:
            return 0
        if isinstance(f, bytes):
            head = f[:8]
        else:
            with f:
                head = f.read(8)
        return struct.unpack_from("<H", head, 6)[0] if len(head) >= 8 else 0

    @property
    def nbytes(self) -> int:
        """Bytes of payloads the indexed records hold (the quantity the budget bounds)."""
        return self._index.nbytes

    def agents(self) -> List[Tuple[Record, int]]:
        """Agent manifests with the bytes each one's state takes on disk."""
        with self._lock:
            self._refresh()  # other processes' changes included
            return [(r, self._index.bytes_of(r))
                    for r in self._index.records.values() if r.kind == "agent"]

    def has_agent(self, agent_id: str) -> bool:
        with self._lock:
            self._refresh()  # other processes' changes included
            return agent_key(agent_id) in self._index.records

    def manifest(self, agent_id: str) -> Optional[Record]:
        """The agent's manifest as indexed (None if not stored)."""
        with self._lock:
            self._refresh()  # other processes' changes included
            return self._index.records.get(agent_key(agent_id))

    def cuts(self) -> List[Record]:
        """The shared prefixes stored."""
        with self._lock:
            self._refresh()  # other processes' changes included
            return [r for r in self._index.records.values() if r.kind == "cut"]

    def missing(self, keys: Iterable[str]) -> List[str]:
        """The payload keys this store does not hold."""
        return [k for k in keys if k not in self._cache]

    def _open(self, key: str, overlay: Optional[Overlay] = None):
        """A payload's open file, or its bytes when the index database holds it (small);
        ``overlay``'s bytes (payloads read from the shared tier) first."""
        if overlay is not None and key in overlay:
            return overlaid(overlay, key)
        f = self._cache.get(key, read=True)
        if f is None:
            raise CorruptEntry(f"payload {key} is missing")
        return f.getvalue() if isinstance(f, io.BytesIO) else f

    def _read(self, key: str, into: Optional[ReadArena] = None, overlay: Optional[Overlay] = None):
        """A payload's bytes; with ``into``, read straight into that arena (no copy)."""
        if overlay is not None and key in overlay:
            return overlaid(overlay, key)
        if into is None:
            payload = self._cache.get(key)
            if payload is None:
                raise CorruptEntry(f"payload {key} is missing")
            return payload
        f = self._open(key)
        if isinstance(f, bytes):
            return f
        with f:
            size = os.fstat(f.fileno()).st_size
            view = into.take(size)
            if f.readinto(view.data) != size:
                raise CorruptEntry(f"payload {key} changed size while it was read")
        return view

    def _touch(self, key: str) -> None:
        with self._lock:
            r = self._index.records.get(key)
            if r is not None:
                r.last_used = time.time()
                self._index.touch(key)

    def model_hash(self, path: str, compute: Callable[[str], str]) -> str:
        """Content hash of a model (or adapter) file, cached under what a replaced file cannot
        keep: its inode, device and change time (which ``rsync -t``, ``cp -p`` and ``tar x``
        cannot set back, unlike the modification time), its size, and a hash of samples of
        its bytes (head, tail and 16 spread over it)."""
        ident = file_identity(path)
        key = "model/" + xxhash.xxh3_128_hexdigest(ident.encode("utf-8", "surrogateescape"))
        try:
            cached = self._cache.get(key)
            if cached is not None:
                value = cached.decode("ascii")
                if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
                    return value
        except Exception:  # noqa: BLE001 - unreadable or a broken database: hash it again
            pass
        value = compute(path)
        try:
            self._cache.set(key, value.encode("ascii"))
        except Exception as exc:  # noqa: BLE001 - a full disk: hashed again next time
            log.debug("model hash not cached: %s", exc)
        return value

    def close(self) -> None:
        self._cache.close()
