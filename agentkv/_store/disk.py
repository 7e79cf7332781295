"""The disk tier: content-addressed token blocks, agent manifests and shared cuts on diskcache.

Layout of the diskcache under ``cache_dir`` (keys are strings, values raw bytes; blocks.py has
the payload formats)::

    blk/<xxh3-128 hex>     one cache's KV for one token block, named by its own digest
    kv/<xxh3-128 hex>      an agent's tail: partial block, tokens, logits, shape, block-list digest
    agent/<xxh3-128 hex>   an agent's manifest (JSON record): chain keys, block keys, tail key
    cut/<chain key hex>    a shared prefix (JSON record) stored with its SWA window
    model/<xxh3-128 hex>   a cached content hash of a GGUF file, keyed by path, size and mtime
    lock/store             the cross-process write lock (expires, so a killed holder frees it)

Saves are incremental: a block whose key is already stored is not written again, so a save
writes the blocks completed since the last one plus the tail. Equal blocks of different
agents (a shared system prompt) are stored once.

Crash safety: a save writes blocks, then the tail, then the record; diskcache commits a row
only after its file is written. A process killed in the middle leaves unreferenced blocks
(collected later), never a record pointing at missing or half-written data. Reads are
lock-free and check everything (digests, chain keys, the tail's digest of the block list).

Collection: payloads no record references are deleted. Records of other processes count:
before deleting, the collector re-reads every record on disk under the cross-process lock,
which every writer also holds from its first block to its record.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sqlite3
import struct
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import diskcache
import numpy as np
import xxhash

from .._format import seqstate
from .._format import pieces as seqpieces
from .records import (BlockPayload, Record, Tail, blocks_digest, chain_keys, decode_block,
                     decode_tail, encode_tail, open_block, seal_block)
from .atrest import from_rest, to_rest
from .files import (DB_NAME, Arena, SafeDisk, StoreLock, check_database, claim,
                     database_damage, move_aside)
from ..errors import CorruptEntry, FingerprintMismatch, StoreBusy
from .._format.image import RestoreImage
from .index import RecordIndex
from .._llama.settings import compute
from .._format.snapshot import StoredPieces, Snapshot, check_state

__all__ = ["DiskStore", "NoDisk", "agent_key", "file_identity"]

log = logging.getLogger(__name__)

def agent_key(agent_id: str) -> str:
    return "agent/" + xxhash.xxh3_128_hexdigest(agent_id.encode("utf-8", "surrogatepass"))


_SAMPLE = 64 << 10


def file_identity(path: str) -> str:
    """A string that changes when the file at ``path`` is replaced or rewritten: path, device,
    inode, size, modification and change times, and the xxh3 of 18 samples of its bytes."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        h = xxhash.xxh3_128()
        size = st.st_size
        for i in range(18):
            off = 0 if i == 0 else size - _SAMPLE if i == 17 else (size * i) // 17
            h.update(os.pread(f.fileno(), _SAMPLE, max(0, off)))
    return (f"{os.path.abspath(path)}\0{st.st_dev}\0{st.st_ino}\0{size}\0{st.st_mtime_ns}"
            f"\0{st.st_ctime_ns}\0{h.hexdigest()}")


def mismatch(agent_id: str, r: Record) -> str:
    """Why agent ``agent_id``'s record ``r`` (another fingerprint) cannot be restored here."""
    here = compute()
    if r.compute and r.compute != here:
        return (f"agent {agent_id!r} was saved by another machine or llama.cpp build, whose "
                f"kernels compute other KV and logits than this one's ({r.compute.split(' |')[0]}:"
                f" {r.compute}; here {here.split(' |')[0]}: {here})")
    return f"agent {agent_id!r} was saved by another model or context configuration"


def _never_pause() -> None:
    """The ``pause`` of a save nobody needs to interrupt."""


def _close_files(pieces: Iterable[seqpieces.Piece]) -> None:
    """Close the files of FilePieces a failed read opened."""
    for p in pieces:
        if isinstance(p, seqpieces.FilePiece):
            with contextlib.suppress(Exception):
                p.data[0].close()


