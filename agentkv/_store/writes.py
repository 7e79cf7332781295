"""Writes of the disk tier: an agent's turn (its new blocks, its tail, its manifest), a shared
cut, drops, collection of unheld payloads, and the sweep of stray files."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import diskcache

from .._format import pieces as seqpieces
from .._format import seqstate
from .._format.image import RestoreImage
from .._format.snapshot import Snapshot, StoredPieces
from .atrest import to_rest
from .base import StoreBase
from .files import Chunks
from .keys import agent_key
from .records import Record
from .payloads import BlockPayload, Tail, blocks_digest, chain_keys, encode_tail, seal_block

__all__ = ["StoreWrites"]

log = logging.getLogger("agentkv._store.disk")


def _never_pause() -> None:
    """The ``pause`` of a save nobody needs to interrupt."""


class StoreWrites(StoreBase):
    """What changes the disk tier (every write holds the cross-process write lock)."""

    def _blocks_of(self, snap: Snapshot, fingerprint: bytes, whole_only: bool,
                   pause: Callable[[], None]):
        """Split a snapshot: (chain, shape, first, blocks [(key, payload)] per cache, tail
        pieces). ``whole_only``: None unless the state is whole blocks only."""
        B = self.block_tokens
        if isinstance(snap.state, RestoreImage):  # split as its compact form, from its views
            parsed = snap.state.parsed
            shape, pieces = snap.state.split_views(B)
        elif isinstance(snap.state, StoredPieces):
            raise TypeError("a snapshot read from disk is saved as it was read, not again")
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
                    if sink is None:
                        self._cache.set(key, Chunks(payload.parts()), read=True)  # no join
                    else:
                        data = bytes(payload)
                        self._cache.set(key, data)
                        if sink is not None:
                            sink[key] = data  # joined once, for the shared tier too
                    wrote.append(key)
                    written += payload.nbytes
        return written

    def _commit(self, key: str, r: Record, sizes: Dict[str, int], keep: str) -> None:
        """Write the record, swap it into the index, collect, and hold the budget.
        Call with the cross-process write lock held; readers wait for the row and the swap."""
        with self._lock:  # the index in step first: another process may have changed what
            self._refresh(stamp_only=True)  # is shared; no reader's refresh between row and swap
            self._cache.set(key, r.to_bytes())
            freed = self._index.remove(key)
            self._index.add(key, r, lambda k: sizes[k] if k in sizes else self._payload_size(k))
            db = self.db_bytes()
            while self._index.nbytes + db > self.budget and len(self._index.records) > 1:
                victim = next(k for k in self._index.records if k != keep)
                log.info("disk budget: dropping %s (%d bytes held)", victim, self._index.nbytes)
                self._cache.delete(victim)
                freed += self._index.remove(victim)
        self._collect(freed)
        self._records_changed()

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
                   gen=version[0], sid=version[1], compute=self.machine)
        r.last_used = now
        key = agent_key(agent_id)
        with self._write_lock.held():
            step = self._renewing(pause)
            tail = r.tail
            assert tail is not None  # an agent's record names its tail
            sizes: Dict[str, int] = {}
            wrote: List[str] = []
            try:
                written = self._write_blocks(blocks, sizes, step, wrote, sink)
                if sink is not None:
                    sink[tail] = tail_payload
                sizes[tail] = len(tail_payload)
                if tail not in self._cache:
                    step()
                    self._cache.set(tail, tail_payload)
                    wrote.append(tail)
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
                   compute=self.machine)
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
                self._refresh()
                known = key in self._index.records or key in self._cache
                self._cache.delete(key)
                freed = self._index.remove(key)
            self._collect(freed)
            self._records_changed()
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
        gone = self.unheld_payloads()
        for key in gone:
            self._cache.delete(key)
        return len(gone)

    def garbage(self) -> Tuple[int, int]:
        """(payloads no record holds, files no row names), counted under the write lock: a
        save in flight (its blocks written, its record not yet) is waited for, not counted."""
        with self._write_lock.held():
            with self._lock:
                self._refresh(force=True)
            return len(self.unheld_payloads()), len(self.stray_files())

    def unheld_payloads(self) -> List[str]:
        """Keys of the payloads no record on disk holds (what :meth:`collect` deletes)."""
        held: Set[str] = set()
        for r in self._scan().values():
            held.update(r.keys())
        return [key for key in self._cache.iterkeys()
                if isinstance(key, str) and key.startswith(("blk/", "kv/")) and key not in held]

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
            self._records_changed()
        log.warning("dropped damaged payload %s and the %d record(s) naming it", payload,
                    len(names))
        return names

    def drop_record(self, key: str) -> None:
        """Remove a record by its key (an agent's manifest or a cut); payloads as in drop."""
        with self._write_lock.held():
            with self._lock:
                self._refresh()
                self._cache.delete(key)
                freed = self._index.remove(key)
            self._collect(freed)
            self._records_changed()

    def sweep(self) -> int:
        """Remove the files of the cache folder no row names and the rows whose file is gone;
        return how many files went.

        diskcache writes a payload's file before it commits the row, and deletes a row before
        its file, so a writer killed in between leaves a file no key reaches: :meth:`collect`
        cannot see it. Every payload write holds the write lock, so under it every unnamed
        file is such a leftover (diskcache's own consistency check finds them).
        """
        with self._write_lock.held():
            gone = self.stray_files(fix=True)
            with self._lock:
                self._refresh(force=True)
        for message in gone:
            log.info("removed a stray cache file: %s", message)
        return len(gone)

    def stray_files(self, fix: bool = False) -> List[str]:
        """diskcache's findings of files no row names (``fix``: removed, see :meth:`sweep`)."""
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # check() records its findings as warnings
            found = self._cache.check(fix=fix)
        return [str(w.message) for w in found if issubclass(w.category, diskcache.UnknownFileWarning)]
