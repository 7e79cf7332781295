"""Reads of the disk tier: an agent's state, checked block by block, and the longest stored
prefix of a prompt that restores exactly (and where to store a new one)."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .._format import pieces as seqpieces
from .._format.buffers import ReadArena
from .._format.snapshot import Snapshot, StoredPieces, check_state
from ..errors import CorruptEntry, FingerprintMismatch
from .atrest import from_rest
from .base import StoreBase
from .keys import Overlay, agent_key, mismatch, record_key
from .records import Record
from .payloads import blocks_digest, chain_keys, decode_block, decode_tail, open_block

__all__ = ["StoreReads"]

log = logging.getLogger("agentkv._store.disk")


def _close_files(pieces: Iterable[seqpieces.Piece]) -> None:
    """Close the files of FilePieces a failed read opened."""
    for p in pieces:
        if isinstance(p, seqpieces.FilePiece):
            with contextlib.suppress(Exception):
                p.data[0].close()


class StoreReads(StoreBase):
    """What reads the disk tier (lock-free on disk: everything read is checked)."""

    def _load_blocks(self, r: Record, shape: seqpieces.Shape, fingerprint: bytes,
                     chain: List[bytes], upto: int, swa_from: int, into: Optional[ReadArena] = None,
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
                    exc.record = record_key(r)
                    _close_files(pieces)
                    raise
                except BaseException:
                    _close_files(pieces)
                    raise
        return pieces, nread

    def _load_block(self, pieces: List[seqpieces.Piece], key: str, shape: seqpieces.Shape,
                    fingerprint: bytes, chain: bytes, c: int, pos0: int, B: int, in_place: bool,
                    into: Optional[ReadArena], overlay: Optional[Overlay] = None) -> int:
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

    def read_ahead(self, agent_id: str) -> int:
        """Ask the kernel to read the agent's payloads (its tail and blocks) into the page
        cache in the background; nothing is read or checked here (:meth:`get` does that).
        Returns the number of files asked for (0: not stored, or no such call here)."""
        r = self.manifest(agent_id)
        if r is None or r.tail is None or not hasattr(os, "posix_fadvise"):
            return 0
        n = 0
        for key in [r.tail, *(k for keys in r.blocks for k in keys)]:
            f = self._cache.get(key, read=True)  # an open file, or a small payload's bytes
            if f is None or isinstance(f, io.BytesIO):
                continue
            with f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
            n += 1
        return n

    def get(self, agent_id: str, fingerprint: bytes, scratch: bool = False,
            remote: Optional[Tuple[bytes, Overlay]] = None, arena: Optional[ReadArena] = None
            ) -> Tuple[Optional[Snapshot], int]:
        """The agent's stored snapshot (checked) and the bytes read; ``(None, 0)`` if none.

        Raises CorruptEntry or FingerprintMismatch; the caller decides what to drop.
        ``scratch``: read into the store's reused buffer; the snapshot is then only valid until
        the next scratch read (AgentMemory restores it at once, inside its turn).
        ``remote``: a manifest read from the shared tier and the payloads read with it (the
        ones this store lacks); it is checked exactly as a manifest on disk. ``arena``: as
        ``scratch``, in a reused buffer of the caller's (a reader on another thread).
        """
        into = arena if arena is not None else (self._arena if scratch else None)
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
                raise FingerprintMismatch(mismatch(agent_id, r, self.machine))
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

    def check_record(self, r: Record, remote: Optional[Tuple[bytes, Overlay]] = None) -> int:
        """Read and check everything ``r`` names (digests, chain keys, the tail); raise
        CorruptEntry if anything is damaged or missing. Returns the bytes read.
        ``remote``: ``r``'s bytes and its payloads, read from the shared tier."""
        fingerprint = bytes.fromhex(r.fingerprint)
        if r.kind == "agent":
            snap, nread = self.get(r.name, fingerprint, remote=remote)
            if snap is None or not isinstance(snap.state, StoredPieces):
                raise CorruptEntry("manifest vanished while it was checked")
            check_state(seqpieces.assemble(snap.state.shape, snap.state.pieces), snap.n_tokens)
            return nread
        shape = seqpieces.Shape.from_json(r.shape)
        chain = [bytes.fromhex(c) for c in r.chain]  # hex: Record.from_bytes checked it
        _, nread = self._load_blocks(r, shape, fingerprint, chain, len(chain), 0,
                                     overlay=None if remote is None else remote[1])
        return nread

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
            exc.record = record_key(r)
            raise
        need = max(0, C - n_swa + 1) // B if n_swa > 0 else 0
        into = self._arena if scratch else None
        if into is not None:
            into.reset()
        pieces, nread = self._load_blocks(r, shape, fingerprint, chain, j, need, into, overlay)
        pieces.sort(key=lambda p: (p.cache, p.stream, p.pos0))
        self._touch(record_key(r))
        return (Snapshot(np.asarray(tokens[:C], dtype=np.int32).copy(), StoredPieces(shape, tuple(pieces)),
                         None, min(C, r.exact)), nread,
                ("shared:" if overlay is not None else "") + record_key(r))

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