Overlay = Dict[str, Optional[bytes]]  # payloads read from the shared tier (None: not there)


def _overlaid(overlay: Overlay, key: str) -> bytes:
    value = overlay[key]
    if value is None:
        raise CorruptEntry(f"payload {key} is missing from the shared tier")
    return value


def _record_key(r: Record) -> str:
    return agent_key(r.name) if r.kind == "agent" else "cut/" + r.name


class DiskStore:
    """Blocks, tails and records on disk under a byte budget (LRU over records).

    Args:
        directory: the cache folder.
        budget: bytes of payloads (blocks and tails) to keep.
        block_tokens: positions per block.
        at_rest: code of the at-rest row format (atrest.CODES; 0: exact).
    """

    def __init__(self, directory: Path, budget: int, block_tokens: int = 256,
                 at_rest: int = 0, create: bool = True, repair: bool = True) -> None:
        claim(directory, create)  # NotACache before anything is written
        self.directory = directory
        self.budget = budget
        self.block_tokens = block_tokens
        self.at_rest = at_rest
        self._lock = threading.RLock()
        self._arena = Arena()  # scratch reads (one restore at a time: AgentMemory's turn)
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
            self._seen_len = -1
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
                if _record_key(r) == key:
                    continue  # rewritten meanwhile
            except CorruptEntry as exc:
                if exc.future:
                    continue
            log.warning("dropping the damaged record %s", key)
            self._cache.delete(key)

    def db_bytes(self) -> int:
        """Bytes of the SQLite files, which the disk budget counts too."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.stat(str(self.directory / DB_NAME) + suffix).st_size
        return total

    # -- the in-memory index --------------------------------------------------------------

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

    def _refresh(self, force: bool = False) -> None:
        """Bring the index in step with the disk (records of other processes included)."""
        n = len(self._cache)
        if not force and n == self._seen_len:
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
        self._seen_len = len(self._cache)

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

    # -- checks (python -m agentkv verify) -------------------------------------------------

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
                if _record_key(r) != key:
                    raise CorruptEntry("record is stored under another record's key")
                out.append((key, r))
            except CorruptEntry as exc:
                out.append((key, exc))
        return out

    def check_record(self, r: Record, remote: Optional[Tuple[bytes, Overlay]] = None) -> int:
        """Read and check everything ``r`` names (digests, chain keys, the tail); raise
        CorruptEntry if anything is damaged or missing. Returns the bytes read.
        ``remote``: ``r``'s bytes and its payloads, read from the shared tier."""
        fingerprint = bytes.fromhex(r.fingerprint)
        if r.kind == "agent":
            snap, nread = self.get(r.name, fingerprint, remote=remote)
            if snap is None:
                raise CorruptEntry("manifest vanished while it was checked")
            check_state(seqpieces.assemble(snap.state.shape, snap.state.pieces), snap.n_tokens)
            return nread
        shape = seqpieces.Shape.from_json(r.shape)
        chain = [bytes.fromhex(c) for c in r.chain]  # hex: Record.from_bytes checked it
        _, nread = self._load_blocks(r, shape, fingerprint, chain, len(chain), 0,
                                     overlay=None if remote is None else remote[1])
        return nread

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

    # -- queries --------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of payloads the indexed records hold (the quantity the budget bounds)."""
        return self._index.nbytes

    def agents(self) -> List[Tuple[Record, int]]:
        """Agent manifests with the bytes each one's state takes on disk."""
        with self._lock:
            return [(r, self._index.bytes_of(r))
                    for r in self._index.records.values() if r.kind == "agent"]

    def has_agent(self, agent_id: str) -> bool:
        with self._lock:
            return agent_key(agent_id) in self._index.records

    def manifest(self, agent_id: str) -> Optional[Record]:
        """The agent's manifest as indexed (None if not stored)."""
        with self._lock:
            return self._index.records.get(agent_key(agent_id))

    def cuts(self) -> List[Record]:
        """The shared prefixes stored."""
        with self._lock:
            return [r for r in self._index.records.values() if r.kind == "cut"]

    # -- writes ---------------------------------------------------------------------------

    def _blocks_of(self, snap: Snapshot, fingerprint: bytes, whole_only: bool,
                   pause: Callable[[], None]):
        """Split a snapshot: (chain, shape, first, blocks [(key, payload)] per cache, tail
        pieces). ``whole_only``: None unless the state is whole blocks only."""
        B = self.block_tokens
        if isinstance(snap.state, RestoreImage):  # split as its compact form, from its views
            parsed = snap.state.parsed
            shape, pieces = snap.state.split_views(B)
        else:
            parsed = seqstate.parse(snap.state)
            shape, pieces = seqpieces.split_views(snap.state, B, parsed)
        chain = chain_keys(fingerprint, snap.tokens, B)
        splittable = [sum(s is not None for s in c.streams) == 1 for c in parsed.caches]
        first: List[int] = [0] * len(parsed.caches)
        blocks: List[List[Tuple[str, BlockPayload]]] = [[] for _ in parsed.caches]
        rest = []
        for p in pieces:
            pause()
            j = p.pos0 // B
            whole = (splittable[p.cache] and p.pos0 % B == 0 and p.count == B and j < len(chain)
                     and (not blocks[p.cache] or first[p.cache] + len(blocks[p.cache]) == j))
            if whole:
                if not blocks[p.cache]:
                    first[p.cache] = j
                parts = p.views if not self.at_rest else [to_rest(shape, p.piece(), self.at_rest).data]
                block = seal_block(p.cache, p.stream, p.pos0, p.count, p.cells_len, parts,
                                   chain[j], fingerprint, self.at_rest)
                blocks[p.cache].append(("blk/" + block.key, block))
            else:
                rest.append(to_rest(shape, p.piece(), self.at_rest))
        if whole_only and rest:
            return None
        return chain, shape, first, blocks, rest

    def _write_blocks(self, blocks: List[List[Tuple[str, BlockPayload]]], sizes: Dict[str, int],
                      pause: Callable[[], None], wrote: List[str],
                      sink: Optional[Dict[str, Any]] = None) -> int:
        """Write the blocks the store lacks (their keys go to ``wrote``); bytes written.
        ``sink`` gets every block, written or not (``bytes()`` of each is its payload)."""
        written = 0
        for per_cache in blocks:
            for key, payload in per_cache:
                sizes[key] = payload.nbytes
                if sink is not None:
                    sink[key] = payload
                if key not in self._cache:
                    pause()
                    data = bytes(payload)
                    self._cache.set(key, data)
                    if sink is not None:
                        sink[key] = data  # joined once, for the shared tier too
                    wrote.append(key)
                    written += payload.nbytes
        return written

    def _commit(self, key: str, r: Record, sizes: Dict[str, int], keep: str) -> None:
        """Write the record, swap it into the index, collect, and hold the budget.
        Call with the cross-process write lock held; readers only wait for the index swap."""
        self._cache.set(key, r.to_bytes())
        with self._lock:
            freed = self._index.remove(key)
            self._index.add(key, r, lambda k: sizes[k] if k in sizes else self._payload_size(k))
            db = self.db_bytes()
            while self._index.nbytes + db > self.budget and len(self._index.records) > 1:
                victim = next(k for k in self._index.records if k != keep)
                log.info("disk budget: dropping %s (%d bytes held)", victim, self._index.nbytes)
                self._cache.delete(victim)
                freed += self._index.remove(victim)
        self._collect(freed)
        self._seen_len = len(self._cache)

    def put(self, agent_id: str, snap: Snapshot, fingerprint: bytes,
            pause: Optional[Callable[[], None]] = None, version: Tuple[int, str] = (0, ""),
            sink: Optional[Dict[str, Any]] = None) -> Tuple[Optional[Record], int]:
        """Persist ``snap`` as the agent's KV; return its manifest and the bytes written.

        Only blocks the store lacks are written, plus the tail. Returns ``(None, 0)`` when the
        state alone exceeds the budget (logged). ``pause`` is called before each step of
        work, so that a background writer can give way to the foreground. ``version``: the
        manifest's (generation, save id); ``sink`` receives every payload the manifest names
        (key -> buffer), for the shared tier.
        """
        pause = pause or _never_pause
        self._check_home()
        chain, shape, first, blocks, rest = self._blocks_of(snap, fingerprint, False, pause)
        digest = blocks_digest(first, [[k for k, _ in bs] for bs in blocks])
        # Lossy at rest: no carried logits (they belong to the exact KV); a resume replays the
        # last token on the restored KV instead, and the state is 1 MB smaller (Gemma's vocab).
        logits = None if self.at_rest else snap.logits
        pause()
        tail_payload, tail_key = encode_tail(
            Tail(snap.tokens, logits, shape, rest, digest), fingerprint, self.at_rest)
        total = len(tail_payload) + sum(p.nbytes for bs in blocks for _, p in bs)
        if total + self.db_bytes() > self.budget:
            log.warning("agent %r: %d bytes of KV exceed disk_budget=%d; not persisted",
                        agent_id, total, self.budget)
            self.drop(agent_id)
            return None, 0
        now = time.time()
        r = Record("agent", agent_id, snap.n_tokens, self.block_tokens, [c.hex() for c in chain],
                   first, [[k for k, _ in bs] for bs in blocks], fingerprint.hex(), now,
                   tail="kv/" + tail_key, shape=shape.to_json(), exact=snap.exact,
                   gen=version[0], sid=version[1], compute=compute())
        r.last_used = now
        key = agent_key(agent_id)
        with self._write_lock.held():
            step = self._renewing(pause)
            sizes: Dict[str, int] = {}
            wrote: List[str] = []
            try:
                written = self._write_blocks(blocks, sizes, step, wrote, sink)
                if sink is not None:
                    sink[r.tail] = tail_payload
                sizes[r.tail] = len(tail_payload)
                if r.tail not in self._cache:
                    step()
                    self._cache.set(r.tail, tail_payload)
                    wrote.append(r.tail)
                    written += len(tail_payload)
                self._commit(key, r, sizes, keep=key)
            except BaseException:
                self._discard_unheld(wrote)
                raise
        return r, written

    def put_cut(self, snap: Snapshot, fingerprint: bytes,
                pause: Optional[Callable[[], None]] = None,
                sink: Optional[Dict[str, Any]] = None) -> Tuple[Optional[Record], int]:
        """Store a shared prefix (whole blocks only, SWA window included); its record (None
        if not stored) and the bytes written. ``sink`` as in :meth:`put`."""
        pause = pause or _never_pause
        self._check_home()
        split = self._blocks_of(snap, fingerprint, whole_only=True, pause=pause)
        if split is None or not split[0]:
            log.debug("cut at %d tokens is not whole blocks; not stored", snap.n_tokens)
            return None, 0
        chain, shape, first, blocks = split[:4]
        now = time.time()
        r = Record("cut", chain[-1].hex(), snap.n_tokens, self.block_tokens,
                   [c.hex() for c in chain], first, [[k for k, _ in bs] for bs in blocks],
                   fingerprint.hex(), now, shape=shape.to_json(), exact=snap.exact,
                   compute=compute())
        r.last_used = now
        key = "cut/" + r.name
        with self._write_lock.held():
            sizes: Dict[str, int] = {}
            wrote: List[str] = []
            try:
                written = self._write_blocks(blocks, sizes, self._renewing(pause), wrote, sink)
                self._commit(key, r, sizes, keep=key)
            except BaseException:
                self._discard_unheld(wrote)
                raise
        return r, written

    def _renewing(self, pause: Callable[[], None]) -> Callable[[], None]:
        """``pause``, renewing the write lock first: a holder that gives way to restores for
        longer than the lock's expiry keeps it."""
        def step() -> None:
            self._write_lock.renew()
            pause()
            self._write_lock.renew()
        return step

    def _discard_unheld(self, keys: Iterable[str]) -> None:
        """After a failed save: delete the payloads it wrote (new under the write lock, so no
        other process's record names them) unless its record got committed (best effort; a
        full disk may refuse this too, and the next open collects them)."""
        try:
            with self._lock:
                keys = [k for k in keys if not self._index.holds(k)]
            for k in keys:
                self._cache.delete(k)
        except Exception as exc:  # noqa: BLE001
            log.debug("payloads of a failed save not deleted yet: %s", exc)

    def drop(self, agent_id: str) -> bool:
        """Remove the agent's manifest; its payloads go unless another record holds them.
        True if it was stored."""
        key = agent_key(agent_id)
        self._check_home()
        with self._write_lock.held():
            with self._lock:
                known = key in self._index.records or key in self._cache
                self._cache.delete(key)
                freed = self._index.remove(key)
            self._collect(freed)
            self._seen_len = len(self._cache)
        return known

    def collect(self) -> int:
        """Delete every payload no record on disk holds (orphans of killed writers included);
        return how many went."""
        with self._write_lock.held():
            return self._collect_unheld()

    def _collect_unheld(self) -> int:
        """:meth:`collect`, with the write lock held by the caller."""
        with self._lock:
            self._refresh(force=True)
        held: Set[str] = set()
        for r in self._scan().values():
            held.update(r.keys())
        gone = 0
        for key in list(self._cache.iterkeys()):
            if isinstance(key, str) and key.startswith(("blk/", "kv/")) and key not in held:
                self._cache.delete(key)
                gone += 1
        return gone

    def discard_damaged(self, payload: str) -> List[str]:
        """Delete a payload found damaged and every record that names it (an agent or a cut
        that would fail again at every restore); the next save that holds those bytes writes
        them afresh. Returns the keys of the records dropped."""
        with self._write_lock.held():
            with self._lock:
                self._refresh(force=True)
                names = [k for k, r in self._index.records.items() if payload in r.keys()]
                freed: List[str] = []
                for k in names:
                    self._cache.delete(k)
                    freed += self._index.remove(k)
                self._cache.delete(payload)
            self._collect(freed)
            self._seen_len = len(self._cache)
        log.warning("dropped damaged payload %s and the %d record(s) naming it", payload,
                    len(names))
        return names

    def drop_record(self, key: str) -> None:
        """Remove a record by its key (an agent's manifest or a cut); payloads as in drop."""
        with self._write_lock.held():
            with self._lock:
                self._cache.delete(key)
                freed = self._index.remove(key)
            self._collect(freed)
            self._seen_len = len(self._cache)

    def sweep(self) -> int:
        """Remove the files of the cache folder no row names and the rows whose file is gone;
        return how many files went.

        diskcache writes a payload's file before it commits the row, and deletes a row before
        its file, so a writer killed in between leaves a file no key reaches: :meth:`collect`
        cannot see it. Every payload write holds the write lock, so under it every unnamed
        file is such a leftover (diskcache's own consistency check finds them).
        """
        with self._write_lock.held():
            with warnings.catch_warnings():
                warnings.simplefilter("always")  # check() records its findings as warnings
                found = self._cache.check(fix=True)
            with self._lock:
                self._refresh(force=True)
        gone = [w for w in found if issubclass(w.category, diskcache.UnknownFileWarning)]
        for w in gone:
            log.info("removed a stray cache file: %s", w.message)
        return len(gone)

    # -- reads ----------------------------------------------------------------------------

    def missing(self, keys: Iterable[str]) -> List[str]:
        """The payload keys this store does not hold."""
        return [k for k in keys if k not in self._cache]

    def _open(self, key: str, overlay: Optional[Overlay] = None):
        """A payload's open file, or its bytes when the index database holds it (small);
        ``overlay``'s bytes (payloads read from the shared tier) first."""
        if overlay is not None and key in overlay:
            return _overlaid(overlay, key)
        f = self._cache.get(key, read=True)
        if f is None:
            raise CorruptEntry(f"payload {key} is missing")
        return f.getvalue() if isinstance(f, io.BytesIO) else f

    def _read(self, key: str, into: Optional[Arena] = None, overlay: Optional[Overlay] = None):
        """A payload's bytes; with ``into``, read straight into that arena (no copy)."""
        if overlay is not None and key in overlay:
            return _overlaid(overlay, key)
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
            if f.readinto(memoryview(view)) != size:
                raise CorruptEntry(f"payload {key} changed size while it was read")
        return view

    def _load_blocks(self, r: Record, shape: seqpieces.Shape, fingerprint: bytes,
                     chain: List[bytes], upto: int, swa_from: int, into: Optional[Arena] = None,
                     overlay: Optional[Overlay] = None) -> Tuple[List[seqpieces.Piece], int]:
        """Pieces of blocks ``< upto`` (cache 0 from block 0, others from ``swa_from``).

        With ``into`` (a restore's scratch read) and exact rows, blocks come back as
        FilePieces: assembly reads them straight into place and checks their digests then.
        """
        B = r.block_tokens
        pieces: List[seqpieces.Piece] = []
        nread = 0
        for c, keys in enumerate(r.blocks):
            lo = 0 if c == 0 else max(r.first[c], swa_from)
            in_place = (into is not None and not self.at_rest and c < len(shape.caches)
                        and not any(sh is not None and sh.v_trans for sh in shape.caches[c]))
            for j in range(lo, min(upto, r.first[c] + len(keys))):
                key = keys[j - r.first[c]]
                try:
                    nread += self._load_block(pieces, key, shape, fingerprint, chain[j], c, j * B,
                                              B, in_place, into, overlay)
                except CorruptEntry as exc:
                    exc.payload = exc.payload or key  # the damaged payload: dropped and rewritten
                    exc.record = _record_key(r)
                    _close_files(pieces)
                    raise
                except BaseException:
                    _close_files(pieces)
                    raise
        return pieces, nread

    def _load_block(self, pieces: List[seqpieces.Piece], key: str, shape: seqpieces.Shape,
                    fingerprint: bytes, chain: bytes, c: int, pos0: int, B: int, in_place: bool,
                    into: Optional[Arena], overlay: Optional[Overlay] = None) -> int:
        """Append block ``key``'s piece to ``pieces``; return the bytes it takes on disk."""
        payload = self._open(key, overlay) if in_place else self._read(key, into, overlay)
        if in_place and not isinstance(payload, bytes):  # a file: read in place later
            try:
                size = os.fstat(payload.fileno()).st_size
                pieces.append(open_block(payload, fingerprint, key[4:], chain, c, pos0, B))
            except BaseException:
                payload.close()
                raise
            return size
        piece = decode_block(payload, fingerprint, key[4:], chain, c, pos0, B, self.at_rest)
        pieces.append(from_rest(shape, piece, self.at_rest, lazy=into is not None))
        return len(payload)

    def get(self, agent_id: str, fingerprint: bytes, scratch: bool = False,
            remote: Optional[Tuple[bytes, Overlay]] = None) -> Tuple[Optional[Snapshot], int]:
        """The agent's stored snapshot (checked) and the bytes read; ``(None, 0)`` if none.

        Raises CorruptEntry or FingerprintMismatch; the caller decides what to drop.
        ``scratch``: read into the store's reused buffer; the snapshot is then only valid until
        the next scratch read (AgentMemory restores it at once, inside its turn).
        ``remote``: a manifest read from the shared tier and the payloads read with it (the
        ones this store lacks); it is checked exactly as a manifest on disk.
        """
        into = self._arena if scratch else None
        key = agent_key(agent_id)
        overlay = None if remote is None else remote[1]
        for attempt in range(2):  # another process may replace the agent's state under us
            raw = self._cache.get(key) if remote is None else remote[0]
            if raw is None:
                with self._lock:
                    self._index.remove(key)
                return None, 0
            try:
                r = Record.from_bytes(raw)
                if r.kind != "agent" or r.name != agent_id:
                    raise CorruptEntry("manifest names another agent")
            except CorruptEntry as exc:
                exc.record = key
                raise
            if r.fingerprint != fingerprint.hex():
                raise FingerprintMismatch(mismatch(agent_id, r))
            try:
                if into is not None:
                    into.reset()
                try:
                    tail_raw = self._read(r.tail, into, overlay)  # type: ignore[arg-type]
                    tail = decode_tail(tail_raw, fingerprint, r.tail[3:], self.at_rest)  # type: ignore[index]
                except CorruptEntry as exc:
                    exc.payload = r.tail
                    raise
                chain = chain_keys(fingerprint, tail.tokens, r.block_tokens)
                if [c.hex() for c in chain] != r.chain or tail.tokens.shape[0] != r.n_tokens:
                    raise CorruptEntry("manifest and tail disagree on the tokens")
                if blocks_digest(r.first, r.blocks) != tail.digest:
                    raise CorruptEntry("the manifest's blocks are not the ones its tail was saved with")
                pieces, nread = self._load_blocks(r, tail.shape, fingerprint, chain, len(chain), 0,
                                                  into, overlay)
            except CorruptEntry as exc:
                if attempt == 0 and remote is None and self._cache.get(key) != raw:
                    continue  # replaced meanwhile: read the new one
                exc.record = key
                raise
            break
        pieces += [from_rest(tail.shape, p, self.at_rest, lazy=into is not None)
                   for p in tail.pieces]
        pieces.sort(key=lambda p: (p.cache, p.stream, p.pos0))
        self._touch(key)
        return (Snapshot(tail.tokens, StoredPieces(tail.shape, tuple(pieces)), tail.logits, r.exact,
                         (r.gen, r.sid)), nread + len(tail_raw))

    def _touch(self, key: str) -> None:
        with self._lock:
            r = self._index.records.get(key)
            if r is not None:
                r.last_used = time.time()
                self._index.touch(key)

    # -- shared prefixes ------------------------------------------------------------------

    def _restorable_cut(self, r: Record, depth: int, n_swa: int, align: int) -> int:
        """The deepest whole-block cut ``<= depth`` blocks that ``r`` can restore exactly
        (``align``: and that a cold prefill reproduces: a multiple of ``align`` within the
        record's cold-exact positions)."""
        B = r.block_tokens
        lo0, hi0 = r.covers(0)
        depth = min(depth, hi0) if lo0 == 0 else 0
        for j in range(depth, 0, -1):
            C = j * B
            if align and (C % align or C > r.exact):
                continue
            need = max(0, C - n_swa + 1) // B if n_swa > 0 else 0
            if all(r.covers(c)[0] <= need and j <= r.covers(c)[1] for c in range(1, len(r.blocks))):
                return j
        return 0

    def _best_prefix(self, tokens: np.ndarray, fingerprint: bytes, n_swa: int, align: int,
                     extra: Sequence[Record] = ()
                     ) -> Tuple[int, int, Optional[Record], List[bytes]]:
        """(shared blocks, restorable blocks, record to restore from, chain of tokens);
        ``extra``: records of the shared tier, considered after the ones on disk."""
        B = self.block_tokens
        chain = chain_keys(fingerprint, tokens, B)
        hexes = [c.hex() for c in chain]
        shared, best, best_r = 0, 0, None
        fp = fingerprint.hex()
        with self._lock:
            self._refresh()
            # most recently used first
            for r in [*reversed(list(self._index.records.values())), *extra]:
                if r.fingerprint != fp or r.block_tokens != B or not r.chain:
                    continue
                k = 0
                for a, b in zip(r.chain, hexes):
                    if a != b:
                        break
                    k += 1
                shared = max(shared, k)
                j = self._restorable_cut(r, k, n_swa, align)
                if j > best:
                    best, best_r = j, r
        return shared, best, best_r, chain

    def chain_of(self, tokens: np.ndarray, fingerprint: bytes) -> List[str]:
        """The chain keys (hex) of the whole blocks of ``tokens``."""
        return [c.hex() for c in chain_keys(fingerprint, tokens, self.block_tokens)]

    def find_prefix(self, tokens: np.ndarray, fingerprint: bytes, n_swa: int,
                    scratch: bool = False, align: int = 0, extra: Sequence[Record] = (),
                    fetch: Optional[Callable[[List[str]], Overlay]] = None
                    ) -> Tuple[Optional[Snapshot], int, Optional[str]]:
        """The longest stored prefix of ``tokens`` that can be restored exactly, as a snapshot
        of its first ``C`` tokens (C a multiple of block_tokens), and the bytes read.
        ``align`` (n_batch): only a prefix a cold prefill of ``tokens`` reproduces bit for bit
        (see Record.exact). ``scratch`` as in :meth:`get`. Also returns the key of the record
        it read from. ``extra``: records read from the shared tier, whose payloads this store
        lacks ``fetch`` reads (a record of the shared tier is returned as "shared:<key>")."""
        _, j, r, chain = self._best_prefix(tokens, fingerprint, n_swa, align, extra)
        if r is None or j == 0:
            return None, 0, None
        overlay: Optional[Overlay] = None
        if fetch is not None and any(r is x for x in extra):
            overlay = fetch(self.missing(k for ks in r.blocks for k in ks))
        B = r.block_tokens
        C = j * B
        try:
            shape = seqpieces.Shape.from_json(r.shape)
        except CorruptEntry as exc:
            exc.record = _record_key(r)
            raise
        need = max(0, C - n_swa + 1) // B if n_swa > 0 else 0
        into = self._arena if scratch else None
        if into is not None:
            into.reset()
        pieces, nread = self._load_blocks(r, shape, fingerprint, chain, j, need, into, overlay)
        pieces.sort(key=lambda p: (p.cache, p.stream, p.pos0))
        self._touch(_record_key(r))
        return (Snapshot(np.asarray(tokens[:C], dtype=np.int32).copy(), StoredPieces(shape, tuple(pieces)),
                         None, min(C, r.exact)), nread,
                ("shared:" if overlay is not None else "") + _record_key(r))

    def plan_cut(self, tokens: np.ndarray, fingerprint: bytes, n_swa: int, align: int = 0) -> int:
        """Where a new shared prefix should be stored: the end of the whole blocks ``tokens``
        shares with stored states (``align``: rounded down to a multiple of it and of the
        block, so that the cut is what a cold prefill computes), when no record can restore
        that deep yet; else 0."""
        shared, best, _, _ = self._best_prefix(tokens, fingerprint, n_swa, align)
        B = self.block_tokens
        cut = shared * B
        if align:
            step = B * align // math.gcd(B, align)
            cut = cut // step * step
        return cut if cut > best * B else 0

    # -- model hashes ---------------------------------------------------------------------

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


class NoDisk:
    """The disk tier when the cache folder cannot be opened at all (a full disk, an I/O
    error): nothing is stored or found, so agents live in the context and RAM only."""

    nbytes = 0
    damaged_db = None

    def __init__(self, directory: Path, reason: str) -> None:
        self.directory = directory
        self.reason = reason

    def db_bytes(self) -> int:
        return 0

    def agents(self) -> List[Tuple[Record, int]]:
        return []

    def cuts(self) -> List[Record]:
        return []

    def has_agent(self, agent_id: str) -> bool:
        return False

    def manifest(self, agent_id: str) -> Optional[Record]:
        return None

    def missing(self, keys: Iterable[str]) -> List[str]:
        return list(keys)

    def chain_of(self, tokens: np.ndarray, fingerprint: bytes) -> List[str]:
        return []

    def get(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None, 0

    def find_prefix(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None, 0, None

    def plan_cut(self, *args, **kwargs) -> int:  # type: ignore[no-untyped-def]
        return 0

    def put(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(f"the cache folder {self.directory} could not be opened ({self.reason})")

    put_cut = put

    def drop(self, agent_id: str) -> bool:
        return False

    def discard_damaged(self, payload: str) -> List[str]:
        return []

    def drop_record(self, key: str) -> None:
        pass

    def recover(self, exc: BaseException) -> bool:
        return False

    def model_hash(self, path: str, compute: Callable[[str], str]) -> str:
        return compute(path)

    def close(self) -> None:
        pass
